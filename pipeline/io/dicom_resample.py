"""Resampling a tilted or irregularly spaced DICOM stack onto an orthogonal, regular grid (by policy)."""

from __future__ import annotations

import numpy as np

from pipeline.errors import GeometryError
from pipeline.io.dicom_geometry import StackGeometry

_MAX_GROWTH = 4  # a regularised stack may hold at most this many times the input slices


def _shift_axis(array: np.ndarray, shift: float, axis: int, fill: float) -> np.ndarray:
    """Linear interpolation of ``array`` at index + ``shift`` along ``axis``; outside reads ``fill``."""
    if abs(shift) < 1e-9:
        return array
    whole = int(np.floor(shift))
    frac = shift - whole
    n = array.shape[axis]
    padded_shape = list(array.shape)
    padded_shape[axis] = n + 2 * (abs(whole) + 2)
    pad = abs(whole) + 2
    padded = np.full(padded_shape, fill, dtype=np.float64)
    index = [slice(None)] * array.ndim
    index[axis] = slice(pad, pad + n)
    padded[tuple(index)] = array
    lo = [slice(None)] * array.ndim
    hi = [slice(None)] * array.ndim
    lo[axis] = slice(pad + whole, pad + whole + n)
    hi[axis] = slice(pad + whole + 1, pad + whole + 1 + n)
    return (1.0 - frac) * padded[tuple(lo)] + frac * padded[tuple(hi)]


def _sample_slice(data: np.ndarray, k: int, stack: StackGeometry, fill: float) -> np.ndarray:
    """Input slice ``k`` (sorted order) resampled onto the first slice's in-plane grid."""
    offset = stack.offsets[k]
    du = float(offset @ stack.row) / stack.col_spacing  # columns (array axis 0)
    dv = float(offset @ stack.col) / stack.row_spacing  # rows (array axis 1)
    plane = data[:, :, k].astype(np.float64)
    return _shift_axis(_shift_axis(plane, -du, 0, fill), -dv, 1, fill)


def resample_stack(data: np.ndarray, stack: StackGeometry, *, regularise: bool,
                   name: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Resample ``data`` (columns, rows, sorted slices[, volumes]) onto an orthogonal grid.

    In-plane drift (gantry tilt) is removed by shifting each slice with bilinear interpolation
    onto the first slice's grid; with ``regularise`` irregular gaps are replaced by the smallest
    gap, interpolating linearly between the two neighbouring slices. Voxels that fall outside
    the acquired data take the series minimum. Returns (array, RAS affine, [(code, what was done)]).
    """
    fill = float(data.min())
    n = len(stack.order)
    if regularise and stack.irregular:
        total = float(stack.along[-1])
        smallest = float(stack.gaps.min())
        count = round(total / smallest) + 1
        if count > _MAX_GROWTH * n:
            raise GeometryError(f"{name}: slice gaps from {smallest:.3f} to {stack.gaps.max():.3f} mm are too "
                                f"irregular to resample ({count} slices from {n})", code="dicom_nonuniform_spacing")
        step = total / (count - 1)
        targets = step * np.arange(count)
    else:
        step = stack.step
        targets = stack.along.copy()
    out = np.empty(data.shape[:2] + (len(targets),) + data.shape[3:], dtype=np.float32, order="F")
    cache: dict[int, np.ndarray] = {}  # the last few resampled input slices (neighbours are reused)

    def plane(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 2:
                cache.clear()
            cache[k] = _sample_slice(data, k, stack, fill) if stack.tilted else data[:, :, k].astype(np.float64)
        return cache[k]

    for j, z in enumerate(targets):
        b = int(np.searchsorted(stack.along, z - 1e-6))
        if b >= n or abs(stack.along[b] - z) <= 1e-6 or not regularise:
            k = min(b, n - 1) if regularise else j
            out[:, :, j] = plane(k)
            continue
        a = b - 1
        weight = (z - stack.along[a]) / (stack.along[b] - stack.along[a])
        out[:, :, j] = (1.0 - weight) * plane(a) + weight * plane(b)
    notes = []
    if stack.tilted:
        notes.append(("dicom_gantry_tilt_resampled", (
            f"{name}: in-plane drift of {np.linalg.norm(stack.offsets[-1]):.2f} mm ({stack.tilt_degrees():.2f} "
            "degrees gantry tilt) removed by bilinear in-plane resampling onto an orthogonal grid")))
    if regularise and stack.irregular:
        notes.append(("dicom_irregular_slices_resampled", (
            f"{name}: gaps from {stack.gaps.min():.3f} to {stack.gaps.max():.3f} mm resampled onto {len(targets)} "
            f"slices {step:.4f} mm apart by linear interpolation")))
    return out, stack.affine(step=step), notes
