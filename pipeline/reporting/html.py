"""HTML building blocks for self-contained pages (inline CSS, data-URI images); all text is escaped here."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1200px;
background:#fff}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.muted{color:#666}.bad{color:#b00020}
img.figure{max-width:100%;border:1px solid #ddd}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.82em}
details{margin:.4em 0}summary{cursor:pointer}
@media print{body{margin:0;max-width:none}details{display:block}}
""".strip()

DASH = "\u2014"


def text(value: Any) -> str:
    """Escaped text for HTML content and attribute values."""
    return escape(str(value), quote=True)


def number(value: float | int | None, *, digits: int = 4) -> str:
    """A fixed-point number, or an em dash for a missing / undefined value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{float(value):.{digits}f}"


def mean_std(stats: dict[str, Any] | None, *, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return DASH
    return f"{stats['mean']:.{digits}f} \u00b1 {stats['std']:.{digits}f}"


def median_iqr(stats: dict[str, Any] | None, *, digits: int = 3) -> str:
    if not stats or stats.get("median") is None:
        return DASH
    return f"{stats['median']:.{digits}f} [{stats['q1']:.{digits}f}, {stats['q3']:.{digits}f}]"


def interval(low: float | None, high: float | None, *, digits: int = 3) -> str:
    if low is None or high is None:
        return DASH
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(frozen=True)
class Cell:
    """Pre-rendered HTML for a table cell (a link); plain values are escaped instead."""

    html: str
    numeric: bool = False


def link(href: str, label: str) -> Cell:
    return Cell(f'<a href="{text(href)}">{text(label)}</a>')


def num(value: float | int | None, *, digits: int = 4) -> Cell:
    return Cell(text(number(value, digits=digits)), numeric=True)


def numeric_text(value: str) -> Cell:
    return Cell(text(value), numeric=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, css_class: str = "") -> str:
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, Cell):
                cells.append(f'<td class="num">{cell.html}</td>' if cell.numeric else f"<td>{cell.html}</td>")
            else:
                cells.append(f"<td>{text(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = f' class="{text(css_class)}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def bullet_list(items: Iterable[str]) -> str:
    entries = [f"<li>{text(i)}</li>" for i in items]
    return "<ul>" + "".join(entries) + "</ul>" if entries else '<p class="muted">none</p>'


def paragraph(value: str, *, css_class: str = "") -> str:
    cls = f' class="{text(css_class)}"' if css_class else ""
    return f"<p{cls}>{text(value)}</p>"


def preformatted(value: str) -> str:
    return f"<pre>{text(value)}</pre>"


def details(summary: str, body: str) -> str:
    """A collapsed block; ``body`` must already be escaped HTML."""
    return f"<details><summary>{text(summary)}</summary>\n{body}\n</details>"


def heading(value: str, level: int = 2) -> str:
    return f"<h{level}>{text(value)}</h{level}>"


def figure(png: bytes | None, *, alt: str, missing: str = "no picture") -> str:
    if png is None:
        return paragraph(missing, css_class="muted")
    return f'<img class="figure" src="{data_uri(png)}" alt="{text(alt)}">'


def page(title: str, body: str) -> str:
    """A complete HTML document; ``body`` must already be escaped HTML. No scripts, no external resources."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<title>{text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{text(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
