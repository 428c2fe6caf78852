"""DICOM slice geometry: orientation checks, slice ordering, spacing checks and the LPS->RAS affine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNIT_TOL = 1e-3  # |norm - 1| accepted for a direction cosine (then normalised)
_ORTHO_TOL = 1e-4  # |row . col| accepted (matches the NIfTI shear limit downstream)
_SAME_TOL = 1e-4  # orientation / pixel spacing equality across slices
_POS_ABS_TOL_MM = 1e-2  # slice position residual accepted, plus a fraction of the step
_POS_REL_TOL = 1e-2


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry tags of one single-frame image, already parsed into numbers (None when absent)."""

    name: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None


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
        if not np.allclose(s.orientation, first.orientation, atol=_SAME_TOL):  # type: ignore[arg-type]
            raise GeometryError(f"{s.name}: ImageOrientationPatient differs from {first.name}; slices of one "
                                "volume must share one orientation (a localizer or a tilted stack?)",
                                code="dicom_inconsistent_orientation")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=_SAME_TOL):  # type: ignore[arg-type]
            raise GeometryError(f"{s.name}: PixelSpacing {list(s.pixel_spacing or ())} differs from "
                                f"{first.name} ({list(first.pixel_spacing or ())})",
                                code="dicom_inconsistent_spacing")
    spacing = np.asarray(first.pixel_spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(f"{first.name}: PixelSpacing must be positive, got {spacing.tolist()}",
                            code="dicom_bad_spacing")
    if not all(np.all(np.isfinite(s.position)) for s in slices):  # type: ignore[arg-type]
        raise GeometryError(f"{first.name}: ImagePositionPatient holds non-finite values",
                            code="dicom_missing_geometry")


def _single_slice_step(s: SliceGeometry) -> float:
    step = s.spacing_between_slices or s.slice_thickness
    if step is None or not np.isfinite(step) or step <= 0:
        raise GeometryError(f"{s.name}: a single-slice series needs SpacingBetweenSlices or SliceThickness "
                            "for its third voxel size", code="dicom_missing_geometry")
    return float(step)


def series_affine(slices: Sequence[SliceGeometry]) -> tuple[list[int], np.ndarray]:
    """Order slices along the slice normal and return (order, RAS affine).

    Voxel (i, j, k) is column i, row j of the k-th slice in that order (k increases along
    row x column). Refuses duplicate positions, non-uniform spacing and gantry tilt, so the
    affine is always orthogonal and exact.
    """
    if not slices:
        raise GeometryError("empty series", code="dicom_missing_geometry")
    _check_consistent(slices)
    first = slices[0]
    row, col = direction_cosines(first.orientation, name=first.name)  # type: ignore[arg-type]
    normal = np.cross(row, col)
    positions = np.asarray([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    positions, along = positions[order], along[order]
    n = len(slices)
    if n == 1:
        step = _single_slice_step(first)
    else:
        gaps = np.diff(along)
        tol = _POS_ABS_TOL_MM + _POS_REL_TOL * float(np.abs(gaps).max())
        dup = np.flatnonzero(gaps <= _POS_ABS_TOL_MM)
        if dup.size:
            a, b = slices[order[dup[0]]].name, slices[order[dup[0] + 1]].name
            raise GeometryError(f"{a} and {b} lie at the same position ({along[dup[0]]:.3f} mm along the normal); "
                                "the series holds several volumes (echoes, phases or repeats) or duplicates",
                                code="dicom_duplicate_position")
        step = float((along[-1] - along[0]) / (n - 1))
        expected = positions[0] + np.outer(np.arange(n) * step, normal)
        residual = np.linalg.norm(positions - expected, axis=1)
        worst = int(np.argmax(residual))
        if residual[worst] > tol:
            in_plane = positions[worst] - positions[0] - ((positions[worst] - positions[0]) @ normal) * normal
            if np.linalg.norm(in_plane) > tol:
                raise GeometryError(f"{slices[order[worst]].name}: slice positions drift within the image plane "
                                    f"({np.linalg.norm(in_plane):.3f} mm): gantry tilt or a sheared stack, "
                                    "which needs resampling; refusing to write a sheared affine",
                                    code="dicom_gantry_tilt")
            raise GeometryError(f"{slices[order[worst]].name}: non-uniform slice spacing (gaps from "
                                f"{gaps.min():.3f} to {gaps.max():.3f} mm, mean {step:.3f} mm): a missing slice or "
                                "a variable-spacing series; refusing to save it with one spacing",
                                code="dicom_nonuniform_spacing")
    row_spacing, col_spacing = (float(v) for v in first.pixel_spacing)  # type: ignore[union-attr]
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing  # i runs along a row: next column, PixelSpacing[1] apart
    lps[:3, 1] = col * row_spacing  # j runs down a column: next row, PixelSpacing[0] apart
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return order, LPS_TO_RAS @ lps
