"""Enhanced multi-frame DICOM: one FrameInfo per frame from the per-frame and shared functional groups.

The groups come from the header walker's bytes (:func:`groups_from_bytes`, explicit VR files: the
common case, without pydicom) or from a pydicom data set (:func:`groups_from_dataset`: implicit VR,
big endian and deflated files). Both give the same items, ``{tag: (VR, value)}`` for the elements
read here and ``{tag: [items]}`` for the sequences, so the frames are gathered by one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.io.dicom_header import (
    PHILIPS_CREATOR,
    PHILIPS_SCALE,
    DicomHeader,
    FrameInfo,
    order_key,
    philips_scale,
    rescale,
    slice_geometry,
)
from pipeline.io.dicom_items import Item, read_items
from pipeline.io.dicom_tags import PER_FRAME_GROUPS, SHARED_GROUPS, FastParseError, RawHeader, Tags, value_tags

# Tags as ints, their keywords in the comments (tests/unit/test_dicom_enhanced.py checks them against pydicom's
# dictionary). Functional group macro -> the attributes it contributes to a frame:
_MACROS: dict[int, tuple[int, ...]] = {
    0x00209113: (0x00200032,),  # PlanePositionSequence: ImagePositionPatient
    0x00209116: (0x00200037,),  # PlaneOrientationSequence: ImageOrientationPatient
    0x00289110: (0x00280030, 0x00180050, 0x00180088),  # PixelMeasuresSequence: PixelSpacing, SliceThickness, ...
    0x00289145: (0x00281053, 0x00281052),  # PixelValueTransformationSequence: RescaleSlope, RescaleIntercept
}
# MRImageFrameTypeSequence, CTImageFrameTypeSequence, PETFrameTypeSequence, XAXRFFrameCharacteristicsSequence
_FRAME_TYPE_MACROS = (0x00189226, 0x00189329, 0x00189751, 0x00189412)
_TOP_FALLBACKS = (0x00281053, 0x00281052, 0x00180050, 0x00180088)  # rescale and thickness at top level
_CONTENT, _ECHO = 0x00209111, 0x00189114  # FrameContentSequence, MREchoSequence
_FRAME_TYPE = 0x00089007  # FrameType
_TEMPORAL = 0x00209128  # TemporalPositionIndex
_ECHO_TIME = 0x00189082  # EffectiveEchoTime
_ECHO_NUMBERS = 0x00180086  # EchoNumbers
# Philips: each frame's private item (2005,140F), in block (2005,14xx) of creator "... DD 005", holds the MR Scale
# Slope (2005,100E) in its own block (2005,10xx) of creator "... DD 001"
_PHILIPS_FRAME_CREATOR, _PHILIPS_FRAME = 0x20050014, 0x2005140F
_KEPT = frozenset({*_MACROS, *(t for tags in _MACROS.values() for t in tags), *_FRAME_TYPE_MACROS, _CONTENT, _ECHO,
                   _FRAME_TYPE, _TEMPORAL, _ECHO_TIME, _PHILIPS_FRAME_CREATOR, _PHILIPS_FRAME, PHILIPS_CREATOR,
                   PHILIPS_SCALE})


@dataclass(frozen=True)
class FunctionalGroups:
    """An enhanced file's per-frame functional group items (one per frame, or none) and its first shared item."""

    per_frame: list[Item]
    shared: Item | None


def groups_from_bytes(data: bytes, raw: RawHeader) -> FunctionalGroups:
    """The functional groups of a file the walker read (``data`` from its start): FastParseError when they are
    beyond its reader (implicit VR, a malformed or UN-encoded item), and pydicom must read them."""
    if raw.implicit or any(tag in raw.sequences and tag not in raw.spans for tag in (PER_FRAME_GROUPS, SHARED_GROUPS)):
        raise FastParseError("functional groups written with implicit VR")
    per_frame = [] if PER_FRAME_GROUPS not in raw.spans else read_items(data, *raw.spans[PER_FRAME_GROUPS],
                                                                        keep=_KEPT)
    shared = [] if SHARED_GROUPS not in raw.spans else read_items(data, *raw.spans[SHARED_GROUPS], keep=_KEPT)
    return FunctionalGroups(per_frame=per_frame, shared=shared[0] if shared else None)


def _item_of(ds: Any, keep: list[Any]) -> Item:
    """A pydicom item as the byte reader gives it (the elements and sequences in ``keep``, BaseTags)."""
    item: Item = {}
    for tag in keep:
        if tag in ds:
            element = ds[tag]
            if element.VR == "SQ":
                item[int(tag)] = [_item_of(i, keep) for i in element.value]
            elif element.value is not None:  # an empty element reads as absent, as Tags reads a data set
                item[int(tag)] = (element.VR.encode(), element.value)
    return item


