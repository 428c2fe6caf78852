"""Splitting one SeriesInstanceUID into stackable parts, like dcm2niix: orientation, size, echo, image type."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from pipeline.errors import GeometryError
from pipeline.io.dicom_geometry import group_volumes
from pipeline.io.dicom_header import DicomHeader, FrameInfo

_ORIENTATION_TOL = 1e-4  # cosines closer than this belong to one stack
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_LABEL_OBJECTS = (SEG_STORAGE, LABEL_MAP_SEG_STORAGE, RT_STRUCTURE_SET_STORAGE)  # each file a whole segmentation


def _discrete_key(frame: FrameInfo) -> tuple:
    g = frame.geometry
    return (g.rows, g.columns, frame.split)


def _same_orientation(a: tuple | None, b: tuple | None) -> bool:
    """Cosines within the tolerance (NaN never is); plain floats, as numpy costs ~7 us a call on 6 values."""
    if a is None or b is None:
        return a is b
    return a == b or all(abs(x - y) <= _ORIENTATION_TOL for x, y in zip(a, b, strict=True))


def _label(key: tuple, orientation: tuple | None) -> str:
    """A short stable name for one part (a hash of what sets it apart)."""
    text = repr((key, None if orientation is None else tuple(round(v, 3) for v in orientation)))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _part(headers: Sequence[DicomHeader], members: set[tuple[int, int]]) -> list[DicomHeader]:
    """The headers holding ``members`` ((header index, frame index) pairs), restricted to those frames."""
    out = []
    for h_index, header in enumerate(headers):
        frames = tuple(f for f in header.frames if (h_index, f.index) in members)
        if frames:
            out.append(header if len(frames) == len(header.frames) else replace(header, frames=frames))
    return out


def _split_volumes(part: list[DicomHeader]) -> list[list[DicomHeader]]:
    """One part per volume of a 4D part; the part unchanged when it is 3D or its volumes are unclear."""
    refs = [(h_index, f) for h_index, h in enumerate(part) for f in h.frames]
    if len(refs) < 2 or any(f.geometry_error or f.geometry.position is None or f.geometry.orientation is None
                            or f.geometry.pixel_spacing is None for _, f in refs):
        return [part]
    try:
        volumes = group_volumes([f.geometry for _, f in refs], [f.order for _, f in refs])
    except GeometryError:
        return [part]  # decoding the whole part reports the problem
    if len(volumes) == 1:
        return [part]
    return [_part(part, {(refs[i][0], refs[i][1].index) for i in volume}) for volume in volumes]


def split_series(headers: Sequence[DicomHeader], *, split_4d: bool = False) -> list[tuple[str, list[DicomHeader]]]:
    """Parts of one series as (label, headers); the label is "" when the series is not split.

    Image frames are grouped by rows/columns, split key (image type, echo) and orientation
    (within 1e-4); non-image objects form their own part. With ``split_4d`` every volume of a
    4D part becomes its own part (label suffix ``tNNNN``), in acquisition order. Each DICOM SEG or
    RT structure set file is a part of its own (label: its path): each is a whole segmentation, and
    two of them (two readers', or one saved twice) may share a SeriesInstanceUID.
    """
    objects = [h for h in headers if not h.pixels]
    images = [h for h in headers if h.pixels]
    groups: list[tuple[tuple, tuple | None, set[tuple[int, int]]]] = []
    for h_index, header in enumerate(images):
        for frame in header.frames:
            key, orientation = _discrete_key(frame), frame.geometry.orientation
            for g_key, g_orientation, members in groups:
                if g_key == key and _same_orientation(g_orientation, orientation):
                    members.add((h_index, frame.index))
                    break
            else:
                groups.append((key, orientation, {(h_index, frame.index)}))
    parts: list[tuple[str, list[DicomHeader]]] = []
    for key, orientation, members in groups:
        label = _label(key, orientation) if len(groups) > 1 else ""
        part = _part(images, members)
        volumes = _split_volumes(part) if split_4d else [part]
        if len(volumes) == 1:
            parts.append((label, part))
        else:
            parts += [(f"{label}/t{t + 1:04d}" if label else f"t{t + 1:04d}", v) for t, v in enumerate(volumes)]
    if objects:
        parts.append(("objects" if images else "", list(objects)))
    return [apart for part in parts for apart in _segs_apart(*part)]


def split_volume(part: str) -> int | None:
    """The volume number (from 1) that ``split_series`` gave a part of a 4D series (``tNNNN`` last), else None."""
    last = part.rpartition("/")[2]
    return int(last[1:]) if len(last) == 5 and last[0] == "t" and last[1:].isdigit() else None


def _segs_apart(label: str, members: list[DicomHeader]) -> list[tuple[str, list[DicomHeader]]]:
    if len(members) < 2 or any(h.sop_class not in _LABEL_OBJECTS for h in members):
        return [(label, members)]
    return [(f"{label}/{h.rel}" if label else h.rel, [h]) for h in members]
