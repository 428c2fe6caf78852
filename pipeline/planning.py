"""Dataset fingerprint (spacing, shape, foreground intensities, class fractions) and the plans built from it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.errors import GeometryError, StageError
from pipeline.io.volume import Volume

PLANS_SCHEMA_VERSION = 1
MAX_SAMPLES_PER_STUDY = 10_000
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class StudyFingerprint:
    """What one study adds to the dataset fingerprint (axes already in the target orientation)."""

    id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    foreground: np.ndarray
    class_counts: dict[int, int]
    modality: str | None = None


def axis_order(affine: np.ndarray, orientation: str) -> list[int]:
    """For each array axis, the axis it becomes once the volume is reoriented to ``orientation``."""
    source = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    target = nib.orientations.axcodes2ornt(tuple(orientation), labels=_RAS_LABELS)
    transform = nib.orientations.ornt_transform(source, target)
    return [int(transform[i, 0]) for i in range(3)]


def _reoriented(values: Sequence[float], order: list[int]) -> list[float]:
    out = [0.0, 0.0, 0.0]
    for i, axis in enumerate(order):
        out[axis] = float(values[i])
    return out


def foreground_samples(values: np.ndarray, *, max_samples: int = MAX_SAMPLES_PER_STUDY) -> np.ndarray:
    """All foreground intensities, or ``max_samples`` of them taken at even strides (deterministic)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size <= max_samples:
        return flat
    index = np.linspace(0, flat.size - 1, num=max_samples).round().astype(np.int64)
    return flat[index]


def study_fingerprint(
    study_id: str,
    image: Volume,
    label: Volume,
    *,
    orientation: str = "RAS",
    modality: str | None = None,
    max_samples: int = MAX_SAMPLES_PER_STUDY,
) -> StudyFingerprint:
    """Measure one image/label pair; the label must lie on the image's grid and hold integer classes."""
    if not image.same_grid(label):
        raise GeometryError(
            f"study {study_id}: image {image.spatial_shape} and label {label.spatial_shape} are not on the same "
            "grid (shape or affine differ); re-export the label on the image grid",
            code="label_grid_mismatch",
        )
    lab = np.asarray(label.array)
    if lab.ndim != 3:
        raise GeometryError(f"study {study_id}: label must be 3D, got shape {lab.shape}", code="label_not_3d")
    if np.issubdtype(lab.dtype, np.floating) and not np.all(np.equal(np.mod(lab, 1), 0)):
        raise StageError(f"study {study_id}: label holds non-integer values; labels must be class indices",
                         study_id=study_id, code="label_not_integer")
    if lab.size and lab.min() < 0:
        raise StageError(f"study {study_id}: label holds negative values", study_id=study_id, code="label_negative")
    classes = lab.astype(np.int64, copy=False)
    counts = np.bincount(classes.ravel())
    order = axis_order(image.affine, orientation)
    img = np.asarray(image.array)
    return StudyFingerprint(
        id=study_id,
        spacing=tuple(_reoriented(image.spacing, order)),  # type: ignore[arg-type]
        shape=tuple(int(s) for s in _reoriented(image.spatial_shape, order)),  # type: ignore[arg-type]
        foreground=foreground_samples(img[classes > 0], max_samples=max_samples),
        class_counts={int(c): int(n) for c, n in enumerate(counts) if n},
        modality=modality,
    )


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "p005": 0.0, "p995": 0.0, "min": 0.0, "max": 0.0, "median": 0.0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "p005": float(np.percentile(values, 0.5)),
        "p995": float(np.percentile(values, 99.5)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "median": float(np.median(values)),
    }


def dataset_fingerprint(studies: Sequence[StudyFingerprint]) -> dict[str, Any]:
    """Median spacing and shape, pooled foreground intensity statistics, class voxel fractions, modality."""
    if not studies:
        raise StageError("no studies to fingerprint; the training set is empty", code="empty_training_set")
    studies = sorted(studies, key=lambda s: s.id)
    spacings = np.array([s.spacing for s in studies], dtype=np.float64)
    shapes = np.array([s.shape for s in studies], dtype=np.float64)
    totals: Counter[int] = Counter()
    for s in studies:
        totals.update(s.class_counts)
    voxels = sum(totals.values())
    modalities = Counter(s.modality for s in studies if s.modality)
    pooled = np.concatenate([s.foreground for s in studies]) if studies else np.zeros(0)
    return {
        "n_studies": len(studies),
        "median_spacing": [round(float(v), 6) for v in np.median(spacings, axis=0)],
        "min_spacing": [round(float(v), 6) for v in spacings.min(axis=0)],
        "max_spacing": [round(float(v), 6) for v in spacings.max(axis=0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "min_shape": [int(v) for v in shapes.min(axis=0)],
        "max_shape": [int(v) for v in shapes.max(axis=0)],
        "intensity": _stats(pooled),
        "foreground_samples": int(pooled.size),
        "class_fractions": {str(c): totals[c] / voxels for c in sorted(totals)} if voxels else {},
        "modality": modalities.most_common(1)[0][0] if modalities else None,
    }


def make_plans(
    fingerprint: dict[str, Any],
    *,
    config: PreprocessConfig,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The plans: target grid, normalisation, patch size and classes (what preprocessing and training follow)."""
    present = [int(c) for c in fingerprint.get("class_fractions", {})]
    declared = [int(k) for k in (labels or {})]
    num_classes = max([*present, *declared, 1]) + 1
    names = {str(k): v for k, v in sorted(((int(k), v) for k, v in (labels or {}).items()))}
    for c in range(num_classes):
        names.setdefault(str(c), "background" if c == 0 else f"class_{c}")
    names = {str(c): names[str(c)] for c in range(num_classes)}
    spacing = config.spacing if config.spacing is not None else fingerprint["median_spacing"]
    stats = fingerprint["intensity"]
    median_shape = np.array(fingerprint["median_shape"], dtype=np.float64)
    resampled = median_shape * np.array(fingerprint["median_spacing"]) / np.array(spacing, dtype=np.float64)
    fingerprint = {**fingerprint, "median_shape_resampled": [round(float(v), 3) for v in resampled]}
    return {
        "schema_version": PLANS_SCHEMA_VERSION,
        "orientation": config.orientation,
        "target_spacing": [float(v) for v in spacing],
        "normalization": config.normalization,
        "crop_foreground": bool(config.crop_foreground),
        "patch_size": [int(v) for v in config.patch_size],
        "num_classes": int(num_classes),
        "labels": names,
        "modality": fingerprint.get("modality"),
        "intensity": {k: float(stats[k]) for k in ("mean", "std", "p005", "p995")},
        "fingerprint": fingerprint,
    }
