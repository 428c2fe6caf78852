"""The evaluate stage: pair predictions with reference labels, per-study per-class metrics, cohort summary."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batch import run_batch
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.errors import ManifestError, StageError
from pipeline.fileio import write_json_atomic, write_text_atomic
from pipeline.inference.folder_inputs import label_folder
from pipeline.inference.predictor import PREDICTIONS_JSON, prediction_paths, read_predictions
from pipeline.io.nifti import load_nifti
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.metrics.segmentation import (
    EMPTY_POLICY,
    SURFACE_DEFINITION,
    ClassMetrics,
    grid_spacing,
    integer_labels,
    nsd_tolerances,
    present_labels,
    segmentation_metrics,
)
from pipeline.metrics.statistics import CI_METHOD, STD, describe, worst
from pipeline.metrics.table import DECIMALS, METRICS, per_study_csv
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

PER_STUDY_CSV = "per_study.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_SCHEMA = 2


@dataclass(frozen=True)
class Pair:
    id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class StudyMetrics:
    classes: list[ClassMetrics]
    unexpected: list[int]


def rounded(value: Any) -> Any:
    """JSON-ready numbers: floats rounded to DECIMALS, NaN/inf -> None; dicts and lists recursively."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    value = float(value)
    return round(value, DECIMALS) if math.isfinite(value) else None


def _label_paths(folder: Path, side: str) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """``({id: label file}, refused)`` of an infer folder (predictions.json) or a plain folder of label NIfTIs,
    whose files refused unread (two sharing a stem, a link leaving the folder) are failures: never one
    silently paired in place of another."""
    if (folder / PREDICTIONS_JSON).is_file() or not folder.is_dir():
        return prediction_paths(folder), []
    paths, refused = label_folder(folder)
    return paths, [{"id": image.id, "code": image.error[0], "message": f"{side}: {image.error[1]}"}
                   for image in refused if image.error is not None]


def _reference_paths(ref: Path) -> tuple[dict[str, Path], dict[str, str] | None, Path | None, list[dict[str, Any]]]:
    """``({id: label file}, labels, manifest, refused)`` for an ingest folder or a plain folder of label NIfTIs."""
    if (ref / MANIFEST_NAME).is_file():
        manifest = load_manifest(ref)
        paths = {s.id: ref / s.label for s in manifest.ok_studies() if s.label}
        return paths, manifest.labels, ref / MANIFEST_NAME, []
    if not ref.is_dir():
        raise ManifestError(f"{ref}: not an ingest folder or a folder of reference labels")
    paths, refused = _label_paths(ref, "reference")
    return paths, None, None, refused


def _nothing_to_pair(pred: Path, ref: Path, pred_paths: dict[str, Path], ref_paths: dict[str, Path], *,
                     from_manifest: bool, infer_failed: int) -> StageError:
    """The error for a prediction and a reference folder that give no pair: a wrong folder, almost always."""
    if not pred_paths and infer_failed:
        return StageError(f"{pred}: every prediction failed ({infer_failed}; their reasons are in its record.json); "
                          "nothing to evaluate", code="no_pairs")
    if not pred_paths:
        return StageError(f"{pred}: no predictions found; give an infer output folder or a folder of label images "
                          "(.nii/.nii.gz)", code="no_pairs")
    if not ref_paths:
        what = ("its studies carry no labels (ingest the scans together with their label files)" if from_manifest
                else "give an ingest folder with labels or a folder of label images (.nii/.nii.gz)")
        return StageError(f"{ref}: no reference labels found; {what}", code="no_pairs")
    return StageError(f"no prediction in {pred} has a reference in {ref}: predictions are named like "
                      f"{', '.join(sorted(pred_paths)[:2])}, references like {', '.join(sorted(ref_paths)[:2])}. "
                      "Infer and ingest folders pair by study id, plain folders by file stem: predict the ingest "
                      "folder that holds the references (medpipe infer --model MODEL INGEST --out PRED)",
                      code="no_pairs")


def class_name(labels: dict[str, str] | None, label: int) -> str:
    return (labels or {}).get(str(label), f"class_{label}")


