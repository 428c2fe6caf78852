"""Segmentation metrics per class (Dice, IoU, HD95 in mm, volumes in ml) with an explicit empty-set policy.

Empty-set policy (for one class of one study):
- reference and prediction both empty: Dice 1, IoU 1, HD 0 (nothing to find, nothing found);
- exactly one empty: Dice 0, IoU 0, HD undefined (NaN, written as an empty cell / null) and counted
  in the summary as ``ref_empty`` (false positive) or ``pred_empty`` (missed structure);
- both present: MONAI's DiceMetric and HausdorffDistanceMetric (surface distances, the configured
  percentile, the true voxel spacing so distances are in mm).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from pipeline.errors import ManifestError, StageError

EMPTY_POLICY = (
    "both empty: dice=1, iou=1, hd=0; one empty: dice=0, iou=0, hd=NaN (null/empty cell, "
    "counted as ref_empty or pred_empty); otherwise MONAI DiceMetric and HausdorffDistanceMetric"
)

PER_STUDY_COLUMNS = ("study", "class", "class_name", "dice", "iou", "hd95", "volume_ref_ml", "volume_pred_ml")
DECIMALS = 6


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one foreground class in one study."""

    label: int
    dice: float
    iou: float
    hd: float  # NaN when exactly one of the masks is empty
    volume_ref_ml: float
    volume_pred_ml: float
    ref_empty: bool
    pred_empty: bool

    @classmethod
    def absent(cls, label: int) -> ClassMetrics:
        """A class neither mask holds (both empty)."""
        return cls(label=label, dice=1.0, iou=1.0, hd=0.0, volume_ref_ml=0.0, volume_pred_ml=0.0,
                   ref_empty=True, pred_empty=True)


def integer_labels(array: np.ndarray, *, what: str) -> np.ndarray:
    """The label array as int64; non-integer or negative values are a StageError naming ``what``."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise StageError(f"{what}: label image holds non-integer values; save labels as integers",
                             code="label_not_integer")
    out = np.asarray(array).astype(np.int64, copy=False)
    if out.size and out.min() < 0:
        raise StageError(f"{what}: label image holds negative values", code="label_negative")
    return out


def _bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n))
                 for c, n in zip(coords, mask.shape, strict=True))


def class_metrics(pred: np.ndarray, ref: np.ndarray, *, label: int, spacing: Sequence[float],
                  percentile: float = 95.0) -> ClassMetrics:
    """Metrics for boolean masks ``pred``/``ref`` on one grid with voxel size ``spacing`` (mm)."""
    if pred.shape != ref.shape:
        raise StageError(f"class {label}: prediction shape {pred.shape} differs from reference {ref.shape}",
                         code="grid_mismatch")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    vol_pred, vol_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics.absent(label)
    if n_pred == 0 or n_ref == 0:
        return ClassMetrics(label=label, dice=0.0, iou=0.0, hd=math.nan, volume_ref_ml=vol_ref,
                            volume_pred_ml=vol_pred, ref_empty=n_ref == 0, pred_empty=n_pred == 0)
    box = _bounding_box(pred | ref)  # distances and overlaps only depend on the masks' neighbourhood
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].to(torch.float64)
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None].to(torch.float64)
    dice = float(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, r)[0, 0])
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=percentile, reduction="none")
    hd = float(hd_metric(p, r, spacing=[float(s) for s in spacing])[0, 0])
    inter = int(np.logical_and(pred[box], ref[box]).sum())
    iou = inter / (n_pred + n_ref - inter)
    return ClassMetrics(label=label, dice=dice, iou=iou, hd=hd, volume_ref_ml=vol_ref, volume_pred_ml=vol_pred,
                        ref_empty=False, pred_empty=False)


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float],
                         classes: Iterable[int], percentile: float = 95.0) -> list[ClassMetrics]:
    """One ClassMetrics per foreground class in ``classes`` (sorted) for label arrays on one grid."""
    return [class_metrics(pred == c, ref == c, label=c, spacing=spacing, percentile=percentile)
            for c in sorted({int(c) for c in classes} - {0})]


def present_labels(*arrays: np.ndarray) -> list[int]:
    """Sorted foreground values found in any of ``arrays``."""
    values: set[int] = set()
    for array in arrays:
        values.update(int(v) for v in np.unique(array))
    return sorted(values - {0})


def describe(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, mean, std (population), median, min, max of the finite values; NaNs are counted in ``n_nan``."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out: dict[str, float | int | None] = {"n": int(finite.size), "n_nan": int(arr.size - finite.size)}
    if finite.size == 0:
        out.update({"mean": None, "std": None, "median": None, "min": None, "max": None})
        return out
    out.update({"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite)),
                "min": float(finite.min()), "max": float(finite.max())})
    return out


# ---- the per-study table (evaluate writes it, report reads it) ----------------------------------


def fmt(value: float) -> str:
    """Fixed-point text with DECIMALS digits; NaN (an undefined HD) becomes an empty cell."""
    return "" if math.isnan(value) else f"{value:.{DECIMALS}f}"


def per_study_csv(rows: Iterable[dict[str, Any]]) -> str:
    """CSV text of metric rows (dicts keyed by PER_STUDY_COLUMNS), numbers in fixed-point."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_STUDY_COLUMNS)
    for row in rows:
        writer.writerow([row["study"], row["class"], row["class_name"],
                         *(fmt(float(row[k])) for k in PER_STUDY_COLUMNS[3:])])
    return buffer.getvalue()


def read_per_study(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a per_study.csv with numbers parsed (empty cells -> NaN)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != PER_STUDY_COLUMNS:
                raise ManifestError(f"{path}: expected the columns {', '.join(PER_STUDY_COLUMNS)}")
            rows = []
            for row in reader:
                parsed: dict[str, Any] = {"study": row["study"], "class": int(row["class"]),
                                          "class_name": row["class_name"]}
                parsed.update({k: float(row[k]) if row[k] else math.nan for k in PER_STUDY_COLUMNS[3:]})
                rows.append(parsed)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the per-study metrics ({exc}); run 'medpipe evaluate' first") from None
    except ValueError as exc:
        raise ManifestError(f"{path}: malformed per-study metrics ({exc})") from None
    return rows
