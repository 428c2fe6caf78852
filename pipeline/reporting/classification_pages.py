"""Report sections for classification: metrics with CIs, confusion matrix, calibration, per-study probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.reporting import html
from pipeline.reporting.html import DASH
from pipeline.reporting.pages import Section

METRIC_LABELS = (("auc", "AUC"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                 ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("f1", "F1"),
                 ("ece", "expected calibration error"))


def _class_name(classes: dict[str, str], index: int | None) -> str:
    return DASH if index is None else classes.get(str(index), f"class_{index}")


# ---- per study ------------------------------------------------------------------------------


def study_sections(*, study_id: str, classes: dict[str, str], probabilities: Sequence[float], predicted: int,
                   label: int | None, gradcam_png: bytes | None) -> list[Section]:
    """The class probabilities (predicted and true class marked) and the Grad-CAM slices of one study."""
    rows = [[i, _class_name(classes, i), html.num(p, digits=4), "predicted" if i == predicted else "",
             "true class" if i == label else ""] for i, p in enumerate(probabilities)]
    verdict = ("no class label: predicted only" if label is None else
               f"true class {_class_name(classes, label)}, predicted {_class_name(classes, predicted)}: "
               + ("correct" if label == predicted else "wrong"))
    table = html.table(["class", "name", "probability", "", ""], rows)
    picture = html.figure(gradcam_png, alt=f"{study_id}: Grad-CAM of the predicted class over the most relevant slices",
                          missing="no Grad-CAM picture (inference ran without explanations)")
    caption = html.paragraph("Grad-CAM of the predicted class (jet, semi-transparent) over the network's input "
                             "volume, on the axial slices where the map is largest.", css_class="muted")
    return [Section("Classification", html.paragraph(verdict) + "\n" + table),
            Section("Explanation (Grad-CAM)", picture + "\n" + caption)]


# ---- cohort ---------------------------------------------------------------------------------


def metrics_section(summary: dict[str, Any]) -> Section:
    """Each metric with its bootstrap interval, at the model's operating point."""
    metrics = summary.get("metrics")
    if not metrics:
        return Section("Classification metrics", html.paragraph("no labelled study to score", css_class="muted"))
    confidence = summary.get("definitions", {}).get("confidence", 0.95)
    rows = []
    for key, label in METRIC_LABELS:
        if key not in metrics:
            continue
        ci = metrics.get(f"{key}_ci") or [None, None]
        rows.append([label, html.num(metrics.get(key), digits=3), html.numeric_text(html.interval(*ci, digits=3))])
    for i, value in enumerate(metrics.get("sensitivity_per_class") or []):
        rows.append([f"sensitivity ({_class_name(summary.get('classes', {}), i)})", html.num(value, digits=3),
                     html.numeric_text(DASH)])
    note = html.paragraph(f"{metrics.get('n')} labelled studies; operating point {summary.get('operating_point')}"
                          + ("; out-of-fold predictions of the cross-validation folds"
                             if summary.get("out_of_fold") else ""), css_class="muted")
    table = html.table(["metric", "value", f"{confidence:.0%} CI (bootstrap)"], rows)
    return Section("Classification metrics", note + "\n" + table)


def confusion_section(summary: dict[str, Any], png: bytes | None) -> Section:
    metrics = summary.get("metrics") or {}
    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return Section("Confusion matrix", html.paragraph("no labelled study", css_class="muted"))
    classes = summary.get("classes", {})
    names = [_class_name(classes, i) for i in range(len(matrix))]
    table = html.table(["true \\ predicted", *names], [[names[i], *row] for i, row in enumerate(matrix)])
    return Section("Confusion matrix", table + "\n" + html.figure(png, alt="confusion matrix"))


def calibration_section(summary: dict[str, Any], png: bytes | None) -> Section:
    metrics = summary.get("metrics") or {}
    bins = metrics.get("reliability") or []
    table = html.table(["confidence bin", "studies", "accuracy", "mean confidence"],
                       [[html.interval(b.get("low"), b.get("high"), digits=1), b.get("count"),
                         html.num(b.get("accuracy"), digits=3), html.num(b.get("confidence"), digits=3)]
                        for b in bins])
    text = html.paragraph(f"Expected calibration error {html.number(metrics.get('ece'), digits=3)}: the bars are "
                          "the accuracy per confidence bin; the diagonal is perfect calibration.")
    return Section("Calibration", text + "\n" + html.figure(png, alt="reliability diagram", missing="no studies")
                   + "\n" + table)


def studies_section(rows: Sequence[dict[str, Any]], links: dict[str, str], classes: dict[str, str]) -> Section:
    """Scored studies (wrong ones first, then by confidence) and unlabelled ones, linked to their pages."""
    def cell(sid: str) -> html.Cell | str:
        return html.link(links[sid], sid) if sid in links else sid

    table = html.table(
        ["study", "true class", "predicted", "p(predicted)", "correct"],
        [[cell(r["study"]), _class_name(classes, r["label"]), _class_name(classes, r["predicted"]),
          html.num(r["probs"][r["predicted"]], digits=3),
          DASH if r["label"] is None else ("yes" if r["label"] == r["predicted"] else "no")] for r in rows])
    return Section("Studies (wrong predictions first)", table)


def failures_section(summary: dict[str, Any], failed: Sequence[dict[str, Any]]) -> Section:
    body = [html.bullet_list(f"{f.get('id')}: {f.get('code')}: {f.get('message')}" for f in failed),
            html.paragraph("Predicted studies not in the manifest:"),
            html.bullet_list(summary.get("not_in_manifest", []))]
    return Section("Failed studies", "\n".join(body))


def _calibration_text(model: dict[str, Any]) -> str:
    text = f"temperature {html.number(model.get('temperature'), digits=3)}"
    offsets = model.get("logit_bias")
    if offsets:
        text += ", logit offsets " + " / ".join(html.number(b, digits=3) for b in offsets)
    return text


def definitions_section(summary: dict[str, Any]) -> Section:
    definitions = summary.get("definitions", {})
    items = [f"{k}: {v}" for k, v in definitions.items() if k in ("auc", "operating_point", "ece", "ci")]
    models = summary.get("models") or []
    if models:
        items.append("models: " + ", ".join(f"{m.get('name')} ({_calibration_text(m)})" for m in models))
    return Section("Definitions", html.bullet_list(items))