def evaluate_pair(pair: Pair, *, classes: list[int] | None, settings: EvaluateConfig,
                  labels: dict[str, str] | None = None) -> StudyMetrics:
    """Metrics of one prediction/reference pair of label NIfTIs (StageError when their grids differ)."""
    pred = load_nifti(pair.prediction)
    ref = load_nifti(pair.reference)
    if not pred.same_grid(ref):
        raise StageError(
            f"{pair.id}: prediction grid (shape {pred.spatial_shape}, {pred.orientation}, spacing "
            f"{tuple(round(s, 4) for s in pred.spacing)}) differs from the reference grid (shape "
            f"{ref.spatial_shape}, {ref.orientation}, spacing {tuple(round(s, 4) for s in ref.spacing)}); "
            "predict on the reference image's grid", study_id=pair.id, code="grid_mismatch")
    if pred.array.ndim != 3 or ref.array.ndim != 3:
        raise StageError(f"{pair.id}: label images must be 3D", study_id=pair.id, code="label_not_3d")
    spacing, voxel_ml = grid_spacing(ref.affine, what=f"{pair.id} reference")
    p = integer_labels(pred.array, what=f"{pair.id} prediction")
    r = integer_labels(ref.array, what=f"{pair.id} reference")
    found = present_labels(p, r)
    wanted = classes if classes is not None else found
    unexpected = sorted(set(found) - set(wanted))
    tolerances = nsd_tolerances(settings.nsd_tolerance_mm, wanted, labels)
    rows = segmentation_metrics(p, r, spacing=spacing, classes=wanted, percentile=settings.hd_percentile,
                                tolerances=tolerances, voxel_ml=voxel_ml)
    return StudyMetrics(classes=rows, unexpected=unexpected)


def metric_row(study: str, m: ClassMetrics, labels: dict[str, str] | None) -> dict[str, Any]:
    """One per_study.csv row."""
    return {"study": study, "class": m.label, "class_name": class_name(labels, m.label), "dice": m.dice,
            "iou": m.iou, "hd95": m.hd, "assd": m.assd, "nsd": m.nsd, "volume_ref_ml": m.volume_ref_ml,
            "volume_pred_ml": m.volume_pred_ml, "rel_volume_error": m.rel_volume_error,
            "nsd_tolerance_mm": m.nsd_tolerance_mm}


def cohort_summary(rows: list[dict[str, Any]], metrics: dict[str, list[ClassMetrics]], *,
                   labels: dict[str, str] | None, classes: list[int], settings: EvaluateConfig) -> dict[str, Any]:
    """Per class: statistics of every metric with bootstrap intervals, empty-set counts, worst studies."""
    per_class: dict[str, Any] = {}
    for c in classes:
        mine = [r for r in rows if r["class"] == c]
        found = [m for ms in metrics.values() for m in ms if m.label == c]
        entry: dict[str, Any] = {"name": class_name(labels, c), "n": len(mine),
                                 "nsd_tolerance_mm": mine[0]["nsd_tolerance_mm"] if mine else None}
        for metric in METRICS:
            entry[metric] = describe((r[metric] for r in mine), samples=settings.bootstrap,
                                     confidence=settings.confidence, seed=settings.bootstrap_seed,
                                     key=(c, metric))
        entry["empty"] = {"both": sum(m.ref_empty and m.pred_empty for m in found),
                          "ref_empty": sum(m.ref_empty and not m.pred_empty for m in found),
                          "pred_empty": sum(m.pred_empty and not m.ref_empty for m in found)}
        entry["worst"] = [{k: r[k] for k in ("study", "dice", "hd95", "assd", "nsd")}
                          for r in worst(mine, metric="dice", count=settings.worst_cases)]
        per_class[str(c)] = entry
    return per_class


