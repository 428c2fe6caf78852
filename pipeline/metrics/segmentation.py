"""Segmentation metrics per class in mm (Dice, IoU, HD95, ASSD, NSD, volumes) with an explicit empty-set policy.

Definitions (one foreground class of one study, boolean masks P (prediction) and R (reference)
on one voxel grid; distances in mm from the true voxel spacing):

- Dice = 2|P and R| / (|P| + |R|); IoU = |P and R| / |P or R| (voxel counts).
- Surfaces: the boundary voxels of a mask, i.e. the mask minus its binary erosion with the
  6-neighbourhood (voxels on the image border count as boundary), as MONAI's ``get_mask_edges``.
- d(P->R): for every boundary voxel of P the Euclidean distance (voxel centres, mm) to the
  nearest boundary voxel of R; d(R->P) likewise.
- HD95 = max(percentile_q(d(P->R)), percentile_q(d(R->P))) with q = ``evaluate.hd_percentile``
  (95; linear interpolation), as MONAI's HausdorffDistanceMetric.
- ASSD = mean of d(P->R) and d(R->P) pooled, as MONAI's ``compute_average_surface_distance``
  (symmetric).
- NSD at tolerance t mm = (#{d(P->R) <= t} + #{d(R->P) <= t}) / (#boundary(P) + #boundary(R)),
  boundary voxels counted (MONAI's ``compute_surface_dice`` without sub-voxel areas).
- volume (ml) = voxel count x |det(affine)| / 1000; relative volume error = (V_P - V_R) / V_R.

Empty-set policy (EMPTY_POLICY, also written into summary.json):
- both empty (class absent from both): Dice 1, IoU 1, HD95 0, ASSD 0, NSD 1, relative volume
  error 0 (nothing to find, nothing found); counted as ``both`` in the summary;
- reference empty, prediction not (a false positive): Dice 0, IoU 0, NSD 0, HD95 and ASSD
  undefined, relative volume error undefined (NaN: an empty CSV cell, ``null`` in JSON);
  counted as ``ref_empty``;
- prediction empty, reference not (a missed structure): Dice 0, IoU 0, NSD 0, HD95 and ASSD
  undefined (NaN), relative volume error -1; counted as ``pred_empty``.
Undefined values are left out of means, medians and intervals and counted as ``n_nan``.
Distances need an orthogonal voxel grid; a sheared grid is refused (GeometryError).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.errors import GeometryError, StageError
from pipeline.io.volume import shear_magnitude

EMPTY_POLICY = (
    "both empty: dice=1, iou=1, hd95=0, assd=0, nsd=1, rel_volume_error=0 (counted as 'both'); "
    "reference empty only (false positive): dice=0, iou=0, nsd=0, hd95/assd/rel_volume_error undefined "
    "(counted as 'ref_empty'); prediction empty only (missed): dice=0, iou=0, nsd=0, hd95/assd undefined, "
    "rel_volume_error=-1 (counted as 'pred_empty'); undefined values are null in JSON, empty CSV cells, "
    "left out of statistics and counted as n_nan"
)
SURFACE_DEFINITION = (
    "boundary voxels (mask minus its 6-neighbourhood erosion), Euclidean distances between voxel centres in mm; "
    "hd95 = max of the two directed percentiles; assd = mean of both directions pooled; nsd counts boundary voxels "
    "within the class tolerance"
)
_MAX_SHEAR = 1e-4
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one foreground class in one study (NaN where the empty-set policy leaves a value undefined)."""

    label: int
    dice: float
    iou: float
    hd: float
    assd: float
    nsd: float
    nsd_tolerance_mm: float
    volume_ref_ml: float
    volume_pred_ml: float
    ref_empty: bool
    pred_empty: bool

    @property
    def rel_volume_error(self) -> float:
        if self.ref_empty:
            return 0.0 if self.pred_empty else math.nan
        return (self.volume_pred_ml - self.volume_ref_ml) / self.volume_ref_ml

    @classmethod
    def absent(cls, label: int, *, nsd_tolerance_mm: float = math.nan) -> ClassMetrics:
        """A class neither mask holds (both empty)."""
        return cls(label=label, dice=1.0, iou=1.0, hd=0.0, assd=0.0, nsd=1.0, nsd_tolerance_mm=nsd_tolerance_mm,
                   volume_ref_ml=0.0, volume_pred_ml=0.0, ref_empty=True, pred_empty=True)


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


