"""Enhanced multi-frame DICOM: one FrameInfo per frame from the per-frame and shared functional groups."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from pipeline.io.dicom_header import DicomHeader, FrameInfo, order_key, rescale, slice_geometry
from pipeline.io.dicom_tags import Tags

# functional group macro -> the attributes it contributes to a frame
_MACROS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}
_FRAME_TYPE_MACROS = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence",
                      "XAXRFFrameCharacteristicsSequence")


def _first(item: Dataset | None, keyword: str) -> Dataset | None:
    if item is None:
        return None
    seq = item.get(keyword)
    return seq[0] if seq else None


def _macro(per: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro for one frame: its per-frame item, else the shared one."""
    return _first(per, keyword) or _first(shared, keyword)


def _frame_dataset(ds: Dataset, per: Dataset | None, shared: Dataset | None) -> tuple[Dataset, dict[str, Any]]:
    """The frame's geometry and rescale attributes gathered into one flat data set, plus extras."""
    flat = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept", "SliceThickness", "SpacingBetweenSlices"):
        if keyword in ds:  # top-level values are the fallback (some writers put rescale there)
            flat[keyword] = ds[keyword]
    for macro, keywords in _MACROS.items():
        item = _macro(per, shared, macro)
        for keyword in keywords:
            if item is not None and keyword in item:
                flat[keyword] = item[keyword]
    content = _first(per, "FrameContentSequence")
    echo = _macro(per, shared, "MREchoSequence")
    frame_type = None
    for macro in _FRAME_TYPE_MACROS:
        item = _macro(per, shared, macro)
        if item is not None and "FrameType" in item:
            frame_type = tuple(str(v).upper() for v in item.FrameType)
            break
    extras = {
        "temporal": content.get("TemporalPositionIndex") if content is not None else None,
        "echo_time": float(echo.EffectiveEchoTime) if echo is not None and echo.get("EffectiveEchoTime")
        is not None else None,
        "frame_type": frame_type,
    }
    return flat, extras


def enhanced_frames(ds: Dataset, header: DicomHeader) -> tuple[FrameInfo, ...]:
    """FrameInfo for every frame of an enhanced multi-frame image (geometry errors kept per frame)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if shared_seq else None
    if per_frame and len(per_frame) != header.n_frames:
        geometry, _ = slice_geometry(Tags(dataset=Dataset()), header.rel, rows=header.rows, columns=header.columns)
        message = (f"{header.rel}: {len(per_frame)} per-frame functional group items for "
                   f"{header.n_frames} frames")
        return (FrameInfo(index=0, geometry=geometry, geometry_error=message),)
    top = Tags(dataset=ds)
    frames = []
    for index in range(header.n_frames):
        per = per_frame[index] if per_frame else None
        flat, extras = _frame_dataset(ds, per, shared)
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
