"""DICOM slice geometry: orientation checks, slice ordering, spacing checks and the LPS->RAS affine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import GeometryError
from pipeline.io.dicom_slice import SliceGeometry

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNIT_TOL = 1e-3  # |norm - 1| accepted for a direction cosine (then normalised)
_ORTHO_TOL = 1e-4  # |row . col| accepted (matches the NIfTI shear limit downstream)
_SAME_TOL = 1e-4  # orientation / pixel spacing equality across slices
_POS_ABS_TOL_MM = 1e-2  # slice position residual accepted, plus a fraction of the step
_POS_REL_TOL = 1e-2
_SAME_POSITION_MM = 1e-2  # frames closer than this along the normal share a position (4D)


def direction_cosines(orientation: Sequence[float], *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column unit vectors from ImageOrientationPatient, refusing malformed values."""
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise GeometryError(f"{name}: ImageOrientationPatient must be six finite numbers, got {list(orientation)}",
                            code="dicom_bad_orientation")
    row, col = iop[:3], iop[3:]
    for label, vec in (("row", row), ("column", col)):
        norm = float(np.linalg.norm(vec))
        if abs(norm - 1.0) > _UNIT_TOL:
            raise GeometryError(f"{name}: ImageOrientationPatient {label} cosine has length {norm:.4g}, not 1",
                                code="dicom_bad_orientation")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > _ORTHO_TOL:
        raise GeometryError(f"{name}: ImageOrientationPatient row and column cosines are not orthogonal "
                            f"(dot product {float(row @ col):.3g})", code="dicom_bad_orientation")
    return row, col


def _require(value: object, tag: str, name: str) -> None:
    if value is None:
        raise GeometryError(f"{name}: missing {tag}; the slice cannot be placed in space without it",
                            code="dicom_missing_geometry")


def _stack_axes(slices: Sequence[SliceGeometry]) -> tuple[np.ndarray, ...]:
    """Row and column cosines, slice normal, positions and each slice's distance along the normal."""
    _check_consistent(slices)
    first = slices[0]
    row, col = direction_cosines(first.orientation, name=first.name)  # type: ignore[arg-type]
    normal = np.cross(row, col)
    positions = np.asarray([s.position for s in slices], dtype=np.float64)
    return row, col, normal, positions, positions @ normal


def _check_consistent(slices: Sequence[SliceGeometry]) -> None:
    first = slices[0]
    for s in slices:
        _require(s.position, "ImagePositionPatient", s.name)
        _require(s.orientation, "ImageOrientationPatient", s.name)
        _require(s.pixel_spacing, "PixelSpacing", s.name)
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise GeometryError(f"{s.name}: {s.rows}x{s.columns} pixels where {first.name} has "
                                f"{first.rows}x{first.columns}; a series must have one slice size",
                                code="dicom_inconsistent_shape")
    orientations = np.asarray([s.orientation for s in slices], dtype=np.float64)
    bad = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > _SAME_TOL)
    if bad.size:
        raise GeometryError(f"{slices[bad[0]].name}: ImageOrientationPatient differs from {first.name}; slices of "
                            "one volume must share one orientation (a localizer or a tilted stack?)",
                            code="dicom_inconsistent_orientation")
    spacings = np.asarray([s.pixel_spacing for s in slices], dtype=np.float64)
    bad = np.flatnonzero(np.abs(spacings - spacings[0]).max(axis=1) > _SAME_TOL)
    if bad.size:
        other = slices[bad[0]]
        raise GeometryError(f"{other.name}: PixelSpacing {list(other.pixel_spacing or ())} differs from "
                            f"{first.name} ({list(first.pixel_spacing or ())})", code="dicom_inconsistent_spacing")
    if not np.all(np.isfinite(spacings[0])) or np.any(spacings[0] <= 0):
        raise GeometryError(f"{first.name}: PixelSpacing must be positive, got {spacings[0].tolist()}",
                            code="dicom_bad_spacing")
    if not np.all(np.isfinite(np.asarray([s.position for s in slices], dtype=np.float64))):
        raise GeometryError(f"{first.name}: ImagePositionPatient holds non-finite values",
                            code="dicom_missing_geometry")