def worst_studies(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Studies by mean Dice over their classes, lowest first (ties by id)."""
    by_study: dict[str, list[float]] = {}
    for r in rows:
        by_study.setdefault(r["study"], []).append(r["dice"])
    means = [{"study": s, "mean_dice": float(np.mean(v))} for s, v in by_study.items()]
    return worst(means, metric="mean_dice", count=count)


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
    from pipeline.classification.evaluate_stage import evaluate_classification, is_classification_output

    if is_classification_output(pred):
        return evaluate_classification(Path(pred), Path(ref), Path(out), config=config, force=force)
    settings = config.evaluate
    pred, ref, out = Path(pred), Path(ref), Path(out)
    pred_paths, refused = _label_paths(pred, "prediction")
    ref_paths, labels, manifest_path, refused_ref = _reference_paths(ref)
    refused += refused_ref
    inputs: dict[str, Path] = {}
    not_selected: list[str] = []
    infer_failed = 0
    if (pred / PREDICTIONS_JSON).is_file():
        inputs["predictions"] = pred / PREDICTIONS_JSON
        index = read_predictions(pred)
        labels = labels or index.get("model", {}).get("labels")
        # An infer run over a chosen subset (e.g. the validation split) is evaluated on that subset:
        # references it never set out to predict are not "missing predictions".
        attempted = {e["id"] for e in index["predictions"]} | {e["id"] for e in index.get("failed", [])}
        infer_failed = len(index.get("failed", []))
        not_selected = sorted(set(ref_paths) - attempted)
        ref_paths = {sid: p for sid, p in ref_paths.items() if sid in attempted}
    inputs.update({f"prediction:{sid}": p for sid, p in pred_paths.items()})
    if manifest_path is not None:
        inputs["manifest"] = manifest_path
    inputs.update({f"reference:{sid}": p for sid, p in ref_paths.items()})
    if not set(pred_paths) & set(ref_paths) and not refused:
        raise _nothing_to_pair(pred, ref, pred_paths, ref_paths, from_manifest=manifest_path is not None,
                               infer_failed=infer_failed)
    classes = sorted(int(k) for k in labels if int(k) != 0) if labels else None
    if classes is not None:
        nsd_tolerances(settings.nsd_tolerance_mm, classes, labels)  # a missing tolerance fails before any work

    def one(pair: Pair) -> StudyMetrics:
        return evaluate_pair(pair, classes=classes, settings=settings, labels=labels)

    def work(record: StageRecord) -> list[Path]:
        pairs = [Pair(sid, pred_paths[sid], ref_paths[sid]) for sid in sorted(set(pred_paths) & set(ref_paths))]
        unpaired = {"predictions_without_reference": sorted(set(pred_paths) - set(ref_paths)),
                    "references_without_prediction": sorted(set(ref_paths) - set(pred_paths))}
        for kind, ids in unpaired.items():
            if ids:
                log.warning("evaluate: %d %s: %s", len(ids), kind.replace("_", " "), ", ".join(ids))
        results: dict[str, StudyMetrics] = {}
        failed = list(refused)
        for entry in failed:
            log.warning("evaluate: %s failed: %s", entry["id"], entry["message"])
            record.add(StudyStatus(id=entry["id"], status="failed", code=entry["code"], message=entry["message"]))
        for outcome in run_batch(pairs, one, key=lambda p: p.id, desc="evaluate",
                                  execution=config.execution):
            if outcome.ok and outcome.result is not None:
                results[outcome.key] = outcome.result
                record.add(StudyStatus(id=outcome.key, status="ok"))
            else:
                log.warning("evaluate: %s failed: %s", outcome.key, outcome.message)
                failed.append({"id": outcome.key, "code": outcome.code, "message": outcome.message})
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        all_classes = classes if classes is not None else sorted({m.label for r in results.values()
                                                                   for m in r.classes})
        tolerances = nsd_tolerances(settings.nsd_tolerance_mm, all_classes, labels)
        rows, filled = [], {}
        for sid in sorted(results):
            have = {m.label: m for m in results[sid].classes}
            filled[sid] = [have.get(c) or ClassMetrics.absent(c, nsd_tolerance_mm=tolerances[c]) for c in all_classes]
            rows.extend(metric_row(sid, m, labels) for m in filled[sid])
        write_text_atomic(out / PER_STUDY_CSV, per_study_csv(rows))
        summary = {
            "schema_version": SUMMARY_SCHEMA,
            "task": "segmentation",
            "definitions": {"empty_policy": EMPTY_POLICY, "surface": SURFACE_DEFINITION,
                            "hd_percentile": settings.hd_percentile,
                            "nsd_tolerance_mm": {str(c): tolerances[c] for c in all_classes},
                            "std": STD, "ci": CI_METHOD, "confidence": settings.confidence,
                            "bootstrap": settings.bootstrap, "bootstrap_seed": settings.bootstrap_seed,
                            "units": {"hd95": "mm", "assd": "mm", "volume_ref_ml": "ml", "volume_pred_ml": "ml"}},
            "labels": labels,
            "classes": rounded(cohort_summary(rows, filled, labels=labels, classes=all_classes, settings=settings)),
            "worst_studies": rounded(worst_studies(rows, settings.worst_cases)),
            "studies": sorted(results),
            "unpaired": unpaired,
            "references_not_selected_for_inference": len(not_selected),
            "failed": failed,
            "unexpected_labels": [{"id": sid, "values": r.unexpected} for sid, r in sorted(results.items())
                                  if r.unexpected],
        }
        write_json_atomic(out / SUMMARY_JSON, summary)
        return [out / PER_STUDY_CSV, out / SUMMARY_JSON]

    return execute_stage("evaluate", out, config=config, inputs=inputs, work=work, force=force)
