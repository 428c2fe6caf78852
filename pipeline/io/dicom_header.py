"""What ingest keeps of one DICOM file: identity, pixel coding and one FrameInfo per 2D frame (never PHI)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import FileUnreadable, PackedFile, os_reason
from pipeline.io.dicom_slice import SliceGeometry
from pipeline.io.dicom_tags import (
    PER_FRAME_GROUPS,
    PIXEL_DATA,
    SHARED_GROUPS,
    FastParseError,
    NotDicom,
    RawHeader,
    Tags,
    parse_header,
    parse_prefix,
)

if TYPE_CHECKING:
    from pipeline.io.dicom_enhanced import FunctionalGroups

log = logging.getLogger(__name__)

_DEFER_BYTES = 1024  # pydicom fallback never loads values larger than this at discovery
_MODALITY_RE = re.compile(r"^[A-Z]{1,16}$")
_UID_RE = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable: a grouping key, never trusted further

# tags used here (group << 16 | element)
SOP_CLASS, SOP_UID, SERIES_UID, MODALITY, IMAGE_TYPE = 0x00080016, 0x00080018, 0x0020000E, 0x00080060, 0x00080008
ROWS, COLUMNS, FRAMES, SAMPLES, PHOTOMETRIC = 0x00280010, 0x00280011, 0x00280008, 0x00280002, 0x00280004
BITS_ALLOCATED, BITS_STORED, PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280103
IPP, IOP, PIXEL_SPACING, SLICE_THICKNESS, SLICE_SPACING = 0x00200032, 0x00200037, 0x00280030, 0x00180050, 0x00180088
SLOPE, INTERCEPT, MODALITY_LUT, BURNED_IN = 0x00281053, 0x00281052, 0x00283000, 0x00280301
ECHO, ACQUISITION, INSTANCE, TEMPORAL = 0x00180086, 0x00200012, 0x00200013, 0x00200100
MEDIA_SOP_CLASS, MEDIA_SOP_UID, FRAME_OF_REFERENCE, SERIES_NUMBER = 0x00020002, 0x00020003, 0x00200052, 0x00200011
PHILIPS_CREATOR, PHILIPS_SCALE = 0x20050010, 0x2005100E  # private block (2005,10xx) and its MR Scale Slope


@dataclass(frozen=True)
class FrameInfo:
    """One 2D frame of a file: a slice, a frame of a multi-frame file or a tile of a mosaic."""

    index: int  # frame number in the file (0-based), or tile number of a mosaic
    geometry: SliceGeometry
    slope: float = 1.0
    intercept: float = 0.0
    order: tuple[float, ...] = ()  # sorts the frames at one position into volumes (acquisition order)
    split: tuple[Any, ...] = ()  # frames whose split keys differ are never stacked together
    rescale_error: str | None = None
    geometry_error: str | None = None
    error_code: str = "dicom_bad_geometry_value"
    philips_scale: float | None = None  # Philips' private MR Scale Slope: see philips_scale()


@dataclass(frozen=True)
class DicomHeader:
    """What discovery keeps of one DICOM file: identity, coding, frames. Never names or dates."""

    path: str
    rel: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str | None
    transfer_syntax: str | None
    has_meta: bool = True
    series_uid_missing: bool = False  # grouped by folder, frame of reference and series number instead
    pixels: bool = True  # False: a non-image object (SR, RTSTRUCT, presentation state, PDF, ...)
    layout: Literal["single", "multiframe", "mosaic", "legacy_multiframe"] = "single"
    n_frames: int = 1
    rows: int = 0
    columns: int = 0
    samples: int = 1
    photometric: str | None = None
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    image_type: tuple[str, ...] = ()
    burned_in: bool = False
    float_pixels: bool = False
    modality_lut: bool = False
    frames: tuple[FrameInfo, ...] = ()
    # set by the fast reader: where native pixel data starts, its declared length (None when
    # encapsulated) and a digest of every byte before it, so decoding can trust this header
    pixel_offset: int | None = None
    pixel_length: int | None = None
    header_sha256: str | None = None

    @property
    def geometry(self) -> SliceGeometry:
        return self.frames[0].geometry


# ---- value parsing -------------------------------------------------------------------------


def _fixed(tags: Tags, tag: int, count: int, name: str, rel: str) -> tuple[tuple[float, ...] | None, str | None]:
    values, bad = tags.floats(tag)
    if bad is not None:
        return None, f"{rel}: {name} {bad!r} is not {count} numbers"
    if values is None or (not values and count):
        return None, None
    if len(values) != count or not all(map(math.isfinite, values)):
        return None, f"{rel}: {name} must hold {count} finite numbers, got {values[:8]}"
    return tuple(values), None


def slice_geometry(tags: Tags, rel: str, *, rows: int, columns: int) -> tuple[SliceGeometry, str | None]:
    """Parse the plane geometry tags; the second value explains the first unparseable one."""
    errors: list[str] = []
    parsed: dict[str, Any] = {}
    for name, tag, count in (("ImagePositionPatient", IPP, 3), ("ImageOrientationPatient", IOP, 6),
                             ("PixelSpacing", PIXEL_SPACING, 2), ("SliceThickness", SLICE_THICKNESS, 1),
                             ("SpacingBetweenSlices", SLICE_SPACING, 1)):
        values, err = _fixed(tags, tag, count, name, rel)
        if err and name in ("SliceThickness", "SpacingBetweenSlices"):
            values, err = None, None  # optional tags: a bad value only loses the fallback
        parsed[name] = values
        if err:
            errors.append(err)
    geometry = SliceGeometry(
        name=rel, rows=rows, columns=columns,
        position=parsed["ImagePositionPatient"], orientation=parsed["ImageOrientationPatient"],
        pixel_spacing=parsed["PixelSpacing"],
        slice_thickness=parsed["SliceThickness"][0] if parsed["SliceThickness"] else None,
        spacing_between_slices=parsed["SpacingBetweenSlices"][0] if parsed["SpacingBetweenSlices"] else None,
    )
    return geometry, (errors[0] if errors else None)


def rescale(tags: Tags, rel: str) -> tuple[float, float, str | None]:
    """(slope, intercept, error): absent values mean 1 and 0; zero or non-finite ones are errors."""
    slope_v, slope_bad = tags.floats(SLOPE)
    inter_v, inter_bad = tags.floats(INTERCEPT)
    if slope_bad is not None or inter_bad is not None:
        return 1.0, 0.0, f"{rel}: RescaleSlope/RescaleIntercept are not numbers"
    slope = slope_v[0] if slope_v else 1.0
    intercept = inter_v[0] if inter_v else 0.0
    if not math.isfinite(slope) or slope == 0 or not math.isfinite(intercept):
        return 1.0, 0.0, f"{rel}: RescaleSlope {slope} / RescaleIntercept {intercept} would destroy the values"
    return float(slope), float(intercept), None


def philips_scale(tags: Tags) -> float | None:
    """Philips' MR Scale Slope (2005,100E), where the private block's creator (2005,0010) is Philips' own: with
    the DICOM rescale it gives Philips' floating-point values (``ingest.philips_scaling``). None elsewhere."""
    if (tags.text(PHILIPS_CREATOR) or "").strip() != "Philips MR Imaging DD 001":
        return None
    values, _ = tags.floats(PHILIPS_SCALE)
    return values[0] if values and math.isfinite(values[0]) and values[0] > 0 else None


