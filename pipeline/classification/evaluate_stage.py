"""The classification evaluate stage: predictions.csv against the manifest's class labels, metrics with CIs."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classification.inference import CLASSIFICATION_JSON, PREDICTIONS_CSV
from pipeline.classification.metrics import predict, probability_metrics, reliability_diagram
from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError, StageError
from pipeline.fileio import atomic_path, read_json, write_json_atomic, write_text_atomic
from pipeline.manifest import MANIFEST_NAME, Study, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

PER_STUDY_CSV = "per_study.csv"
SUMMARY_JSON = "summary.json"
RELIABILITY_PNG = "reliability.png"
CONFUSION_PNG = "confusion.png"
SUMMARY_SCHEMA = 1
DECIMALS = 6
_HEADLINE = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "ece")


def is_classification_output(pred: str | Path) -> bool:
    """True for an infer folder written by the classifier (predictions.csv and classification.json)."""
    pred = Path(pred)
    return pred.is_dir() and (pred / PREDICTIONS_CSV).is_file() and (pred / CLASSIFICATION_JSON).is_file()


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return round(value, DECIMALS) if math.isfinite(value) else None
    return value


def read_predictions_csv(path: Path) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """(class names, [(study, probabilities)]) of a classifier's predictions.csv."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if len(header) < 4 or header[0] != "study" or header[-1] != "predicted" \
                or not all(h.startswith("prob_") for h in header[1:-1]):
            raise ManifestError(f"{path}: not a classifier predictions.csv (header study, prob_<class>..., "
                                "predicted); run 'medpipe infer' with a classification model again")
        rows = []
        for row in reader:
            try:
                rows.append((row[0], np.array([float(v) for v in row[1:-1]], dtype=np.float64)))
            except (IndexError, ValueError):
                raise ManifestError(f"{path}, line {reader.line_num}: unreadable probabilities; run 'medpipe "
                                    "infer' again") from None
    return [h[len("prob_"):] for h in header[1:-1]], rows


def per_study_text(rows: list[dict[str, Any]], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study", "label", "label_name", "predicted", "predicted_name", "correct",
                     *(f"prob_{c}" for c in classes)])
    for r in rows:
        label = r["label"]
        writer.writerow([r["study"], "" if label is None else label, "" if label is None else classes[label],
                         r["predicted"], classes[r["predicted"]], "" if label is None else int(label == r["predicted"]),
                         *(repr(float(p)) for p in r["probs"])])
    return buffer.getvalue()


