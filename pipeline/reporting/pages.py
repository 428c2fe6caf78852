"""Report pages: the per-study page, the cohort page and the comparison page, built from task sections.

A page is a list of ``Section``s. Segmentation provides its sections here; classification
(or any later task) adds its own sections to the same pages without changing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.reporting import html
from pipeline.reporting.html import DASH, Cell

SEGMENTATION_METRICS = (("dice", "Dice", 3), ("iou", "IoU", 3), ("nsd", "NSD", 3), ("hd95", "HD95 (mm)", 2),
                        ("assd", "ASSD (mm)", 2), ("rel_volume_error", "relative volume error", 3),
                        ("volume_ref_ml", "reference volume (ml)", 3), ("volume_pred_ml", "predicted volume (ml)", 3))
_PATH_LABELS = {"image": "image (ingest folder)", "reference": "reference label (ingest folder)",
                "prediction": "prediction (infer folder)", "picture": "picture (studies folder)"}


@dataclass(frozen=True)
class Section:
    """A titled block of escaped HTML on a page."""

    title: str
    body: str

    def render(self) -> str:
        return html.heading(self.title) + "\n" + self.body


def render(title: str, sections: Sequence[Section], *, top: str = "") -> str:
    return html.page(title, "\n".join([top, *(s.render() for s in sections)]))


# ---- per study ------------------------------------------------------------------------------


def segmentation_study_sections(*, study_id: str, rows: Sequence[dict[str, Any]], png: bytes | None,
                                definitions: dict[str, Any]) -> list[Section]:
    """Metrics table and the three-plane picture of one study."""
    table = html.table(
        ["class", "name", "Dice", "IoU", "NSD", "NSD tolerance (mm)", "HD95 (mm)", "ASSD (mm)", "reference (ml)",
         "predicted (ml)", "relative volume error"],
        [[r["class"], r["class_name"], html.num(r["dice"]), html.num(r["iou"]), html.num(r["nsd"]),
          html.num(r.get("nsd_tolerance_mm"), digits=2), html.num(r["hd95"], digits=2), html.num(r["assd"], digits=2),
          html.num(r["volume_ref_ml"], digits=3), html.num(r["volume_pred_ml"], digits=3),
          html.num(r["rel_volume_error"], digits=3)] for r in rows])
    notes = html.paragraph(f"{DASH} marks a value the empty-set policy leaves undefined. Policy: "
                           f"{definitions.get('empty_policy', 'not stated')}", css_class="muted")
    picture = html.figure(png, alt=f"{study_id}: reference (green) and prediction (magenta) contours",
                          missing="no picture: neither image nor labels were available")
    caption = html.paragraph("Sagittal, coronal and axial slices through the structure: reference contours green, "
                             "prediction contours magenta.", css_class="muted")
    return [Section("Segmentation metrics", table + "\n" + notes), Section("Pictures", picture + "\n" + caption)]


def common_study_sections(*, problems: Sequence[dict[str, str]], notes: Sequence[str],
                          paths: dict[str, str | None]) -> list[Section]:
    return [
        Section("Problems found at ingest", html.bullet_list(f"{p.get('code', '')}: {p.get('message', '')}"
                                                             for p in problems)),
        Section("Notes", html.bullet_list(notes)),
        Section("Files", html.table(["file", "path (relative to its stage folder)"],
                                    [[_PATH_LABELS.get(k, k), v or DASH] for k, v in paths.items()])),
    ]


def study_page(*, title: str, study_id: str, sections: Sequence[Section]) -> str:
    top = '<p><a href="../index.html">\u2190 cohort summary</a></p>'
    return render(f"{title} \u2014 {study_id}", sections, top=top)


# ---- cohort ---------------------------------------------------------------------------------


def segmentation_summary_section(summary: dict[str, Any]) -> Section:
    """Per class and metric: n, mean +- std, median [IQR], bootstrap CI of the mean, range, undefined count."""
    confidence = summary.get("definitions", {}).get("confidence", 0.95)
    rows = []
    for key in sorted(summary.get("classes", {}), key=int):
        entry = summary["classes"][key]
        for metric, label, digits in SEGMENTATION_METRICS:
            stats = entry.get(metric) or {}
            rows.append([key, entry.get("name"), label, stats.get("n"),
                         html.numeric_text(html.mean_std(stats, digits=digits)),
                         html.numeric_text(html.median_iqr(stats, digits=digits)),
                         html.numeric_text(html.interval(stats.get("ci_low"), stats.get("ci_high"), digits=digits)),
                         html.numeric_text(html.interval(stats.get("min"), stats.get("max"), digits=digits)),
                         stats.get("n_nan", 0)])
    table = html.table(["class", "name", "metric", "n", "mean \u00b1 std", "median [IQR]",
                        f"{confidence:.0%} CI of the mean", "[min, max]", "undefined"], rows)
    empty = html.table(["class", "name", "NSD tolerance (mm)", "both empty", "reference empty (false positive)",
                        "prediction empty (missed)"],
                       [[k, c.get("name"), html.num(c.get("nsd_tolerance_mm"), digits=2),
                         *((c.get("empty") or {}).get(x, 0) for x in ("both", "ref_empty", "pred_empty"))]
                        for k, c in sorted(summary.get("classes", {}).items(), key=lambda kv: int(kv[0]))])
    return Section("Segmentation summary", table + "\n" + html.heading("Empty masks", 3) + "\n" + empty)


def box_plot_section(png: bytes | None) -> Section:
    return Section("Distributions per class", html.figure(png, alt="box plots of the metrics per class",
                                                          missing="no studies to plot"))


def worst_cases_section(summary: dict[str, Any], links: dict[str, str]) -> Section:
    """Worst studies overall (mean Dice) and per class (Dice), linked to their pages."""
    def study(sid: str) -> Cell | str:
        return html.link(links[sid], sid) if sid in links else sid

    parts = [html.table(["study", "mean Dice over classes"],
                        [[study(w["study"]), html.num(w.get("mean_dice"))] for w in summary.get("worst_studies", [])])]
    for key in sorted(summary.get("classes", {}), key=int):
        entry = summary["classes"][key]
        parts.append(html.heading(f"class {key}: {entry.get('name')}", 3))
        parts.append(html.table(["study", "Dice", "NSD", "HD95 (mm)", "ASSD (mm)"],
                                [[study(w["study"]), html.num(w.get("dice")), html.num(w.get("nsd")),
                                  html.num(w.get("hd95"), digits=2), html.num(w.get("assd"), digits=2)]
                                 for w in entry.get("worst", [])]))
    return Section("Worst cases", "\n".join(parts))


def study_table_section(by_study: dict[str, list[dict[str, Any]]], order: Sequence[str], links: dict[str, str],
                        class_keys: Sequence[int], class_names: dict[int, str]) -> Section:
    headers = ["study", "mean Dice", *[f"Dice {class_names[c]}" for c in class_keys],
               *[f"NSD {class_names[c]}" for c in class_keys], *[f"HD95 {class_names[c]}" for c in class_keys]]
    rows = []
    for sid in order:
        per_class = {r["class"]: r for r in by_study[sid]}
        dice = [r["dice"] for r in by_study[sid]]
        rows.append([html.link(links[sid], sid), html.num(sum(dice) / len(dice) if dice else None),
                     *[html.num(per_class[c]["dice"] if c in per_class else None) for c in class_keys],
                     *[html.num(per_class[c]["nsd"] if c in per_class else None) for c in class_keys],
                     *[html.num(per_class[c]["hd95"] if c in per_class else None, digits=2) for c in class_keys]])
    return Section("Studies (worst mean Dice first)", html.table(headers, rows))


def failures_section(failed: Sequence[dict[str, Any]], unpaired: dict[str, list[str]],
                     unexpected: Sequence[dict[str, Any]]) -> Section:
    body = [html.bullet_list(f"{f.get('id')}: {f.get('code')}: {f.get('message')}" for f in failed),
            html.paragraph("Predictions without reference:"),
            html.bullet_list(unpaired.get("predictions_without_reference", [])),
            html.paragraph("References without prediction:"),
            html.bullet_list(unpaired.get("references_without_prediction", [])),
            html.paragraph("Label values outside the known classes (not evaluated):"),
            html.bullet_list(f"{u.get('id')}: {u.get('values')}" for u in unexpected)]
    return Section("Failed and unpaired studies", "\n".join(body))


def ingest_section(unconverted: Sequence[dict[str, str]] | None) -> Section:
    """The studies found at ingest and not converted (failed or skipped), each with its code and reason;
    None: no ingest folder was given, so the report cannot say."""
    title = "Studies found at ingest but not converted"
    if unconverted is None:
        return Section(title, html.paragraph("not known: the report was made without the ingest folder",
                                             css_class="muted"))
    if not unconverted:
        return Section(title, html.paragraph("none: every study found at ingest was converted"))
    intro = html.paragraph(f"{len(unconverted)} studies found in the scan folder were not converted, so they are "
                           "in no figure above; their entries in the ingest manifest say the same.")
    return Section(title, intro + html.table(["study", "status", "code", "reason"],
                                             [[u["id"], u["status"], u["code"], u["message"]] for u in unconverted]))


def definitions_section(definitions: dict[str, Any]) -> Section:
    items = [f"Empty-set policy: {definitions.get('empty_policy', 'not stated')}",
             f"Surfaces and distances: {definitions.get('surface', 'not stated')}",
             f"HD percentile: {definitions.get('hd_percentile')}; distances in mm from the voxel spacing",
             f"NSD tolerance per class (mm): {definitions.get('nsd_tolerance_mm')}",
             f"Spread: std {definitions.get('std', 'population')}, IQR = q3 - q1",
             f"Intervals: {definitions.get('ci', 'not computed')}, {definitions.get('bootstrap')} resamples, "
             f"seed {definitions.get('bootstrap_seed')}"]
    return Section("Definitions", html.bullet_list(items))


def cohort_page(*, title: str, sections: Sequence[Section], counts: dict[str, int]) -> str:
    top = html.paragraph(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return render(title, sections, top=top)


# ---- paired comparison ----------------------------------------------------------------------


def comparison_page(*, title: str, result: dict[str, Any]) -> str:
    """The page of a paired comparison (comparison.json)."""
    a, b = result.get("a", "A"), result.get("b", "B")
    rows = []
    for key, entry in sorted(result.get("classes", {}).items(), key=lambda kv: int(kv[0])):
        for metric, s in entry.get("metrics", {}).items():
            digits = 2 if metric in ("hd95", "assd") else 4
            rows.append([key, entry.get("name"), metric, s.get("n"), html.num(s.get("mean_a"), digits=digits),
                         html.num(s.get("mean_b"), digits=digits), html.num(s.get("mean_diff"), digits=digits),
                         html.numeric_text(html.interval(s.get("ci_low"), s.get("ci_high"), digits=digits)),
                         html.num(s.get("median_diff"), digits=digits), html.num(s.get("p_value"), digits=4),
                         {"a": a, "b": b}.get(s.get("better") or "", DASH)])
    confidence = result.get("confidence", 0.95)
    table = html.table(["class", "name", "metric", "pairs", f"mean {a}", f"mean {b}", f"mean difference ({b} - {a})",
                        f"{confidence:.0%} CI", "median difference", "Wilcoxon p",
                        f"better (p < {1 - confidence:.2g} and CI excludes 0)"], rows)
    notes = [f"Test: {result.get('test')}", f"Interval: {result.get('ci')}, {result.get('bootstrap')} resamples, "
             f"seed {result.get('bootstrap_seed')}", f"Studies paired: {len(result.get('studies', []))}",
             f"Only in {a}: {', '.join(result.get('only_in_a', [])) or 'none'}",
             f"Only in {b}: {', '.join(result.get('only_in_b', [])) or 'none'}"]
    return render(title, [Section("Paired differences", table), Section("Notes", html.bullet_list(notes))])