def _single_slice_step(s: SliceGeometry) -> float:
    step = s.spacing_between_slices or s.slice_thickness
    if step is None or not np.isfinite(step) or step <= 0:
        raise GeometryError(f"{s.name}: a single-slice series needs SpacingBetweenSlices or SliceThickness "
                            "for its third voxel size", code="dicom_missing_geometry")
    return float(step)


@dataclass(frozen=True)
class StackGeometry:
    """One volume's slices sorted along the slice normal, with what makes the stack irregular."""

    order: list[int]  # input slice indices, sorted along row x column
    along: np.ndarray  # sorted positions along the normal, relative to the first slice (mm)
    offsets: np.ndarray  # (n, 3) in-plane offsets of each sorted slice's origin from the first (LPS mm)
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    row_spacing: float  # PixelSpacing[0]: distance between rows
    col_spacing: float  # PixelSpacing[1]: distance between columns
    origin: np.ndarray  # LPS position of the first sorted slice
    step: float  # mean distance between slices (or the single-slice thickness)
    tilted: bool = False  # origins drift within the image plane (gantry tilt, sheared stack)
    irregular: bool = False  # gaps differ (missing slice, variable spacing)
    gaps: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def affine(self, step: float | None = None, origin: np.ndarray | None = None) -> np.ndarray:
        """RAS affine of an orthogonal grid on these axes (voxel i: column, j: row, k: along the normal)."""
        lps = np.eye(4)
        lps[:3, 0] = self.row * self.col_spacing  # i runs along a row: next column, PixelSpacing[1] apart
        lps[:3, 1] = self.col * self.row_spacing  # j runs down a column: next row, PixelSpacing[0] apart
        lps[:3, 2] = self.normal * (self.step if step is None else step)
        lps[:3, 3] = self.origin if origin is None else origin
        return LPS_TO_RAS @ lps

    def tilt_degrees(self) -> float:
        if len(self.order) < 2 or self.along[-1] <= 0:
            return 0.0
        return float(np.degrees(np.arctan2(np.linalg.norm(self.offsets[-1]), self.along[-1])))


def analyse_stack(slices: Sequence[SliceGeometry]) -> StackGeometry:
    """Sort one volume's slices along the normal and measure tilt and spacing irregularity.

    Refuses inconsistent slices and two slices at one position; tilt and irregular gaps are
    reported in the result for the caller's policy (refuse or resample).
    """
    if not slices:
        raise GeometryError("empty series", code="dicom_missing_geometry")
    row, col, normal, positions, along = _stack_axes(slices)
    first = slices[0]
    order = [int(i) for i in np.argsort(along, kind="stable")]
    positions, along = positions[order], along[order]
    row_spacing, col_spacing = (float(v) for v in first.pixel_spacing)  # type: ignore[union-attr]
    rel = positions - positions[0]
    along_rel = along - along[0]
    offsets = rel - np.outer(along_rel, normal)
    common = {"order": order, "along": along_rel, "offsets": offsets, "row": row, "col": col, "normal": normal,
              "row_spacing": row_spacing, "col_spacing": col_spacing, "origin": positions[0]}
    if len(slices) == 1:
        return StackGeometry(**common, step=_single_slice_step(first))
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps <= _POS_ABS_TOL_MM)
    if dup.size:
        a, b = slices[order[dup[0]]].name, slices[order[dup[0] + 1]].name
        raise GeometryError(f"{a} and {b} lie at the same position ({along[dup[0]]:.3f} mm along the normal); "
                            "the series holds several volumes (echoes, phases or repeats) or duplicates",
                            code="dicom_duplicate_position")
    step = float(along_rel[-1] / (len(slices) - 1))
    tol = _POS_ABS_TOL_MM + _POS_REL_TOL * float(gaps.max())
    tilted = bool(np.linalg.norm(offsets, axis=1).max() > tol)
    irregular = bool(np.abs(along_rel - step * np.arange(len(slices))).max() > tol)
    return StackGeometry(**common, step=step, tilted=tilted, irregular=irregular, gaps=gaps)


