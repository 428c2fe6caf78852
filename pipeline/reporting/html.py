"""Self-contained HTML pages (inline CSS, images as data URIs); every piece of text is escaped here."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.bad{color:#b00020}
img.figure{max-width:100%;border:1px solid #ddd}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
""".strip()

_PATH_LABELS = {"image": "image (ingest folder)", "reference": "reference label (ingest folder)",
                "prediction": "prediction (infer folder)", "picture": "picture (studies folder)"}


def text(value: Any) -> str:
    """Escaped text for HTML content and attribute values."""
    return escape(str(value), quote=True)


def number(value: float | int | None, *, digits: int = 4) -> str:
    """A fixed-point number, or an em dash for a missing / undefined value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    return f"{float(value):.{digits}f}"


def mean_std(stats: dict[str, Any] | None, *, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "\u2014"
    return f"{stats['mean']:.{digits}f} \u00b1 {stats['std']:.{digits}f}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Cell:
    """Pre-rendered HTML for a table cell (a link); plain values are escaped instead."""

    def __init__(self, html: str, *, numeric: bool = False) -> None:
        self.html = html
        self.numeric = numeric


def link(href: str, label: str) -> Cell:
    return Cell(f'<a href="{text(href)}">{text(label)}</a>')


def num(value: float | int | None, *, digits: int = 4) -> Cell:
    return Cell(text(number(value, digits=digits)), numeric=True)


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


def page(title: str, body: str) -> str:
    """A complete HTML document; ``body`` must already be escaped HTML."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{text(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def figure(png: bytes | None, *, alt: str) -> str:
    if png is None:
        return '<p class="muted">no picture: neither image nor labels were available</p>'
    return f'<img class="figure" src="{data_uri(png)}" alt="{text(alt)}">'


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        ["class", "name", "Dice", "IoU", "HD95 (mm)", "ref volume (ml)", "pred volume (ml)"],
        [[r["class"], r["class_name"], num(r["dice"]), num(r["iou"]), num(r["hd95"], digits=2),
          num(r["volume_ref_ml"], digits=3), num(r["volume_pred_ml"], digits=3)] for r in rows],
    )


def study_page(*, study_id: str, title: str, rows: Sequence[dict[str, Any]], problems: Sequence[dict[str, str]],
               png: bytes | None, paths: dict[str, str | None]) -> str:
    """One study: metrics table, picture, ingest problems and the relative paths of its files."""
    body = [
        '<p><a href="../index.html">\u2190 cohort summary</a></p>',
        "<h2>Metrics</h2>", metrics_table(rows),
        '<p class="muted">HD95 is empty (\u2014) where exactly one of reference and prediction is empty.</p>',
        "<h2>Picture</h2>",
        figure(png, alt=f"{study_id}: reference (green) and prediction (magenta) contours"),
        "<h2>Problems found at ingest</h2>",
        bullet_list(f"{p.get('code', '')}: {p.get('message', '')}" for p in problems),
        "<h2>Files</h2>",
        table(["file", "path (relative to its stage folder)"],
              [[_PATH_LABELS.get(k, k), v or "\u2014"] for k, v in paths.items()]),
    ]
    return page(f"{title} \u2014 {study_id}", "\n".join(body))


def provenance_block(records: Sequence[dict[str, Any]]) -> str:
    if not records:
        return '<p class="muted">no stage records given</p>'
    parts = [table(
        ["stage", "status", "config hash", "code version", "seed", "device", "duration (s)"],
        [[r.get("stage"), r.get("status"), r.get("config_hash"), r.get("code_version"), r.get("seed"),
          r.get("device"), num(r.get("duration_s"), digits=1)] for r in records],
    )]
    for r in records:
        timings = r.get("timings") or {}
        if timings:
            parts.append(f"<p>{text(r.get('stage'))} timings (s): "
                         + text(", ".join(f"{k} {v}" for k, v in sorted(timings.items()))) + "</p>")
    packages = next((r.get("packages") for r in records if r.get("packages")), None)
    if packages:
        parts.append("<p>Packages: " + text(", ".join(f"{k} {v}" for k, v in sorted(packages.items()))) + "</p>")
    return "\n".join(parts)


def index_page(*, title: str, class_rows: Sequence[Sequence[Any]], study_rows: Sequence[Sequence[Any]],
               class_names: Sequence[str], failed: Sequence[dict[str, Any]], unpaired: dict[str, list[str]],
               provenance: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """The cohort page: per-class summary, per-study table (worst first), failures, provenance."""
    body = [
        "<h2>Per-class summary</h2>",
        table(["class", "name", "n", "Dice mean \u00b1 std", "Dice median", "HD95 mean \u00b1 std (mm)",
               "HD95 undefined"], class_rows),
        "<h2>Studies (worst mean Dice first)</h2>",
        table(["study", "mean Dice", *[f"Dice {n}" for n in class_names], *[f"HD95 {n}" for n in class_names]],
              study_rows),
        "<h2>Failed studies</h2>",
        bullet_list(f"{f.get('id')}: {f.get('code')}: {f.get('message')}" for f in failed),
        "<h2>Unpaired</h2>",
        "<p>Predictions without reference:</p>", bullet_list(unpaired.get("predictions_without_reference", [])),
        "<p>References without prediction:</p>", bullet_list(unpaired.get("references_without_prediction", [])),
        "<h2>Notes</h2>", bullet_list(notes),
        "<h2>Provenance</h2>", provenance_block(provenance),
    ]
    return page(title, "\n".join(body))
