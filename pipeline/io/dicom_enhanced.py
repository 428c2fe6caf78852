"""Enhanced multi-frame DICOM: one FrameInfo per frame from the per-frame and shared functional groups."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from pipeline.io.dicom_header import DicomHeader, FrameInfo, order_key, rescale, slice_geometry
from pipeline.io.dicom_tags import Tags


def _tag(keyword: str) -> BaseTag:
    """A tag looked up once: reading elements by keyword looks it up on every access (a third of the time that
    gathering the frames of a 3,600-frame file took)."""
    return BaseTag(tag_for_keyword(keyword))


# functional group macro -> the attributes it contributes to a frame
_MACROS = {_tag(macro): tuple(_tag(keyword) for keyword in keywords) for macro, keywords in {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}.items()}
_FRAME_TYPE_MACROS = tuple(_tag(k) for k in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence",
                                              "PETFrameTypeSequence", "XAXRFFrameCharacteristicsSequence"))
_TOP_FALLBACKS = tuple(_tag(k) for k in ("RescaleSlope", "RescaleIntercept", "SliceThickness", "SpacingBetweenSlices"))
_CONTENT, _ECHO = _tag("FrameContentSequence"), _tag("MREchoSequence")
_FRAME_TYPE, _TEMPORAL, _ECHO_TIME = _tag("FrameType"), _tag("TemporalPositionIndex"), _tag("EffectiveEchoTime")
_PER_FRAME, _SHARED = _tag("PerFrameFunctionalGroupsSequence"), _tag("SharedFunctionalGroupsSequence")


def _value(item: Dataset | None, tag: BaseTag) -> Any:
    return item[tag].value if item is not None and tag in item else None


def _first(item: Dataset | None, tag: BaseTag) -> Dataset | None:
    seq = _value(item, tag)
    return seq[0] if seq else None


def _frame_dataset(top: list[Any], per: Dataset | None, shared: dict[BaseTag, Dataset | None]
                   ) -> tuple[Dataset, dict[str, Any]]:
    """The frame's geometry and rescale attributes gathered into one flat data set, plus extras. ``top``: the
    data set's own fallback elements; ``shared``: the shared functional groups' first items, by macro."""
    flat = Dataset()
    for element in top:  # top-level values are the fallback (some writers put rescale there)
        flat[element.tag] = element

    def macro(tag: BaseTag) -> Dataset | None:  # a functional group macro: its per-frame item, else the shared one
        return _first(per, tag) or shared[tag]

    for tag, keywords in _MACROS.items():
        item = macro(tag)
        for keyword in keywords:
            if item is not None and keyword in item:
                flat[keyword] = item[keyword]
    content = _first(per, _CONTENT)
    echo = macro(_ECHO)
    frame_type = None
    for tag in _FRAME_TYPE_MACROS:
        item = macro(tag)
        if item is not None and _FRAME_TYPE in item:
            frame_type = tuple(str(v).upper() for v in item[_FRAME_TYPE].value)
            break
    echo_time = _value(echo, _ECHO_TIME)
    extras = {
        "temporal": _value(content, _TEMPORAL),
        "echo_time": float(echo_time) if echo_time is not None else None,
        "frame_type": frame_type,
    }
    return flat, extras


def enhanced_frames(ds: Dataset, header: DicomHeader) -> tuple[FrameInfo, ...]:
    """FrameInfo for every frame of an enhanced multi-frame image (geometry errors kept per frame)."""
    per_frame = _value(ds, _PER_FRAME) or []
    shared_item = _first(ds, _SHARED)
    shared = {tag: _first(shared_item, tag) for tag in (*_MACROS, *_FRAME_TYPE_MACROS, _ECHO)}
    fallbacks = [ds[tag] for tag in _TOP_FALLBACKS if tag in ds]
    if per_frame and len(per_frame) != header.n_frames:
        geometry, _ = slice_geometry(Tags(dataset=Dataset()), header.rel, rows=header.rows, columns=header.columns)
        message = (f"{header.rel}: {len(per_frame)} per-frame functional group items for "
                   f"{header.n_frames} frames")
        return (FrameInfo(index=0, geometry=geometry, geometry_error=message),)
    top = Tags(dataset=ds)
    frames = []
    for index in range(header.n_frames):
        per = per_frame[index] if per_frame else None
        flat, extras = _frame_dataset(fallbacks, per, shared)
        tags = Tags(dataset=flat)
        name = f"{header.rel} frame {index + 1}"
        geometry, geometry_error = slice_geometry(tags, name, rows=header.rows, columns=header.columns)
        slope, intercept, rescale_error = rescale(tags, name)
        temporal = extras["temporal"]
        echo = extras["echo_time"] if extras["echo_time"] is not None else top.number(0x00180086)
        frames.append(FrameInfo(
            index=index, geometry=geometry, slope=slope, intercept=intercept,
            order=order_key(top, frame=index, temporal=int(temporal) if temporal is not None else None),
            split=(extras["frame_type"] or header.image_type, echo), rescale_error=rescale_error,
            geometry_error=geometry_error))
    return tuple(frames)