def tilt_error(stack: StackGeometry, slices: Sequence[SliceGeometry]) -> GeometryError:
    worst = int(np.argmax(np.linalg.norm(stack.offsets, axis=1)))
    return GeometryError(f"{slices[stack.order[worst]].name}: slice positions drift within the image plane "
                         f"({np.linalg.norm(stack.offsets[worst]):.3f} mm, {stack.tilt_degrees():.2f} degrees): "
                         "gantry tilt or a sheared stack; refusing to write a sheared affine (set "
                         "ingest.gantry_tilt=resample to resample it onto an orthogonal grid)",
                         code="dicom_gantry_tilt")


def spacing_error(stack: StackGeometry, slices: Sequence[SliceGeometry]) -> GeometryError:
    expected = stack.step * np.arange(len(stack.order))
    worst = int(np.argmax(np.abs(stack.along - expected)))
    return GeometryError(f"{slices[stack.order[worst]].name}: non-uniform slice spacing (gaps from "
                         f"{stack.gaps.min():.3f} to {stack.gaps.max():.3f} mm, mean {stack.step:.3f} mm): a missing "
                         "slice or a variable-spacing series; refusing to save it with one spacing (set "
                         "ingest.irregular_slices=resample to interpolate onto a regular grid)",
                         code="dicom_nonuniform_spacing")


def series_affine(slices: Sequence[SliceGeometry]) -> tuple[list[int], np.ndarray]:
    """Order slices along the slice normal and return (order, RAS affine).

    Voxel (i, j, k) is column i, row j of the k-th slice in that order (k increases along
    row x column). Refuses duplicate positions, non-uniform spacing and gantry tilt, so the
    affine is always orthogonal and exact.
    """
    stack = analyse_stack(slices)
    if stack.tilted:
        raise tilt_error(stack, slices)
    if stack.irregular:
        raise spacing_error(stack, slices)
    return stack.order, stack.affine()


def group_volumes(slices: Sequence[SliceGeometry], order_keys: Sequence[tuple]) -> list[list[int]]:
    """Split the frames of a series into volumes: ``result[t]`` holds one frame per position.

    Frames sharing a position are ordered by ``order_keys`` (temporal index, acquisition,
    instance): the t-th frame at every position belongs to volume t. Every position must hold
    the same number of frames.
    """
    *_, positions, along = _stack_axes(slices)
    by_position = sorted(range(len(slices)), key=lambda i: (float(along[i]), order_keys[i], i))
    clusters: list[list[int]] = []
    for i in by_position:
        if clusters and along[i] - along[clusters[-1][0]] <= _SAME_POSITION_MM and np.linalg.norm(
                positions[i] - positions[clusters[-1][0]]) <= 5 * _SAME_POSITION_MM:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    counts = sorted({len(c) for c in clusters})
    if len(counts) > 1:
        odd = next(c for c in clusters if len(c) != max(len(x) for x in clusters))
        code = "dicom_duplicate_position" if counts[0] == 1 and len(counts) == 2 and counts[1] == 2 else \
            "dicom_incomplete_volumes"
        names = [slices[i].name for i in next(c for c in clusters if len(c) == counts[-1])[:2]]
        raise GeometryError(f"{' and '.join(names)} lie at the same position while {slices[odd[0]].name}'s "
                            f"position holds {len(odd)} frame(s): {len(clusters)} positions hold "
                            f"{counts} frames; duplicate slices or an incomplete set of volumes",
                            code=code)
    for cluster in clusters:
        cluster.sort(key=lambda i: (order_keys[i], i))
    return [[cluster[t] for cluster in clusters] for t in range(counts[0])]
