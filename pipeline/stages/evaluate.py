"""The evaluate stage: pair predictions with reference labels, per-study per-class metrics, cohort summary."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.batch import run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError, StageError
from pipeline.fileio import write_json_atomic, write_text_atomic
from pipeline.inference.predictor import PREDICTIONS_JSON, prediction_paths, read_predictions
from pipeline.io.nifti import load_nifti
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.metrics.segmentation import (
    DECIMALS,
    EMPTY_POLICY,
    ClassMetrics,
    describe,
    integer_labels,
    per_study_csv,
    present_labels,
    segmentation_metrics,
)
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

PER_STUDY_CSV = "per_study.csv"
SUMMARY_JSON = "summary.json"


@dataclass(frozen=True)
class Pair:
    id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class StudyMetrics:
    classes: list[ClassMetrics]
    unexpected: list[int]


def rounded(value: float | int | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return None if math.isnan(value) else round(float(value), DECIMALS)


def _reference_paths(ref: Path) -> tuple[dict[str, Path], dict[str, str] | None, Path | None]:
    """``({id: label file}, labels, manifest)`` for an ingest folder or a plain folder of label NIfTIs."""
    if (ref / MANIFEST_NAME).is_file():
        manifest = load_manifest(ref)
        paths = {s.id: ref / s.label for s in manifest.ok_studies() if s.label}
        return paths, manifest.labels, ref / MANIFEST_NAME
    if not ref.is_dir():
        raise ManifestError(f"{ref}: not an ingest folder or a folder of reference labels")
    return prediction_paths(ref), None, None


def _class_name(labels: dict[str, str] | None, label: int) -> str:
    return (labels or {}).get(str(label), f"class_{label}")


def _evaluate_pair(pair: Pair, *, classes: list[int] | None, percentile: float) -> StudyMetrics:
    pred = load_nifti(pair.prediction)
    ref = load_nifti(pair.reference)
    if not pred.same_grid(ref):
        raise StageError(
            f"{pair.id}: prediction grid (shape {pred.spatial_shape}, {pred.orientation}, spacing "
            f"{tuple(round(s, 4) for s in pred.spacing)}) differs from the reference grid (shape "
            f"{ref.spatial_shape}, {ref.orientation}, spacing {tuple(round(s, 4) for s in ref.spacing)}); "
            "predict on the reference image's grid", study_id=pair.id, code="grid_mismatch")
    p = integer_labels(pred.array, what=f"{pair.id} prediction")
    r = integer_labels(ref.array, what=f"{pair.id} reference")
    found = present_labels(p, r)
    wanted = classes if classes is not None else found
    unexpected = sorted(set(found) - set(wanted))
    rows = segmentation_metrics(p, r, spacing=ref.spacing, classes=wanted, percentile=percentile)
    return StudyMetrics(classes=rows, unexpected=unexpected)


def _summary(rows: list[dict[str, Any]], results: dict[str, StudyMetrics], labels: dict[str, str] | None,
             classes: list[int]) -> dict[str, Any]:
    per_class: dict[str, Any] = {}
    for c in classes:
        mine = [r for r in rows if r["class"] == c]
        metrics = [m for res in results.values() for m in res.classes if m.label == c]
        per_class[str(c)] = {
            "name": _class_name(labels, c),
            "n": len(mine),
            "dice": {k: rounded(v) for k, v in describe(r["dice"] for r in mine).items()},
            "iou": {k: rounded(v) for k, v in describe(r["iou"] for r in mine).items()},
            "hd95": {k: rounded(v) for k, v in describe(r["hd95"] for r in mine).items()},
            "empty": {"both": sum(m.ref_empty and m.pred_empty for m in metrics),
                      "ref_empty": sum(m.ref_empty and not m.pred_empty for m in metrics),
                      "pred_empty": sum(m.pred_empty and not m.ref_empty for m in metrics)},
        }
    return per_class


def evaluate(
    pred: Path,
    ref: Path,
    out: Path,
    *,
    config: PipelineConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compare the label images in ``pred`` with those in ``ref``; write per_study.csv and summary.json.

    Studies pair by id (manifest / predictions.json) or file stem; unpaired ones and failures
    are listed in summary.json. Classes come from the manifest or model labels, else the
    union of values present. Empty masks follow ``pipeline.metrics.segmentation.EMPTY_POLICY``.
    """
    config = config or PipelineConfig()
    pred, ref, out = Path(pred), Path(ref), Path(out)
    pred_paths = prediction_paths(pred)
    ref_paths, labels, manifest_path = _reference_paths(ref)
    inputs: dict[str, Path] = {}
    if (pred / PREDICTIONS_JSON).is_file():
        inputs["predictions"] = pred / PREDICTIONS_JSON
        model_labels = read_predictions(pred).get("model", {}).get("labels")
        labels = labels or model_labels
    inputs.update({f"prediction:{sid}": p for sid, p in pred_paths.items()})
    if manifest_path is not None:
        inputs["manifest"] = manifest_path
    inputs.update({f"reference:{sid}": p for sid, p in ref_paths.items()})
    classes = sorted(int(k) for k in labels if int(k) != 0) if labels else None
    percentile = config.evaluate.hd_percentile

    def work(record: StageRecord) -> list[Path]:
        pairs = [Pair(sid, pred_paths[sid], ref_paths[sid]) for sid in sorted(set(pred_paths) & set(ref_paths))]
        unpaired = {"predictions_without_reference": sorted(set(pred_paths) - set(ref_paths)),
                    "references_without_prediction": sorted(set(ref_paths) - set(pred_paths))}
        for kind, ids in unpaired.items():
            if ids:
                log.warning("evaluate: %d %s: %s", len(ids), kind.replace("_", " "), ", ".join(ids))
        results: dict[str, StudyMetrics] = {}
        failed = []
        for outcome in run_batch(pairs, lambda p: _evaluate_pair(p, classes=classes, percentile=percentile),
                                 key=lambda p: p.id, desc="evaluate"):
            if outcome.ok and outcome.result is not None:
                results[outcome.key] = outcome.result
                record.add(StudyStatus(id=outcome.key, status="ok"))
            else:
                log.warning("evaluate: %s failed: %s", outcome.key, outcome.message)
                failed.append({"id": outcome.key, "code": outcome.code, "message": outcome.message})
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        all_classes = classes if classes is not None else sorted({m.label for r in results.values()
                                                                   for m in r.classes})
        rows = []
        for sid in sorted(results):
            have = {m.label: m for m in results[sid].classes}
            for c in all_classes:
                m = have.get(c) or ClassMetrics.absent(c)
                rows.append({"study": sid, "class": c, "class_name": _class_name(labels, c), "dice": m.dice,
                             "iou": m.iou, "hd95": m.hd, "volume_ref_ml": m.volume_ref_ml,
                             "volume_pred_ml": m.volume_pred_ml})
        write_text_atomic(out / PER_STUDY_CSV, per_study_csv(rows))
        summary = {
            "schema_version": 1,
            "hd_percentile": percentile,
            "empty_policy": EMPTY_POLICY,
            "std": "population (ddof=0)",
            "labels": labels,
            "classes": _summary(rows, results, labels, all_classes),
            "studies": sorted(results),
            "unpaired": unpaired,
            "failed": failed,
            "unexpected_labels": [{"id": sid, "values": r.unexpected} for sid, r in sorted(results.items())
                                  if r.unexpected],
        }
        write_json_atomic(out / SUMMARY_JSON, summary)
        return [out / PER_STUDY_CSV, out / SUMMARY_JSON]

    return execute_stage("evaluate", out, config=config, inputs=inputs, work=work, force=force)