def confusion_figure(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """PNG of the confusion matrix (rows: true class, columns: predicted class), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=np.int64)
    size = 1.2 + 0.8 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > cm.max() / 2 else "black", fontsize=10)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="Confusion matrix")
    ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _nothing_to_score(pred: Path, ref: Path, rows: list[tuple[str, np.ndarray]], studies: dict[str, Study],
                      failed: int) -> StageError | None:
    """The error for predictions and a manifest that give no labelled study to score (a wrong folder, almost
    always), or None when at least one study can be scored."""
    known = [sid for sid, _ in rows if sid in studies]
    if any(studies[sid].class_label is not None for sid in known):
        return None
    if not rows:
        why = f"every prediction failed ({failed}; their reasons are in {CLASSIFICATION_JSON})" if failed \
            else f"its {PREDICTIONS_CSV} lists no studies"
        return StageError(f"{pred}: {why}; nothing to evaluate", code="no_pairs")
    if known:
        return StageError(f"{ref}: none of the {len(known)} predicted studies has a class label, so nothing can be "
                          "scored; ingest the scans with their class labels (data.labels_csv in the config, a CSV "
                          "of study and label) and evaluate against that ingest folder", code="no_pairs")
    return StageError(f"no prediction in {pred} is a study of {ref}: predictions are named like "
                      f"{', '.join(sorted(sid for sid, _ in rows)[:2])}, the manifest's studies like "
                      f"{', '.join(sorted(studies)[:2]) or '(none)'}. Predict the ingest folder that holds the class "
                      "labels (medpipe infer --model MODEL INGEST --out PRED)", code="no_pairs")


def evaluate_classification(pred: Path, ref: Path, out: Path, *, config: PipelineConfig | None = None,
                            force: bool = False) -> dict[str, Any]:
    """Score the classifier's probabilities in ``pred`` against the class labels of the manifest in ``ref``.

    Writes per_study.csv (label, prediction, probabilities), summary.json (AUC, accuracy,
    balanced accuracy, sensitivity/specificity at the model's operating point, F1, confusion
    matrix, ECE and reliability bins, bootstrap CIs), reliability.png and confusion.png.
    Studies without a class label are listed, not scored.
    """
    config = config or PipelineConfig()
    ev = config.evaluate
    pred, ref, out = Path(pred), Path(ref), Path(out)
    if not (ref / MANIFEST_NAME).is_file():
        raise ManifestError(f"{ref}: classification is evaluated against an ingest folder (its manifest.json holds "
                            "the class labels); pass the ingest folder as the reference")
    inputs = {"predictions": pred / PREDICTIONS_CSV, "classification": pred / CLASSIFICATION_JSON,
              "manifest": ref / MANIFEST_NAME}
    info = read_json(pred / CLASSIFICATION_JSON)
    classes, rows = read_predictions_csv(pred / PREDICTIONS_CSV)
    studies = load_manifest(ref).by_id()
    nothing = _nothing_to_score(pred, ref, rows, studies, len(info.get("failed") or []))
    if nothing is not None:
        raise nothing

    def work(record: StageRecord) -> list[Path]:
        operating_point = float(info.get("operating_point", 0.5))
        scored, unlabelled, unknown, failed = [], [], [], list(info.get("failed") or [])
        for sid, probs in rows:
            study = studies.get(sid)
            label = study.class_label if study is not None else None
            entry = {"study": sid, "label": label, "probs": probs,
                     "predicted": int(predict(probs[None], operating_point)[0])}
            if study is None:
                unknown.append(sid)
                record.add(StudyStatus(id=sid, status="skipped", code="not_in_manifest",
                                       message="not a study of the reference manifest"))
            elif label is None:
                unlabelled.append(entry)
                record.add(StudyStatus(id=sid, status="skipped", code="no_class_label",
                                       message="no class label: predicted, not scored"))
            elif not 0 <= label < len(classes):
                failed.append({"id": sid, "code": "label_out_of_range",
                               "message": f"class label {label} is not one of the model's {len(classes)} classes"})
                record.add(StudyStatus(id=sid, status="failed", code="label_out_of_range",
                                       message=failed[-1]["message"]))
            else:
                scored.append(entry)
                record.add(StudyStatus(id=sid, status="ok"))
        write_text_atomic(out / PER_STUDY_CSV, per_study_text(scored + unlabelled, classes))
        outputs = [out / PER_STUDY_CSV]
        metrics: dict[str, Any] | None = None
        for stale in (RELIABILITY_PNG, CONFUSION_PNG):
            (out / stale).unlink(missing_ok=True)
        if scored:
            labels = np.array([e["label"] for e in scored], dtype=np.int64)
            probs = np.stack([e["probs"] for e in scored])
            metrics = probability_metrics(labels, probs, operating_point=operating_point, bootstrap=ev.bootstrap,
                                          confidence=ev.confidence, seed=ev.bootstrap_seed)
            reliability_diagram(metrics["reliability"], out / RELIABILITY_PNG,
                                title=f"Reliability (ECE {metrics['ece']:.3f})")
            confusion_figure(metrics["confusion_matrix"], classes, out / CONFUSION_PNG)
            outputs += [out / RELIABILITY_PNG, out / CONFUSION_PNG]
            log.info("evaluate: %d studies, AUC %s, accuracy %.3f", len(scored), metrics.get("auc"),
                     metrics["accuracy"])
        else:
            log.warning("evaluate: none of the %d predicted studies could be scored (%d failed)", len(rows),
                        len(failed))
        summary = {
            "schema_version": SUMMARY_SCHEMA, "task": "classification",
            "classes": {str(i): c for i, c in enumerate(classes)}, "operating_point": operating_point,
            "metrics": _rounded(metrics), "headline": list(_HEADLINE),
            "studies": [e["study"] for e in scored], "unlabelled": [e["study"] for e in unlabelled],
            "not_in_manifest": unknown, "failed": failed, "out_of_fold": bool(info.get("out_of_fold")),
            "models": [{k: m.get(k) for k in ("name", "fold", "temperature", "logit_bias")}
                       for m in info.get("models", [])],
            "definitions": {
                "auc": "ROC AUC of the positive class (2 classes) or macro one-vs-rest (more), scikit-learn",
                "operating_point": f"positive when p(class 1) >= {operating_point} (2 classes), else the argmax",
                "ece": "expected calibration error of the top-class confidence, 10 equal-width bins",
                "ci": f"percentile bootstrap over studies, {ev.bootstrap} resamples, seed {ev.bootstrap_seed}",
                "confidence": ev.confidence, "bootstrap": ev.bootstrap, "bootstrap_seed": ev.bootstrap_seed},
        }
        write_json_atomic(out / SUMMARY_JSON, summary)
        return [*outputs, out / SUMMARY_JSON]

    return execute_stage("evaluate", out, config=config, inputs=inputs, work=work, force=force,
                         extra_hash={"task": "classification"})