def order_key(tags: Tags, *, frame: int = 0, temporal: int | None = None) -> tuple[float, ...]:
    """Acquisition order of frames at one position: temporal index, acquisition, instance, frame."""
    values = (temporal if temporal is not None else tags.number(TEMPORAL), tags.number(ACQUISITION),
              tags.number(INSTANCE))
    return (*(float(v) if v is not None else -1.0 for v in values), float(frame))


# ---- header building -----------------------------------------------------------------------


def _uid(tags: Tags, tag: int) -> str | None:
    value = tags.text(tag)
    return value if value and _UID_RE.match(value) else None


def header_from_tags(tags: Tags, *, path: str, rel: str, transfer_syntax: str | None, has_meta: bool,
                     pixels: bool, float_pixels: bool = False, groups: FunctionalGroups | None = None,
                     extra: dict[str, Any] | None = None) -> DicomHeader | None:
    """A DicomHeader (with the fields in ``extra`` set too), or None for files that are not DICOM objects of
    a series (junk, DICOMDIR). ``groups``: an enhanced multi-frame file's functional groups, whence its frames.
    Built once: a frozen dataclass of 27 fields is slow to copy."""
    sop_class = _uid(tags, SOP_CLASS) or _uid(tags, MEDIA_SOP_CLASS)
    series_uid = _uid(tags, SERIES_UID)
    modality = (tags.text(MODALITY) or "").strip().upper()
    missing = series_uid is None and sop_class is not None and pixels
    if missing:  # anonymisers sometimes blank the UIDs: group by what still identifies the stack
        parent = rel.rsplit("/", 1)[0] if "/" in rel else "."
        series_uid = "|".join(("no-series-uid", parent, _uid(tags, FRAME_OF_REFERENCE) or "",
                               tags.text(SERIES_NUMBER) or "", modality))
    if sop_class is None or series_uid is None:
        log.debug("%s: no SOPClassUID/SeriesInstanceUID; ignored", rel)
        return None
    fields: dict[str, Any] = {
        "path": path, "rel": rel, "series_uid": series_uid, "series_uid_missing": missing,
        "sop_uid": _uid(tags, SOP_UID) or _uid(tags, MEDIA_SOP_UID) or "",
        "sop_class": sop_class, "modality": modality if _MODALITY_RE.match(modality) else None,
        "transfer_syntax": transfer_syntax, "has_meta": has_meta,
        "image_type": tuple(v.upper() for v in (tags.strings(IMAGE_TYPE) or ())),
        "burned_in": (tags.text(BURNED_IN) or "").upper() == "YES", **(extra or {}),
    }
    if not pixels:
        return DicomHeader(**fields, pixels=False, n_frames=0)
    rows, columns = tags.number(ROWS), tags.number(COLUMNS)
    if rows is None or columns is None or rows < 1 or columns < 1:
        log.debug("%s: Rows/Columns are not positive integers; ignored", rel)
        return None
    fields.update(
        n_frames=max(tags.number(FRAMES) or 1, 1), rows=rows, columns=columns, samples=tags.number(SAMPLES) or 1,
        photometric=(tags.text(PHOTOMETRIC) or "").strip().upper() or None,
        bits_allocated=tags.number(BITS_ALLOCATED) or 0, bits_stored=tags.number(BITS_STORED) or 0,
        pixel_representation=tags.number(PIXEL_REPRESENTATION) or 0, float_pixels=float_pixels,
        modality_lut=tags.has(MODALITY_LUT) and not tags.has(SLOPE),
    )
    return _with_frames(fields, tags, groups)


