"""A DICOM SEG as the label map of the series it segments: read with highdicom, placed on the series' grid.

Tolerant when reading (highdicom's reader; SEGs whose frames cover only some slices, in any order), strict
about geometry: the SEG's voxels must fall on the series' voxels exactly (an axis permutation, flips and a
whole-voxel shift: directions within 1e-3, positions within 1e-2 of a voxel), inside the series' extent, or the
label is refused with the reason.
Segments become label values by their SegmentNumber; segments that overlap cannot share one label map and are
refused, as are fractional SEGs (probabilities, not a label).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import GeometryError, IngestError
from pipeline.io.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOLERANCE = 1e-3  # of a voxel


def _read(path: str, rel: str) -> Any:
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    try:
        return hd.seg.segread(path)
    except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, OSError) as exc:
        raise IngestError(f"{rel}: not a DICOM SEG that can be read ({type(exc).__name__}: {exc})",
                          code="dicom_seg_unreadable") from None


def _seg_volume(seg: Any, rel: str) -> tuple[np.ndarray, np.ndarray]:
    """(label array, RAS affine) of the SEG's segments combined into one map, values = SegmentNumber."""
    if seg.SegmentationType == "FRACTIONAL":
        raise IngestError(f"{rel}: a FRACTIONAL segmentation (probabilities or occupancy, not classes); a label "
                          "map needs a BINARY or LABELMAP SEG", code="dicom_seg_fractional")
    try:
        volume = seg.get_volume(combine_segments=True)
    except RuntimeError as exc:
        if "overlap" in str(exc):
            raise IngestError(f"{rel}: its segments overlap, so one label map cannot hold them; split it into "
                              "SEGs whose segments do not overlap", code="dicom_seg_overlap") from None
        raise IngestError(f"{rel}: its frames do not form one volume ({exc})", code="dicom_seg_geometry") from None
    except ValueError as exc:
        raise IngestError(f"{rel}: its frames do not form one volume ({exc})", code="dicom_seg_geometry") from None
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise IngestError(f"{rel}: a {array.ndim}D segmentation; only 3D label maps are ingested",
                          code="dicom_seg_geometry")
    return array, _LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)


def _placement(seg_affine: np.ndarray, seg_shape: tuple[int, ...], image: Volume,
               rel: str) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
    """(axis order, flips, offset) that put the SEG's voxels on the image's: GeometryError unless exact."""
    mapping = np.linalg.inv(image.affine) @ seg_affine  # SEG voxel index -> image voxel index
    linear, shift = mapping[:3, :3].copy(), mapping[:3, 3]
    for axis in range(3):  # one frame deep: its thickness (a SEG's own SliceThickness) places nothing
        if seg_shape[axis] == 1:
            linear[:, axis] /= np.linalg.norm(linear[:, axis])
    signs = np.round(linear)
    exact = np.allclose(linear, signs, atol=_TOLERANCE) and sorted(np.abs(signs).sum(axis=0)) == [1, 1, 1] \
        and sorted(np.abs(signs).sum(axis=1)) == [1, 1, 1]
    if not exact or not np.allclose(shift, np.round(shift), atol=_TOLERANCE * 10):
        raise GeometryError(f"{rel}: its voxels do not lie on the series' voxels (the SEG's grid, spacing "
                            f"{np.round(np.linalg.norm(seg_affine[:3, :3], axis=0), 4).tolist()} mm, is not the "
                            "series' grid shifted by whole voxels); a label map must share the image's grid",
                            code="dicom_seg_grid")
    order = tuple(int(np.argmax(np.abs(signs[axis]))) for axis in range(3))  # image axis <- SEG axis
    flips = tuple(bool(signs[axis, order[axis]] < 0) for axis in range(3))
    sizes = [seg_shape[order[axis]] for axis in range(3)]
    start = [int(round(shift[axis])) - (sizes[axis] - 1 if flips[axis] else 0) for axis in range(3)]
    if any(s < 0 or s + n > limit for s, n, limit in zip(start, sizes, image.spatial_shape, strict=True)):
        raise GeometryError(f"{rel}: it reaches beyond the series ({sizes} voxels from {start}, the series has "
                            f"{list(image.spatial_shape)}); is it the segmentation of another series?",
                            code="dicom_seg_grid")
    return order, flips, tuple(start)


def seg_label(path: str, image: Volume, *, rel: str) -> np.ndarray:
    """The SEG at ``path`` (``rel`` names it in messages) as a label array on ``image``'s grid (segment names
    come from its header, which ingest reads when it pairs the SEG with its series)."""
    if image.array.ndim != 3:
        raise IngestError(f"{rel}: a segmentation of a 4D series; only 3D series take a SEG as their label",
                          code="dicom_seg_geometry")
    seg = _read(path, rel)
    array, affine = _seg_volume(seg, rel)
    order, flips, start = _placement(affine, array.shape, image, rel)
    placed = np.transpose(array, order)
    placed = placed[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]
    label = np.zeros(image.spatial_shape, dtype=array.dtype)
    label[tuple(slice(s, s + n) for s, n in zip(start, placed.shape, strict=True))] = placed
    return label
