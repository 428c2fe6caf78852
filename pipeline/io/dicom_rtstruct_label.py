"""A DICOM RT Structure Set as the label map of the series it outlines: closed planar contours filled on its slices.

A structure set usually holds structures that overlap (the body, nested target volumes), so the ROIs to
convert are named by the user (``ingest.rtstruct_rois``): the n-th listed name (a glob, case-insensitive,
matched against each ROIName) becomes label value n, and where listed ROIs overlap the one listed later
takes the voxel (recorded as a problem). A voxel belongs to an ROI when its centre lies inside an odd
number of the ROI's contours on its slice (a contour inside another is a hole). Strict about geometry: a
contour must lie in one of the series' slices (within 0.1 voxel); one between slices or across them is
refused, never snapped. Points, open contours and flat ones outline no area and are left out, recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from pipeline.errors import GeometryError, IngestError
from pipeline.io.volume import Volume

_ON_SLICE = 0.1  # of a voxel: how far a contour's points may lie from the plane of a slice
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _read(path: str, rel: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError, TypeError) as exc:
        raise IngestError(f"{rel}: not an RT structure set that can be read ({type(exc).__name__}: {exc})",
                          code="rtstruct_unreadable") from None


def roi_names(ds: Any) -> dict[int, str]:
    """ROINumber -> ROIName of a structure set."""
    return {int(item.ROINumber): str(item.get("ROIName", "") or f"roi_{int(item.ROINumber)}")
            for item in ds.get("StructureSetROISequence", []) if "ROINumber" in item}


def _fill(mask: np.ndarray, points: np.ndarray, inverse: np.ndarray, where: str) -> bool:
    """XOR the voxels whose centres lie inside one closed planar contour (LPS points, mm) into ``mask``; False for
    a contour that encloses no area (its points on a line)."""
    from matplotlib.path import Path as Polygon

    voxels = (inverse[:3, :3] @ (points * _LPS_TO_RAS).T).T + inverse[:3, 3]
    spread = voxels.max(axis=0) - voxels.min(axis=0)
    if np.count_nonzero(spread <= _ON_SLICE) > 1:
        return False
    axis = int(np.argmin(spread))
    depth = float(voxels[:, axis].mean())
    index = int(round(depth))
    if spread[axis] > _ON_SLICE or abs(depth - index) > _ON_SLICE:
        raise GeometryError(f"{where} does not lie in one of the series' slices (it is {spread[axis]:.2f} voxels "
                            f"thick and {abs(depth - index):.2f} voxels from the nearest slice); is the structure set "
                            "drawn on another series?", code="rtstruct_off_grid")
    if not 0 <= index < mask.shape[axis]:
        raise GeometryError(f"{where} lies outside the series (slice {index} of {mask.shape[axis]})",
                            code="rtstruct_off_grid")
    plane = [a for a in range(3) if a != axis]
    flat = voxels[:, plane]
    low = np.maximum(np.floor(flat.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(flat.max(axis=0)).astype(int), [mask.shape[a] - 1 for a in plane])
    if (high < low).any():
        return True
    grid = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1), indexing="ij")
    inside = Polygon(flat).contains_points(np.column_stack([g.ravel() for g in grid])).reshape(grid[0].shape)
    region: list[int | slice] = [slice(None)] * 3
    region[axis] = index
    region[plane[0]], region[plane[1]] = slice(low[0], high[0] + 1), slice(low[1], high[1] + 1)
    mask[tuple(region)] ^= inside
    return True


def _roi_mask(contours: Sequence[Any], image: Volume, inverse: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """(the ROI's voxels, how many of its contours outline no area and were left out)."""
    mask = np.zeros(image.spatial_shape, dtype=bool)
    left_out = 0
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR").upper()
        data = np.asarray(contour.get("ContourData", []) or [], dtype=np.float64)
        if kind != "CLOSED_PLANAR" or data.size < 9 or data.size % 3 or \
                not _fill(mask, data.reshape(-1, 3), inverse, f"{where}: a contour"):
            left_out += 1
    return mask, left_out


def rtstruct_label(path: str, image: Volume, *, rois: Sequence[str], rel: str) -> tuple[np.ndarray,
                                                                                      list[tuple[str, str]]]:
    """(label array on ``image``'s grid, problems) from the structure set at ``path``: the ROIs matching ``rois``
    (n-th pattern -> value n); ``rel`` names the file in messages."""
    if image.array.ndim != 3:
        raise IngestError(f"{rel}: a structure set of a 4D series; only 3D series take one as their label",
                          code="rtstruct_geometry")
    ds = _read(path, rel)
    names = roi_names(ds)
    contours = {int(item.ReferencedROINumber): list(item.get("ContourSequence", []) or [])
                for item in ds.get("ROIContourSequence", []) if "ReferencedROINumber" in item}
    inverse = np.linalg.inv(image.affine)
    label = np.zeros(image.spatial_shape, dtype=np.uint8)
    problems: list[tuple[str, str]] = []
    for value, wanted in enumerate(rois, start=1):
        numbers = [n for n, name in names.items() if fnmatchcase(name.casefold(), wanted.casefold())]
        if not numbers:
            problems.append(("rtstruct_roi_missing", f"{rel}: no ROI matches {wanted!r} (its ROIs: "
                                                     f"{', '.join(sorted(names.values()))}); label value {value} "
                                                     "is absent from this study"))
            continue
        mask = np.zeros(image.spatial_shape, dtype=bool)
        for number in numbers:
            roi, left_out = _roi_mask(contours.get(number, []), image, inverse, f"{rel}: ROI {names[number]!r}")
            mask |= roi
            if left_out:
                problems.append(("rtstruct_open_contour", f"{rel}: {left_out} contour(s) of ROI {names[number]!r} "
                                                          "are points, open or flat, which outline no "
                                                          "area; left out"))
        overlap = int(np.count_nonzero(mask & (label > 0)))
        if overlap:
            problems.append(("rtstruct_overlap", f"{rel}: {overlap} voxels of {wanted!r} lie in ROIs listed before "
                                                 f"it in ingest.rtstruct_rois; they take value {value}, the later "
                                                 "listed"))
        label[mask] = value
    return label, problems