def _with_frames(fields: dict[str, Any], tags: Tags, groups: FunctionalGroups | None) -> DicomHeader:
    """The header of ``fields`` with its layout and frames."""
    if groups is not None:
        from pipeline.io.dicom_enhanced import enhanced_frames

        header = DicomHeader(**fields, layout="multiframe")
        return replace(header, frames=enhanced_frames(groups, tags, header))
    rel, image_type = fields["rel"], fields["image_type"]
    geometry, geometry_error = slice_geometry(tags, rel, rows=fields["rows"], columns=fields["columns"])
    slope, intercept, rescale_error = rescale(tags, rel)
    frame = FrameInfo(index=0, geometry=geometry, slope=slope, intercept=intercept, order=order_key(tags),
                      split=(image_type, tags.number(ECHO)), rescale_error=rescale_error,
                      geometry_error=geometry_error, philips_scale=philips_scale(tags))
    if "MOSAIC" in image_type and fields["n_frames"] == 1:
        from pipeline.io.dicom_mosaic import mosaic_frames

        return DicomHeader(**fields, layout="mosaic", frames=mosaic_frames(tags, frame, rel=rel))
    layout = "legacy_multiframe" if fields["n_frames"] > 1 else "single"
    return DicomHeader(**fields, layout=layout, frames=(frame,))


def _needs_dataset(raw: RawHeader) -> bool:
    return PER_FRAME_GROUPS in raw.sequences or SHARED_GROUPS in raw.sequences


def _fast_header(raw: RawHeader, data: bytes, *, path: str, rel: str) -> DicomHeader | None:
    extra = None if raw.pixel_offset is None else {
        "pixel_offset": raw.pixel_offset, "pixel_length": raw.pixel_length,
        "header_sha256": hashlib.sha256(data[:raw.pixel_offset]).hexdigest()}
    return header_from_tags(Tags(raw=raw), path=path, rel=rel, transfer_syntax=raw.transfer_syntax,
                            has_meta=raw.has_meta, pixels=raw.pixel_offset is not None,
                            float_pixels=raw.float_pixels, extra=extra)


def _dataset_header(ds: Any, *, path: str, rel: str, pixels: bool, float_pixels: bool,
                    extra: dict[str, Any] | None = None) -> DicomHeader | None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    groups = None
    if PER_FRAME_GROUPS in ds or SHARED_GROUPS in ds:
        from pipeline.io.dicom_enhanced import groups_from_dataset

        groups = groups_from_dataset(ds)
    return header_from_tags(Tags(dataset=ds), path=path, rel=rel, transfer_syntax=str(syntax) if syntax else None,
                            has_meta=bool(syntax), pixels=pixels, float_pixels=float_pixels, groups=groups,
                            extra=extra)


def _pydicom_header(source: Any, *, path: str, rel: str, full: bool) -> tuple[DicomHeader | None, Any]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source, force=True, defer_size=None if full else _DEFER_BYTES)
        float_pixels = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        header = _dataset_header(ds, path=path, rel=rel, pixels=PIXEL_DATA in ds or float_pixels,
                                 float_pixels=float_pixels)
    return header, ds