def grid_spacing(affine: np.ndarray, *, what: str) -> tuple[tuple[float, float, float], float]:
    """(voxel size along each array axis in mm, voxel volume in ml) of an orthogonal grid; shear is refused."""
    affine = np.asarray(affine, dtype=np.float64)
    if shear_magnitude(affine) > _MAX_SHEAR:
        raise GeometryError(f"{what}: the voxel axes are not orthogonal (sheared grid); surface distances in mm "
                            "need an orthogonal grid: resample the labels first", code="sheared_grid")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2])), abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The slices of ``mask``'s non-zero box grown by ``margin`` voxels (clipped to the array)."""
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n))
                 for c, n in zip(coords, mask.shape, strict=True))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion with the 6-neighbourhood (outside the array counts as empty)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, *,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(d(pred->ref), d(ref->pred)) in mm between boundary voxels of two non-empty boolean masks."""
    if not pred.any() or not ref.any():
        raise StageError("surface distances need two non-empty masks", code="empty_mask")
    # One voxel of margin keeps the erosion at the crop edge identical to the full image's
    # (voxels on the image border stay boundary). Nearest neighbours come from a k-d tree over
    # the boundary voxels (exact Euclidean distances; cost follows the surfaces, not the box).
    box = bounding_box(pred | ref, margin=1)
    scale = np.asarray([float(s) for s in spacing], dtype=np.float64)
    p_points = np.argwhere(boundary(pred[box])) * scale
    r_points = np.argwhere(boundary(ref[box])) * scale
    to_ref = cKDTree(r_points).query(p_points, k=1)[0]
    to_pred = cKDTree(p_points).query(r_points, k=1)[0]
    return np.asarray(to_ref, dtype=np.float64), np.asarray(to_pred, dtype=np.float64)


def class_metrics(pred: np.ndarray, ref: np.ndarray, *, label: int, spacing: Sequence[float],
                  percentile: float = 95.0, nsd_tolerance_mm: float = 2.0,
                  voxel_ml: float | None = None) -> ClassMetrics:
    """Metrics for boolean masks ``pred``/``ref`` on one grid with voxel size ``spacing`` (mm).

    ``voxel_ml`` is the voxel volume (|det(affine)| / 1000); the product of ``spacing`` when None.
    """
    if pred.shape != ref.shape:
        raise StageError(f"class {label}: prediction shape {pred.shape} differs from reference {ref.shape}",
                         code="grid_mismatch")
    if voxel_ml is None:
        voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    vol_pred, vol_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics.absent(label, nsd_tolerance_mm=nsd_tolerance_mm)
    if n_pred == 0 or n_ref == 0:
        return ClassMetrics(label=label, dice=0.0, iou=0.0, hd=math.nan, assd=math.nan, nsd=0.0,
                            nsd_tolerance_mm=nsd_tolerance_mm, volume_ref_ml=vol_ref, volume_pred_ml=vol_pred,
                            ref_empty=n_ref == 0, pred_empty=n_pred == 0)
    inter = int(np.count_nonzero(pred & ref))
    to_ref, to_pred = surface_distances(pred, ref, spacing=spacing)
    hd = max(float(np.percentile(to_ref, percentile)), float(np.percentile(to_pred, percentile)))
    assd = float((to_ref.sum() + to_pred.sum()) / (to_ref.size + to_pred.size))
    within = int(np.count_nonzero(to_ref <= nsd_tolerance_mm)) + int(np.count_nonzero(to_pred <= nsd_tolerance_mm))
    return ClassMetrics(label=label, dice=2.0 * inter / (n_pred + n_ref), iou=inter / (n_pred + n_ref - inter),
                        hd=hd, assd=assd, nsd=within / (to_ref.size + to_pred.size),
                        nsd_tolerance_mm=nsd_tolerance_mm, volume_ref_ml=vol_ref, volume_pred_ml=vol_pred,
                        ref_empty=False, pred_empty=False)


def nsd_tolerances(setting: float | Mapping[str, float], classes: Iterable[int],
                   names: Mapping[str, str] | None = None) -> dict[int, float]:
    """Tolerance in mm per class from ``evaluate.nsd_tolerance_mm``: by class value, then class name, then ``default``.

    A mapping without ``default`` must name every class (StageError otherwise).
    """
    out: dict[int, float] = {}
    for c in classes:
        if not isinstance(setting, Mapping):
            out[c] = float(setting)
            continue
        name = (names or {}).get(str(c))
        for key in (str(c), name, "default"):
            if key is not None and key in setting:
                out[c] = float(setting[key])
                break
        else:
            raise StageError(f"evaluate.nsd_tolerance_mm gives no tolerance for class {c}"
                             f"{f' ({name})' if name else ''}; add it or a 'default' entry", code="nsd_tolerance")
    return out


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], classes: Iterable[int],
                         percentile: float = 95.0, tolerances: Mapping[int, float] | float = 2.0,
                         voxel_ml: float | None = None) -> list[ClassMetrics]:
    """One ClassMetrics per foreground class in ``classes`` (sorted) for label arrays on one grid."""
    wanted = sorted({int(c) for c in classes} - {0})
    tol = tolerances if isinstance(tolerances, Mapping) else dict.fromkeys(wanted, float(tolerances))
    return [class_metrics(pred == c, ref == c, label=c, spacing=spacing, percentile=percentile,
                          nsd_tolerance_mm=tol[c], voxel_ml=voxel_ml) for c in wanted]


def present_labels(*arrays: np.ndarray) -> list[int]:
    """Sorted foreground values found in any of ``arrays``."""
    values: set[int] = set()
    for array in arrays:
        values.update(int(v) for v in np.unique(array))
    return sorted(values - {0})