def groups_from_dataset(ds: Any) -> FunctionalGroups:
    """The functional groups of a pydicom data set."""
    from pydicom.tag import BaseTag

    keep = [BaseTag(tag) for tag in sorted(_KEPT)]  # looked up once: Tag() of an int on every access is slow
    per_frame = ds[PER_FRAME_GROUPS].value if PER_FRAME_GROUPS in ds else None
    shared = ds[SHARED_GROUPS].value if SHARED_GROUPS in ds else None
    return FunctionalGroups(per_frame=[_item_of(item, keep) for item in per_frame or ()],
                            shared=_item_of(shared[0], keep) if shared else None)


def _first(item: Item | None, tag: int) -> Item | None:
    sequence = item.get(tag) if item is not None else None
    return sequence[0] if isinstance(sequence, list) and sequence else None


def _frame_values(top: dict[int, Any], per: Item | None, shared: dict[int, Item | None]
                  ) -> tuple[dict[int, Any], dict[str, Any]]:
    """The frame's geometry and rescale elements gathered into one flat {tag: (VR, value)}, plus extras. ``top``:
    the data set's own fallback elements; ``shared``: the shared functional groups' first items, by macro."""
    flat = dict(top)  # top-level values are the fallback (some writers put rescale there)

    def macro(tag: int) -> Item | None:  # a functional group macro: its per-frame item, else the shared one
        return _first(per, tag) or shared[tag]

    for tag, members in _MACROS.items():
        item = macro(tag)
        if item is not None:
            flat.update((member, item[member]) for member in members if isinstance(item.get(member), tuple))
    frame_type = None
    for tag in _FRAME_TYPE_MACROS:
        item = macro(tag)
        if item is not None and isinstance(item.get(_FRAME_TYPE), tuple):
            frame_type = tuple(v.upper() for v in value_tags(item).strings(_FRAME_TYPE) or ())
            break
    content, echo = _first(per, _CONTENT), macro(_ECHO)
    echo_times = value_tags(echo).floats(_ECHO_TIME)[0] if echo is not None else None
    extras = {
        "temporal": value_tags(content).number(_TEMPORAL) if content is not None else None,
        "echo_time": echo_times[0] if echo_times else None,
        "frame_type": frame_type,
        "philips_scale": _philips_frame_scale(per),
    }
    return flat, extras


def _philips_frame_scale(per: Item | None) -> float | None:
    """The MR Scale Slope in a frame's Philips private item, where both private blocks are Philips'."""
    private = _first(per, _PHILIPS_FRAME)
    if private is None or (value_tags(per).text(_PHILIPS_FRAME_CREATOR) or "").strip() != "Philips MR Imaging DD 005":
        return None
    return philips_scale(value_tags(private))


def enhanced_frames(groups: FunctionalGroups, top: Tags, header: DicomHeader) -> tuple[FrameInfo, ...]:
    """FrameInfo for every frame of an enhanced multi-frame image (geometry errors kept per frame). ``top``: the
    data set's top-level elements."""
    per_frame = groups.per_frame
    shared = {tag: _first(groups.shared, tag) for tag in (*_MACROS, *_FRAME_TYPE_MACROS, _ECHO)}
    fallbacks = {tag: found for tag in _TOP_FALLBACKS if (found := top.element(tag)) is not None}
    top_scale = philips_scale(top)  # where a writer kept it at top level, as in single-frame files
    if per_frame and len(per_frame) != header.n_frames:
        geometry, _ = slice_geometry(value_tags({}), header.rel, rows=header.rows, columns=header.columns)
        message = (f"{header.rel}: {len(per_frame)} per-frame functional group items for "
                   f"{header.n_frames} frames")
        return (FrameInfo(index=0, geometry=geometry, geometry_error=message),)
    frames = []
    for index in range(header.n_frames):
        flat, extras = _frame_values(fallbacks, per_frame[index] if per_frame else None, shared)
        tags = value_tags(flat)
        name = f"{header.rel} frame {index + 1}"
        geometry, geometry_error = slice_geometry(tags, name, rows=header.rows, columns=header.columns)
        slope, intercept, rescale_error = rescale(tags, name)
        echo = extras["echo_time"] if extras["echo_time"] is not None else top.number(_ECHO_NUMBERS)
        frames.append(FrameInfo(
            index=index, geometry=geometry, slope=slope, intercept=intercept,
            order=order_key(top, frame=index, temporal=extras["temporal"]),
            split=(extras["frame_type"] or header.image_type, echo), rescale_error=rescale_error,
            geometry_error=geometry_error, philips_scale=extras["philips_scale"] or top_scale))
    return tuple(frames)