def _walked_header(raw: RawHeader, data: bytes, *, path: str, rel: str) -> DicomHeader | None:
    """The header of a file the walker read to its pixel data but cannot describe alone: an enhanced multi-frame
    file, whose functional groups are read from the same bytes (dicom_items), or by pydicom where that reader
    cannot (implicit VR, an odd item). The header keeps the bytes' digest, so that the worker decoding the file
    trusts it (``_unchanged``) instead of parsing every frame's groups again (4-9 s with pydicom for a 3,600-frame
    file, repeated for each volume that ``split_4d`` made of it)."""
    from pipeline.io.dicom_enhanced import groups_from_bytes

    extra = {"pixel_offset": raw.pixel_offset, "pixel_length": raw.pixel_length,
             "header_sha256": hashlib.sha256(data[:raw.pixel_offset]).hexdigest()}
    try:
        groups = groups_from_bytes(data, raw)
    except FastParseError as exc:
        log.debug("%s: functional groups left to pydicom (%s)", rel, exc)
    else:
        return header_from_tags(Tags(raw=raw), path=path, rel=rel, transfer_syntax=raw.transfer_syntax,
                                has_meta=raw.has_meta, pixels=True, float_pixels=raw.float_pixels, groups=groups,
                                extra=extra)
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        return _dataset_header(ds, path=path, rel=rel, pixels=True, float_pixels=raw.float_pixels, extra=extra)


def header_from_bytes(data: bytes, *, path: str, rel: str) -> tuple[DicomHeader | None, RawHeader | None, Any]:
    """Parse a whole file held in memory: (header, fast-walker result or None, pydicom dataset or None)."""
    try:
        raw = parse_header(data)
    except FastParseError:
        raw = None
    if raw is not None and not _needs_dataset(raw):
        return _fast_header(raw, data, path=path, rel=rel), raw, None
    header, ds = _pydicom_header(io.BytesIO(data), path=path, rel=rel, full=True)
    return header, raw, ds


_PACKED = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
           (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"),
           (b"\x28\xb5\x2f\xfd", "zstd"))


def packed_kind(head: bytes) -> str | None:
    """The kind of archive or compressed file that ``head`` (a file's first 262 bytes or more) starts, else None."""
    for magic, kind in _PACKED:
        if head.startswith(magic):
            return kind
    return "tar" if head[257:262] == b"ustar" else None


def _unreadable(rel: str, exc: OSError) -> FileUnreadable:
    reason = os_reason(exc)
    return FileUnreadable(f"{rel}: cannot be read ({reason}); check its permissions or the storage, then run again",
                          reason=reason)


def read_header(path: Path, *, root: Path, rel: str | None = None,
                guard: Callable[[Path, str], None] | None = None) -> DicomHeader | None:
    """The header of a DICOM object of a series, or None for anything else (junk, DICOMDIR).

    ``rel``: the path relative to ``root`` when the caller has it. ``guard(path, rel)`` runs before
    pydicom reads a file that the fast walker leaves to it, and may raise to refuse the file unread
    (a deflated data set that would inflate past a memory limit); what it raises propagates.
    A file that cannot be opened or read raises FileUnreadable: it may be a slice of a series. An archive or
    compressed file (zip, tar, gzip ...) raises PackedFile: it may hold scans.
    """
    rel = path.relative_to(root).as_posix() if rel is None else rel
    raw: RawHeader | None
    data: bytes
    try:
        with open(path, "rb") as handle:
            try:
                raw, data = parse_prefix(handle, parse_header)
            except NotDicom:
                handle.seek(0)
                kind = packed_kind(handle.read(512))
                if kind is not None:  # it may hold a whole export: said, not ignored
                    raise PackedFile(f"{rel}: a {kind} file, not unpacked", kind=kind) from None
                raise
    except NotDicom:
        log.debug("%s: not a DICOM file; ignored", rel)
        return None
    except FastParseError:  # and NeedMoreData at the end of the file: pydicom reads it instead
        raw, data = None, b""
    except OSError as exc:  # never "not DICOM": the file may be a slice of a series
        raise _unreadable(rel, exc) from None
    fast = raw if raw is not None and not _needs_dataset(raw) else None
    if fast is None and guard is not None:
        guard(path, rel)
    try:
        if fast is not None:
            return _fast_header(fast, data, path=str(path), rel=rel)
        if raw is not None and raw.pixel_offset is not None:
            return _walked_header(raw, data, path=str(path), rel=rel)
        return _pydicom_header(str(path), path=str(path), rel=rel, full=False)[0]
    except Exception as exc:  # noqa: BLE001 - any parse failure of an arbitrary file means "not DICOM"
        if isinstance(exc, OSError) and exc.errno is not None:  # the system's, not a parser's: opened for the
            raise _unreadable(rel, exc) from None  # walk, then not (its permissions changed, the file removed)
        log.debug("%s: not readable as DICOM (%s); ignored", rel, type(exc).__name__)
        return None
