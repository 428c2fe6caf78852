"""DICOM series reading: header discovery, grouping by series, checks, pixel decoding to a Volume."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.errors import GeometryError, IngestError
from pipeline.io.dicom_geometry import SliceGeometry, series_affine
from pipeline.io.volume import Volume

log = logging.getLogger(__name__)

_DEFER_BYTES = 1024  # discovery never loads values larger than this (pixel data, big blobs)
_SEGMENTATION_SOPS = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # SEG, label map SEG
_MODALITY_RE = re.compile(r"^[A-Z]{1,16}$")


@dataclass(frozen=True)
class DicomHeader:
    """What discovery keeps of one image file: identity, coding, geometry. Never names or dates."""

    path: str
    rel: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str | None
    transfer_syntax: str | None
    frames: int
    samples: int
    photometric: str | None
    image_type: tuple[str, ...]
    multiframe_groups: bool
    geometry: SliceGeometry
    geometry_error: str | None = None


@dataclass(frozen=True)
class DicomSeries:
    """All files of one SeriesInstanceUID, sorted by relative path; ``folder`` is their common folder."""

    uid: str
    folder: str
    headers: tuple[DicomHeader, ...]

    @property
    def key(self) -> str:
        """The private key a pseudonym is made from (folder plus UID); never written out as is."""
        return f"{self.folder}/{self.uid}"

    @property
    def modality(self) -> str | None:
        return self.headers[0].modality


@dataclass
class DicomScan:
    series: list[DicomSeries] = field(default_factory=list)
    ignored: int = 0


# ---- header parsing ------------------------------------------------------------------------


def _floats(ds: Dataset, tag: str, count: int, rel: str) -> tuple[tuple[float, ...] | None, str | None]:
    if tag not in ds:
        return None, None
    raw = ds[tag].value
    values = list(raw) if isinstance(raw, Sequence) and not isinstance(raw, str | bytes) else [raw]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None, f"{rel}: {tag} {str(raw)[:64]!r} is not {count} numbers"
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None, f"{rel}: {tag} must hold {count} finite numbers, got {list(numbers)[:8]}"
    return numbers, None


def slice_geometry(ds: Dataset, rel: str) -> tuple[SliceGeometry, str | None]:
    """Parse the geometry tags; the second value explains the first unparseable one."""
    errors: list[str] = []
    parsed: dict[str, Any] = {}
    for tag, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2),
                       ("SliceThickness", 1), ("SpacingBetweenSlices", 1)):
        values, err = _floats(ds, tag, count, rel)
        if err and tag in ("SliceThickness", "SpacingBetweenSlices"):
            values, err = None, None  # optional tags: a bad value only loses the fallback
        parsed[tag] = values
        if err:
            errors.append(err)
    geometry = SliceGeometry(
        name=rel, rows=int(ds.Rows), columns=int(ds.Columns),
        position=parsed["ImagePositionPatient"], orientation=parsed["ImageOrientationPatient"],
        pixel_spacing=parsed["PixelSpacing"],
        slice_thickness=parsed["SliceThickness"][0] if parsed["SliceThickness"] else None,
        spacing_between_slices=parsed["SpacingBetweenSlices"][0] if parsed["SpacingBetweenSlices"] else None,
    )
    return geometry, (errors[0] if errors else None)


def _header_from_dataset(ds: Dataset, path: str, rel: str) -> DicomHeader | None:
    for tag in ("SOPClassUID", "Rows", "Columns", "PixelData", "SeriesInstanceUID"):
        if tag not in ds:
            log.debug("%s: not an image file (no %s); ignored", rel, tag)
            return None
    if not isinstance(ds.Rows, int) or not isinstance(ds.Columns, int) or ds.Rows < 1 or ds.Columns < 1:
        log.debug("%s: Rows/Columns are not positive integers; ignored", rel)
        return None
    geometry, geometry_error = slice_geometry(ds, rel)
    modality = str(ds.get("Modality", "") or "").strip().upper()
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return DicomHeader(
        path=path, rel=rel, series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class=str(ds.SOPClassUID), modality=modality if _MODALITY_RE.match(modality) else None,
        transfer_syntax=str(syntax) if syntax else None, frames=int(ds.get("NumberOfFrames", 1) or 1),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip() or None,
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        multiframe_groups="PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds,
        geometry=geometry, geometry_error=geometry_error,
    )


def read_header(path: Path, *, root: Path) -> DicomHeader | None:
    """The header of an image file, or None for anything else (junk, non-image DICOM objects)."""
    rel = path.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size=_DEFER_BYTES, force=True)
            return _header_from_dataset(ds, str(path), rel)
    except Exception as exc:  # noqa: BLE001 - any parse failure of an arbitrary file means "not DICOM"
        log.debug("%s: not readable as DICOM (%s); ignored", rel, type(exc).__name__)
        return None


def discover_series(files: Iterable[Path], *, root: Path) -> DicomScan:
    """Read headers of ``files`` and group image files by SeriesInstanceUID (sorted, deterministic)."""
    scan = DicomScan()
    groups: dict[str, list[DicomHeader]] = defaultdict(list)
    for path in files:
        header = read_header(path, root=root)
        if header is None:
            scan.ignored += 1
            continue
        groups[header.series_uid].append(header)
    for uid, headers in groups.items():
        headers.sort(key=lambda h: h.rel)
        parents = [str(PurePosixPath(h.rel).parent) for h in headers]
        folder = os.path.commonpath(parents) if all(p != "." for p in parents) else "."
        scan.series.append(DicomSeries(uid=uid, folder=folder or ".", headers=tuple(headers)))
    scan.series.sort(key=lambda s: (s.folder, s.headers[0].rel))
    return scan


# ---- series checks -------------------------------------------------------------------------


def skip_reason(series: DicomSeries) -> tuple[str, str] | None:
    """(code, message) when a series is deliberately not ingested (localizers, segmentations)."""
    first = series.headers[0]
    if first.sop_class in _SEGMENTATION_SOPS:
        return "dicom_segmentation", f"{series.folder}: a DICOM SEG object, not an image series; not ingested"
    if any("LOCALIZER" in h.image_type for h in series.headers):
        return "dicom_localizer", f"{series.folder}: a localizer (scout) series; not ingested as a volume"
    return None


def check_supported(series: DicomSeries) -> None:
    """Refuse what this reader cannot decode exactly: multi-frame, mosaic, compressed, colour."""
    for h in series.headers:
        if h.frames > 1 or h.multiframe_groups:
            raise IngestError(f"{h.rel}: enhanced/multi-frame DICOM ({h.frames} frames) is not supported yet; "
                              "convert it with dcm2niix first", code="unsupported_dicom")
        if "MOSAIC" in h.image_type:
            raise IngestError(f"{h.rel}: Siemens mosaic images are not supported yet; convert with dcm2niix first",
                              code="unsupported_dicom")
        if h.transfer_syntax and UID(h.transfer_syntax).is_compressed:
            raise IngestError(f"{h.rel}: compressed transfer syntax '{UID(h.transfer_syntax).name}' is not "
                              "supported yet; decompress it first (e.g. gdcmconv --raw)", code="unsupported_dicom")
        if h.samples != 1 or (h.photometric or "MONOCHROME2") not in ("MONOCHROME1", "MONOCHROME2"):
            raise IngestError(f"{h.rel}: colour image ({h.photometric}, {h.samples} samples per pixel); only "
                              "greyscale series are ingested", code="unsupported_dicom")


# ---- decoding ------------------------------------------------------------------------------


def read_series_bytes(series: DicomSeries) -> tuple[str, list[bytes]]:
    """Read every file once: (digest over relative paths and contents, the bytes)."""
    digest = hashlib.sha256()
    blobs = []
    for h in series.headers:
        try:
            data = Path(h.path).read_bytes()
        except OSError as exc:
            raise IngestError(f"{h.rel}: cannot read the file ({exc.strerror})", code="dicom_unreadable") from exc
        blobs.append(data)
        digest.update(f"{h.rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest(), blobs


def _ensure_transfer_syntax(ds: Dataset, rel: str, problems: list[tuple[str, str]]) -> None:
    meta = ds.file_meta
    if meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if little is False and implicit:
        raise IngestError(f"{rel}: implicit VR big endian is not a DICOM encoding", code="dicom_unreadable")
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    problems.append(("dicom_no_file_meta", f"{rel}: no file meta; encoding taken from the data set"))


def _stored_values(ds: Dataset, rel: str) -> np.ndarray:
    bits_alloc, bits_stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if bits_alloc not in (8, 16, 32) or not 1 <= bits_stored <= bits_alloc:
        raise IngestError(f"{rel}: BitsAllocated {bits_alloc} / BitsStored {bits_stored} not supported",
                          code="unsupported_dicom")
    expected = int(ds.Rows) * int(ds.Columns) * bits_alloc // 8
    actual = len(ds.PixelData)
    if actual < expected or actual > expected + 1:
        raise IngestError(f"{rel}: pixel data holds {actual} bytes where {ds.Rows}x{ds.Columns}x{bits_alloc} bits "
                          f"need {expected}; the file is truncated or its size tags are wrong",
                          code="dicom_pixel_length")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = np.asarray(ds.pixel_array)
    except (ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError, KeyError) as exc:
        raise IngestError(f"{rel}: cannot decode pixel data ({type(exc).__name__}: {exc})",
                          code="dicom_pixel_error") from exc
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise IngestError(f"{rel}: decoded pixels have shape {pixels.shape}, expected ({ds.Rows}, {ds.Columns})",
                          code="dicom_pixel_error")
    values = pixels.astype(np.int64)
    if bits_stored < bits_alloc:  # bits above BitsStored carry no value (overlays, garbage)
        values &= (1 << bits_stored) - 1
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            sign = 1 << (bits_stored - 1)
            values = (values ^ sign) - sign
    return values


def _rescale(ds: Dataset, rel: str) -> tuple[float, float]:
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        raise IngestError(f"{rel}: a Modality LUT Sequence instead of rescale slope/intercept is not supported",
                          code="unsupported_dicom")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) if ds.get("RescaleSlope") is not None else 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) if ds.get("RescaleIntercept") is not None else 0.0)
    except (TypeError, ValueError) as exc:
        raise IngestError(f"{rel}: RescaleSlope/RescaleIntercept are not numbers", code="dicom_bad_rescale") from exc
    if not np.isfinite(slope) or slope == 0 or not np.isfinite(intercept):
        raise IngestError(f"{rel}: RescaleSlope {slope} / RescaleIntercept {intercept} would destroy the values",
                          code="dicom_bad_rescale")
    return slope, intercept


def decode_series(series: DicomSeries, blobs: Sequence[bytes]) -> Volume:
    """Decode a checked single-frame series into a float32 RAS Volume (voxel order: column, row, slice).

    ``volume.meta`` holds ``modality`` and ``problems`` (a list of (code, message) oddities accepted).
    """
    check_supported(series)
    problems: list[tuple[str, str]] = []
    seen: dict[str, tuple[str, bytes]] = {}
    datasets: list[tuple[Dataset, SliceGeometry]] = []
    for h, blob in zip(series.headers, blobs, strict=True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(blob), force=True)
                geometry, geometry_error = slice_geometry(ds, h.rel)
                uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails its series, with the reason
            raise IngestError(f"{h.rel}: cannot parse the file ({type(exc).__name__})",
                              code="dicom_unreadable") from exc
        if uid != series.uid or "PixelData" not in ds:
            raise IngestError(f"{h.rel}: the file changed after discovery; rerun ingest", code="dicom_changed")
        if geometry_error:
            raise GeometryError(geometry_error, code="dicom_bad_geometry_value")
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop and sop in seen:
            other, other_blob = seen[sop]
            if blob == other_blob:
                problems.append(("dicom_duplicate_file", f"{h.rel}: an identical copy of {other}; ignored"))
                continue
            raise IngestError(f"{h.rel} and {other} share a SOPInstanceUID but differ", code="dicom_duplicate_uid")
        seen[sop] = (h.rel, blob)
        datasets.append((ds, geometry))
    order, affine = series_affine([g for _, g in datasets])
    slices = []
    for index in order:
        ds, geometry = datasets[index]
        _ensure_transfer_syntax(ds, geometry.name, problems)
        slope, intercept = _rescale(ds, geometry.name)
        stored = _stored_values(ds, geometry.name)
        slices.append((stored.astype(np.float64) * slope + intercept).T)  # (rows, cols) -> (i=col, j=row)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            problems.append(("dicom_monochrome1", f"{series.folder}: MONOCHROME1 (inverted display); values kept"))
    array = np.stack(slices, axis=-1).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise IngestError(f"{series.folder}: rescaled values overflow float32", code="dicom_bad_rescale")
    unique = list(dict.fromkeys(problems))
    return Volume(array=array, affine=affine, meta={"modality": series.modality, "problems": unique})
