"""Dataset fingerprint (spacing, shape, foreground intensities, class fractions) and the plans built from it."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.errors import ConfigError, GeometryError, StageError
from pipeline.io import nib
from pipeline.io.volume import Volume
from pipeline.topology import Topology, check_patch, estimate_training_memory_mb, plan_patch_and_batch

__all__ = ["StudyFingerprint", "dataset_fingerprint", "estimate_training_memory_mb", "make_plans", "planned_spacing",
           "resolve_normalization", "study_fingerprint"]

log = logging.getLogger(__name__)

PLANS_SCHEMA_VERSION = 1
MAX_SAMPLES_PER_STUDY = 10_000
INTENSITY_PERCENTILES = (0.5, 99.5)  # the clipping range of CT normalisation (p005, p995)
SPACING_PERCENTILE = 10  # the low-resolution axis of anisotropic data takes this percentile of its spacings
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class StudyFingerprint:
    """What one study adds to the dataset fingerprint (axes already in the target orientation)."""

    id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    foreground: np.ndarray  # foreground intensity samples; (C, n) for a C-channel image
    class_counts: dict[int, int]
    modality: str | None = None
    cropped_shape: tuple[int, int, int] | None = None  # bounding box of image > 0 (what crop_foreground keeps)


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
    counts = _class_counts(lab)
    order = axis_order(image.affine, orientation)
    img = np.asarray(image.array)
    mask = lab > 0
    if img.ndim == 4:  # channel last: each channel's samples, a row each; cropping keeps where any channel is > 0
        foreground = np.stack([foreground_samples(_masked_in_c_order(img[..., c], mask), max_samples=max_samples)
                               for c in range(img.shape[3])])
        extent = _positive_extent(img.max(axis=3))
    else:
        foreground = foreground_samples(_masked_in_c_order(img, mask), max_samples=max_samples)
        extent = _positive_extent(img)
    return StudyFingerprint(
        id=study_id,
        spacing=tuple(_reoriented(image.spacing, order)),  # type: ignore[arg-type]
        shape=tuple(int(s) for s in _reoriented(image.spatial_shape, order)),  # type: ignore[arg-type]
        foreground=foreground,
        class_counts={int(c): int(n) for c, n in enumerate(counts) if n},
        modality=modality,
        cropped_shape=tuple(int(s) for s in _reoriented(extent, order)),  # type: ignore[arg-type]
    )


def _class_counts(label: np.ndarray, *, slab: int = 1 << 22) -> np.ndarray:
    """``np.bincount`` of every voxel, in memory order (counting needs no other), a slab at a time:
    bincount widens its input to 8-byte integers, 630 MB for a 512 x 512 x 300 uint8 label at once."""
    flat = label.ravel(order="K")
    counts = np.zeros(1, dtype=np.int64)
    for start in range(0, flat.size, slab):
        part = np.bincount(flat[start:start + slab].astype(np.intp, copy=False))
        if part.size > counts.size:
            counts = np.pad(counts, (0, part.size - counts.size))
        counts[: part.size] += part
    return counts


def _masked_in_c_order(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image[mask]`` (its values in C order, which the even-stride samples depend on), without walking a
    Fortran-ordered pair across its memory: the mask is searched in memory order and only the hits sorted."""
    if not (image.flags.f_contiguous and mask.flags.f_contiguous) or image.flags.c_contiguous:
        return image[mask]
    hits = np.flatnonzero(mask.ravel(order="K"))  # Fortran-order positions
    values = image.ravel(order="K")[hits]
    c_positions = np.ravel_multi_index(np.unravel_index(hits, mask.shape, order="F"), mask.shape)
    return values[np.argsort(c_positions, kind="stable")]


def _positive_extent(image: np.ndarray) -> list[int]:
    """Extent of the bounding box of voxels > 0 (CropForeground's default selection); the full shape when none."""
    if image.ndim != 3 or not np.any(image > 0):
        return [int(s) for s in image.shape[:3]]
    extent = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(image > 0, axis=tuple(a for a in range(3) if a != axis)))
        extent.append(int(hit[-1] - hit[0] + 1))
    return extent


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "p005": 0.0, "p995": 0.0, "min": 0.0, "max": 0.0, "median": 0.0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "p005": float(np.percentile(values, INTENSITY_PERCENTILES[0])),
        "p995": float(np.percentile(values, INTENSITY_PERCENTILES[1])),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "median": float(np.median(values)),
    }


def dataset_fingerprint(studies: Sequence[StudyFingerprint]) -> dict[str, Any]:
    """Spacing and shape statistics, pooled foreground intensity statistics, class voxel fractions, modality.

    Shapes are also measured after foreground cropping (``median_cropped_shape``) and the
    dataset's physical volume is summed (``total_volume_mm3``, ``total_cropped_volume_mm3``) so
    planning can count the voxels of the resampled dataset.
    """
    if not studies:
        raise StageError("no studies to fingerprint; the training set is empty", code="empty_training_set")
    studies = sorted(studies, key=lambda s: s.id)
    spacings = np.array([s.spacing for s in studies], dtype=np.float64)
    shapes = np.array([s.shape for s in studies], dtype=np.float64)
    cropped = np.array([s.cropped_shape or s.shape for s in studies], dtype=np.float64)
    voxel_mm3 = np.prod(spacings, axis=1)
    totals: Counter[int] = Counter()
    for s in studies:
        totals.update(s.class_counts)
    voxels = sum(totals.values())
    modalities = Counter(s.modality for s in studies if s.modality)
    if len({s.foreground.shape[:-1] for s in studies}) > 1:
        raise StageError("the studies hold different numbers of image channels; ingest checks them against "
                         "dataset.json's 'modality', so rerun ingest", code="channels_mismatch")
    pooled = np.concatenate([s.foreground for s in studies], axis=-1)
    channels = {"channel_intensity": [_stats(row) for row in pooled]} if pooled.ndim == 2 else {}
    pooled = pooled[0] if pooled.ndim == 2 else pooled
    return {
        "n_studies": len(studies),
        "median_spacing": [round(float(v), 6) for v in np.median(spacings, axis=0)],
        "spacing_p10": [round(float(v), 6) for v in np.percentile(spacings, SPACING_PERCENTILE, axis=0)],
        "min_spacing": [round(float(v), 6) for v in spacings.min(axis=0)],
        "max_spacing": [round(float(v), 6) for v in spacings.max(axis=0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "median_cropped_shape": [float(v) for v in np.median(cropped, axis=0)],
        "min_shape": [int(v) for v in shapes.min(axis=0)],
        "max_shape": [int(v) for v in shapes.max(axis=0)],
        "total_volume_mm3": round(float(np.sum(np.prod(shapes, axis=1) * voxel_mm3)), 3),
        "total_cropped_volume_mm3": round(float(np.sum(np.prod(cropped, axis=1) * voxel_mm3)), 3),
        "intensity": _stats(pooled),  # of the first channel where there are several; channel_intensity: each's
        **channels,
        "intensity_percentiles": list(INTENSITY_PERCENTILES),
        "foreground_samples": int(pooled.size),
        "class_fractions": {str(c): totals[c] / voxels for c in sorted(totals)} if voxels else {},
        "modality": modalities.most_common(1)[0][0] if modalities else None,
    }


def planned_spacing(
    fingerprint: dict[str, Any], *, anisotropy_threshold: float = 3.0
) -> tuple[list[float], int | None]:
    """The target spacing (nnU-Net's rule) and the anisotropic axis it changed (None when isotropic enough).

    The target is the median spacing per axis. The axis with the coarsest median spacing counts
    as anisotropic when both (a) its median spacing is at least ``anisotropy_threshold`` times the
    finest median spacing (max/min of the target), and (b) its median size in voxels times the
    threshold is less than the smallest median size of the other axes (few thick slices, not just
    a coarse axis with many voxels). That axis then takes the 10th percentile of its spacings
    (``spacing_p10``), but never finer than the other axes' coarsest target: resampling thick
    slices to the median would interpolate most studies, while the finer percentile keeps the
    thinner-sliced studies' detail.
    """
    target = [float(v) for v in fingerprint["median_spacing"]]
    sizes = [float(v) for v in fingerprint["median_shape"]]
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    thick = target[coarse] >= anisotropy_threshold * min(target)
    few = sizes[coarse] * anisotropy_threshold < min(sizes[a] for a in others)
    if not (thick and few):
        return target, None
    p10 = float(fingerprint.get("spacing_p10", target)[coarse])
    target[coarse] = max(p10, max(target[a] for a in others))
    return target, coarse


def resolve_normalization(requested: str, modality: str | None) -> str:
    """``auto`` -> ``ct`` for CT (fixed clip and dataset z-score suit calibrated HU), else per-image ``zscore``."""
    if requested != "auto":
        return requested
    return "ct" if modality is not None and modality.strip().upper() == "CT" else "zscore"


def _class_names(fingerprint: dict[str, Any], labels: dict[str, str] | None) -> tuple[int, dict[str, str]]:
    present = [int(c) for c in fingerprint.get("class_fractions", {})]
    declared = [int(k) for k in (labels or {})]
    num_classes = max([*present, *declared, 1]) + 1
    names = {str(k): v for k, v in sorted(((int(k), v) for k, v in (labels or {}).items()))}
    for c in range(num_classes):
        names.setdefault(str(c), "background" if c == 0 else f"class_{c}")
    return num_classes, {str(c): names[str(c)] for c in range(num_classes)}


def _channel_plans(fingerprint: dict[str, Any], channels: Sequence[str], requested: str, ov: dict[str, Any],
                   source: str) -> tuple[list[dict[str, Any]], str]:
    """The plans' ``channels`` (each one's name, normalisation and intensity statistics) for a multi-channel
    dataset, and their common normalisation (``per_channel`` where they differ).

    A plans file's ``channels`` must name the dataset's channels in order; its normalisations and any
    intensities it gives replace the planned ones. ``normalization`` (one method for every channel,
    ``auto`` by each name; ``per_channel``: as planned) applies where it gives none."""
    names = [str(n) for n in channels]
    if "intensity" in ov or ov.get("modality") is not None:
        raise ConfigError(f"{source}: plans keys 'intensity' and 'modality' describe one channel, but this dataset "
                          f"has {len(names)} ({', '.join(names)}); give them per channel under 'channels'")
    stats = fingerprint.get("channel_intensity") or []
    if len(stats) != len(names):
        raise StageError(f"the manifest names {len(names)} channels ({', '.join(names)}) but the images hold "
                         f"{len(stats) or 1}; rerun ingest", code="channels_mismatch")
    given = ov.get("channels")
    if given is not None and [str(c["name"]) for c in given] != names:
        raise ConfigError(f"{source}: plans key 'channels' names {[c['name'] for c in given]}, but this dataset's "
                          f"channels are {names}; list those, in that order")
    requested = "auto" if requested == "per_channel" else requested
    planned = []
    for number, (name, measured) in enumerate(zip(names, stats, strict=True)):
        own = given[number] if given is not None else {}
        intensity = own.get("intensity", measured)
        planned.append({"name": name, "normalization": resolve_normalization(own.get("normalization", requested), name),
                        "intensity": {k: float(intensity[k]) for k in ("mean", "std", "p005", "p995")}})
    methods = {c["normalization"] for c in planned}
    return planned, methods.pop() if len(methods) == 1 else "per_channel"


def make_plans(
    fingerprint: dict[str, Any],
    *,
    config: PreprocessConfig,
    labels: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    overrides_source: str = "plans_file",
    channels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The plans: target grid, normalisation, patch and batch size, network topology and classes.

    Each value comes from (first wins) ``overrides`` (a validated plans file, see
    :mod:`pipeline.plans_file`), the config, or the fingerprint: spacing by
    :func:`planned_spacing`, normalisation by :func:`resolve_normalization`, patch/batch/topology
    by :func:`pipeline.topology.plan_patch_and_batch` for ``config.memory_budget_mb`` on the
    resampled median shape (after foreground cropping when ``crop_foreground``). Several ``channels``
    (their names, from the ingest manifest) give ``channels`` in place of ``intensity``: each one's
    name, normalisation (``auto`` resolved by its name, so a ``CT`` channel gets ``ct``) and intensity
    statistics; ``normalization`` is then their common method, or ``per_channel`` (see :func:`_channel_plans`).
    """
    ov = dict(overrides or {})
    num_classes, names = _class_names(fingerprint, labels)
    num_classes = int(ov.get("num_classes", num_classes))
    if "labels" in ov:
        names = {str(k): str(v) for k, v in sorted((int(k), v) for k, v in ov["labels"].items())}
    anisotropic_axis = None
    if "target_spacing" in ov:
        spacing = [float(v) for v in ov["target_spacing"]]
    elif config.spacing is not None:
        spacing = [float(v) for v in config.spacing]
    else:
        spacing, anisotropic_axis = planned_spacing(fingerprint, anisotropy_threshold=config.anisotropy_threshold)
    crop = bool(ov.get("crop_foreground", config.crop_foreground))
    modality = ov.get("modality", fingerprint.get("modality"))
    stats = fingerprint["intensity"]
    median_spacing = np.array(fingerprint["median_spacing"], dtype=np.float64)
    scale = median_spacing / np.array(spacing, dtype=np.float64)
    resampled = np.array(fingerprint["median_shape"], dtype=np.float64) * scale
    cropped = np.array(fingerprint.get("median_cropped_shape", fingerprint["median_shape"]), dtype=np.float64) * scale
    volume = fingerprint.get("total_cropped_volume_mm3" if crop else "total_volume_mm3")
    voxels = float(volume) / math.prod(spacing) if volume is not None else fingerprint["n_studies"] * float(
        np.prod(cropped if crop else resampled))
    patch = ov.get("patch_size", config.patch_size)
    topology = Topology.from_dict(ov["network"]) if "network" in ov else None
    if patch is not None and topology is not None:
        try:
            check_patch(patch, topology)
        except ValueError as exc:
            source = overrides_source if "patch_size" in ov else f"preprocess.patch_size and {overrides_source}"
            raise ConfigError(f"{source}: plans key 'network': {exc}; make each patch axis a multiple of its "
                              "stride product or drop 'network' to plan it") from None
    plan = plan_patch_and_batch(shape=cropped if crop else resampled, spacing=spacing,
                                budget_mb=config.memory_budget_mb, dataset_voxels=voxels, num_classes=num_classes,
                                in_channels=len(channels) if channels else 1, patch_size=patch, topology=topology,
                                batch_size=ov.get("batch_size"))
    if plan.topology.levels < 3:
        log.warning("planning: patch %s allows only %d network level(s); a U-Net needs 3 or more, so give "
                    "preprocess.patch_size of at least 16 voxels on some axis", plan.patch_size, plan.topology.levels)
    fingerprint = {
        **fingerprint,
        "median_shape_resampled": [round(float(v), 3) for v in resampled],
        "planning_shape": [round(float(v), 3) for v in (cropped if crop else resampled)],
        "anisotropic_axis": anisotropic_axis,
        "dataset_voxels": round(voxels, 1),
        "batch_cap": plan.batch_cap,
        "estimated_memory_mb": plan.memory_mb,
        "memory_budget_mb": float(config.memory_budget_mb),
    }
    requested = ov.get("normalization", config.normalization)
    if channels is not None and len(channels) > 1:
        planned, normalization = _channel_plans(fingerprint, channels, requested, ov, overrides_source)
        intensity_plans: dict[str, Any] = {"channels": planned}
        modality = None
    elif "channels" in ov or requested == "per_channel":
        raise ConfigError(f"{overrides_source}: plans keys 'channels' and normalization 'per_channel' are for images "
                          "of several channels, and this dataset's have one; remove them")
    else:
        intensity = ov.get("intensity", stats)
        normalization = resolve_normalization(requested, modality)
        intensity_plans = {"intensity": {k: float(intensity[k]) for k in ("mean", "std", "p005", "p995")}}
    return {
        "schema_version": PLANS_SCHEMA_VERSION,
        "orientation": ov.get("orientation", config.orientation),
        "target_spacing": [float(v) for v in spacing],
        "normalization": normalization,
        "crop_foreground": crop,
        "patch_size": [int(v) for v in plan.patch_size],
        "batch_size": int(plan.batch_size),
        "num_classes": num_classes,
        "labels": names,
        "modality": modality,
        **intensity_plans,
        "network": plan.topology.as_dict(),
        "fingerprint": fingerprint,
    }
