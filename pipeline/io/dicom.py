"""DICOM series reading: discovery, splitting into stacks, checks, and decoding a stack to a Volume."""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import GeometryError, IngestError
from pipeline.heap import trim_heap
from pipeline.io.dicom_geometry import analyse_stack, group_volumes, spacing_error, tilt_error
from pipeline.io.dicom_header import DicomHeader, FrameInfo, header_from_bytes, read_header
from pipeline.io.dicom_mosaic import untile
from pipeline.io.dicom_pixels import decode_stored, decoder_for, decoder_note
from pipeline.io.dicom_resample import resample_stack
from pipeline.io.dicom_split import (
    LABEL_MAP_SEG_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    SEG_STORAGE,
    split_series,
)
from pipeline.io.volume import Volume

__all__ = ["DicomHeader", "DicomOptions", "DicomScan", "DicomSeries", "check_supported", "decode_series",
           "discover_series", "group_series", "read_header", "read_series_bytes", "skip_reason", "storage_dtype"]

log = logging.getLogger(__name__)

# SOP classes that are never ingested as images, by UID prefix (the longest match wins)
_NON_IMAGE = {
    SEG_STORAGE: ("dicom_segmentation", "a DICOM SEG object, not an image series"),
    LABEL_MAP_SEG_STORAGE: ("dicom_segmentation", "a DICOM label map SEG object, not an image series"),
    "1.2.840.10008.5.1.4.1.1.66": ("dicom_non_image", "a raw data / registration / fiducials object"),
    "1.2.840.10008.5.1.4.1.1.88": ("dicom_non_image", "a structured report (SR) or key object selection"),
    "1.2.840.10008.5.1.4.1.1.481.2": ("dicom_non_image", "an RT dose grid, not a scan"),
    RT_STRUCTURE_SET_STORAGE: ("dicom_rtstruct", "an RT structure set (contours), not an image series"),
    "1.2.840.10008.5.1.4.1.1.481": ("dicom_non_image", "an RT object (plan, treatment record, ...)"),
    "1.2.840.10008.5.1.4.1.1.11": ("dicom_non_image", "a presentation state"),
    "1.2.840.10008.5.1.4.1.1.104": ("dicom_non_image", "an encapsulated document (PDF, CDA, STL)"),
    "1.2.840.10008.5.1.4.1.1.9": ("dicom_non_image", "a waveform"),
    "1.2.840.10008.5.1.4.1.1.91": ("dicom_non_image", "a microscopy annotation object"),
    "1.2.840.10008.5.1.4.1.1.77.1.6": ("dicom_non_volume", "a whole-slide microscopy image (slide coordinates)"),
    "1.2.840.10008.5.1.4.1.1.1": ("dicom_non_volume", "a projection radiograph (CR/DX/mammography), not a volume"),
}


@dataclass(frozen=True)
class DicomOptions:
    """What decoding does with irregular geometry (mirrors the ingest config)."""

    gantry_tilt: Literal["resample", "refuse"] = "resample"
    irregular_slices: Literal["resample", "refuse"] = "refuse"
    philips_scaling: Literal["display", "precise"] = "display"

    def __repr__(self) -> str:
        """What a study's options digest covers (ingest_study): ``philips_scaling`` joins it only when set, so
        that the digests of studies converted before that option existed stay as they were, and are reused."""
        extra = "" if self.philips_scaling == "display" else f", philips_scaling={self.philips_scaling!r}"
        return f"DicomOptions(gantry_tilt={self.gantry_tilt!r}, irregular_slices={self.irregular_slices!r}{extra})"


@dataclass(frozen=True)
class DicomSeries:
    """One stack of a SeriesInstanceUID (the whole series unless split), headers sorted by path."""

    uid: str
    folder: str
    headers: tuple[DicomHeader, ...]
    part: str = ""  # "" when the series was not split

    @property
    def key(self) -> str:
        """The private key a pseudonym is made from (folder, UID, part); never written out as is."""
        return f"{self.folder}/{self.uid}" + (f"/{self.part}" if self.part else "")

    @property
    def modality(self) -> str | None:
        return self.headers[0].modality


@dataclass
class DicomScan:
    series: list[DicomSeries] = field(default_factory=list)
    ignored: int = 0


def discover_series(files: Iterable[Path], *, root: Path, split_4d: bool = False) -> DicomScan:
    """Read headers of ``files`` in this process, group them by SeriesInstanceUID and split each into stacks."""
    return group_series([read_header(path, root=root) for path in files], split_4d=split_4d)


def group_series(headers: Iterable[DicomHeader | None], *, split_4d: bool = False) -> DicomScan:
    """Group headers (None: a file that is not a DICOM object of a series) by SeriesInstanceUID and split
    each series into stacks; the result depends only on the headers, not on their order."""
    scan = DicomScan()
    groups: dict[str, list[DicomHeader]] = defaultdict(list)
    for header in headers:
        if header is None:
            scan.ignored += 1
            continue
        groups[header.series_uid].append(header)
    for uid in sorted(groups):
        members_of_uid = sorted(groups[uid], key=lambda h: h.rel)
        for part, members in split_series(members_of_uid, split_4d=split_4d):
            parents = [h.rel.rpartition("/")[0] or "." for h in members]  # PurePosixPath(rel).parent, 20x faster
            folder = os.path.commonpath(parents) if all(p != "." for p in parents) else "."
            scan.series.append(DicomSeries(uid=uid, folder=folder or ".", headers=tuple(members), part=part))
    scan.series.sort(key=lambda s: (s.folder, s.headers[0].rel, s.part))
    return scan


# ---- series checks -------------------------------------------------------------------------


def _non_image(sop_class: str) -> tuple[str, str] | None:
    matches = [uid for uid in _NON_IMAGE if sop_class == uid or sop_class.startswith(uid + ".")]
    return _NON_IMAGE[max(matches, key=len)] if matches else None


def skip_reason(series: DicomSeries) -> tuple[str, str] | None:
    """(code, message) when a series is deliberately not ingested, else None."""
    first = series.headers[0]
    known = _non_image(first.sop_class)
    if known is not None:
        return known[0], f"{series.folder}: {known[1]}; not ingested"
    if not first.pixels:
        return "dicom_no_pixel_data", (f"{series.folder}: {len(series.headers)} DICOM object(s) without pixel data "
                                       f"(SOP class {first.sop_class}); not an image, not ingested")
    if any(h.samples != 1 or (h.photometric or "MONOCHROME2") not in ("MONOCHROME1", "MONOCHROME2")
           for h in series.headers):
        return "dicom_colour", (f"{series.folder}: a colour image ({first.photometric}, {first.samples} samples "
                                "per pixel, e.g. a secondary capture); only greyscale series are ingested")
    if any(h.burned_in for h in series.headers):
        return "dicom_burned_in_annotation", (f"{series.folder}: BurnedInAnnotation is YES (text, possibly "
                                              "patient data, drawn into the pixels); not ingested")
    if any("LOCALIZER" in h.image_type for h in series.headers):
        return "dicom_localizer", f"{series.folder}: a localizer (scout) series; not ingested as a volume"
    return None


def check_supported(series: DicomSeries) -> None:
    """Refuse what cannot be decoded exactly (legacy multi-frame, modality LUTs, unknown compression)."""
    for h in series.headers:
        if h.layout == "legacy_multiframe":
            raise IngestError(f"{h.rel}: {h.n_frames} frames without per-frame functional groups, so the frames "
                              "have no positions; not supported", code="unsupported_dicom")
        if h.modality_lut:
            raise IngestError(f"{h.rel}: a Modality LUT Sequence instead of rescale slope/intercept is not "
                              "supported", code="unsupported_dicom")
        decoder_for(h.transfer_syntax, h.rel)


# ---- decoding ------------------------------------------------------------------------------


def read_series_bytes(series: DicomSeries) -> tuple[str, list[bytes]]:
    """Read every file once: (digest over relative paths and contents, the bytes)."""
    digest = hashlib.sha256()
    blobs = []
    for h in series.headers:
        try:
            with open(h.path, "rb") as handle:  # a str path: a Path per file costs a parse of it
                data = handle.read()
        except OSError as exc:
            raise IngestError(f"{h.rel}: cannot read the file ({exc.strerror})", code="dicom_unreadable") from exc
        blobs.append(data)
        digest.update(f"{h.rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest(), blobs


@dataclass
class _File:
    header: DicomHeader  # valid for the bytes now being decoded
    frames: list[FrameInfo]  # the frames of this stack
    dataset: Any
    blob: bytes
    position: int = 0  # index of the file's bytes in the series' list
    trusted: bool = False  # its bytes before the pixel data are those discovery read: ``header`` is discovery's


def _unchanged(h: DicomHeader, blob: bytes) -> bool:
    """True when every byte before the pixel data is what discovery read (no second parse needed)."""
    offset = h.pixel_offset
    return bool(h.header_sha256 and offset is not None and len(blob) >= offset
                and hashlib.sha256(blob[:offset]).hexdigest() == h.header_sha256)


def _check_frames(frames: Sequence[FrameInfo]) -> None:
    for frame in frames:
        if frame.geometry_error:
            raise GeometryError(frame.geometry_error, code=frame.error_code)
        if frame.rescale_error:
            raise IngestError(frame.rescale_error, code="dicom_bad_rescale")


def _reparse(h: DicomHeader, blob: bytes, series: DicomSeries, *, checked: bool = False) -> _File:
    """The file ``h`` as decoding takes it: discovery's header where the bytes before the pixel data are those it
    read (or ``checked``: found so by an earlier decode of these same bytes), else parsed again."""
    if checked or _unchanged(h, blob):
        _check_frames(h.frames)
        return _File(header=h, frames=list(h.frames), dataset=None, blob=blob, trusted=True)
    try:
        fresh, _, ds = header_from_bytes(blob, path=h.path, rel=h.rel)
    except Exception as exc:  # a corrupt file fails its series, with the reason
        raise IngestError(f"{h.rel}: cannot parse the file ({type(exc).__name__})", code="dicom_unreadable") from exc
    wanted = {f.index for f in h.frames}
    frames = [f for f in fresh.frames if f.index in wanted] if fresh is not None else []
    if fresh is None or fresh.series_uid != series.uid or not fresh.pixels or tuple(frames) != h.frames:
        raise IngestError(f"{h.rel}: the file changed after discovery; rerun ingest", code="dicom_changed")
    _check_frames(frames)
    return _File(header=fresh, frames=frames, dataset=ds, blob=blob)


def _files(series: DicomSeries, blobs: Sequence[bytes | None], problems: list[tuple[str, str]], *,
           checked: Collection[str] = ()) -> list[_File]:
    seen: dict[str, tuple[str, bytes]] = {}
    files = []
    for position, (h, blob) in enumerate(zip(series.headers, blobs, strict=True)):
        if blob is None:
            raise ValueError(f"{h.rel}: its bytes were released by an earlier decode_series(release=True)")
        item = _reparse(h, blob, series, checked=h.path in checked)
        item.position = position
        sop = item.header.sop_uid
        if sop and sop in seen:
            other, other_blob = seen[sop]
            if blob == other_blob:
                problems.append(("dicom_duplicate_file", f"{h.rel}: an identical copy of {other}; ignored"))
                continue
            raise IngestError(f"{h.rel} and {other} share a SOPInstanceUID but differ", code="dicom_duplicate_uid")
        seen[sop] = (h.rel, blob)
        if not item.header.has_meta:
            problems.append(("dicom_no_file_meta", f"{h.rel}: no file meta; encoding taken from the data set"))
        if item.header.series_uid_missing:
            problems.append(("dicom_no_series_uid", (f"{series.folder}: SeriesInstanceUID is empty; files grouped "
                                                     "by folder, frame of reference, series number and modality")))
        files.append(item)
    return files


def _philips_precise(refs: list[tuple[int, FrameInfo]], folder: str,
                     problems: list[tuple[str, str]]) -> list[tuple[int, FrameInfo]]:
    """Each frame with Philips' MR Scale Slope SS rescaled to Philips' floating-point value: FP = (stored x RS + RI)
    / (RS x SS), RS and RI its DICOM rescale (Chenevert et al.; dcm2niix's default for Philips)."""
    scaled, count = [], 0
    for f_index, frame in refs:
        scale = frame.philips_scale
        if scale is not None and frame.slope:
            frame = replace(frame, slope=1.0 / scale, intercept=frame.intercept / (frame.slope * scale))
            count += 1
        scaled.append((f_index, frame))
    if count:
        problems.append(("dicom_philips_precise", f"{folder}: Philips floating-point values (display value / "
                                                  f"(RescaleSlope x MR Scale Slope)) in {count} of {len(refs)} "
                                                  "frames, as ingest.philips_scaling=precise asks"))
    return scaled


def _frames_of(item: _File) -> np.ndarray:
    stored = decode_stored(item.blob, item.header, item.dataset)
    if item.header.layout == "mosaic":
        g = item.frames[0].geometry
        tiles = (item.header.rows // g.rows) * (item.header.columns // g.columns)
        stored = untile(stored[0], count=tiles, tile_rows=g.rows, tile_cols=g.columns)
    return stored


def _place(dest: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """``dest[...] = (stored * slope + intercept).T`` in float32, computed in float64 and rounded once."""
    dest[...] = (stored.astype(np.float64) * slope + intercept).T


_INT16 = np.iinfo(np.int16)
_TRIM_EVERY = 64 << 20  # with ``release``: the freed file bytes are handed back to the OS every 64 MB


def _whole_rescale(slope: float, intercept: float) -> bool:
    """True when ``stored * slope + intercept`` is exact in int64 for any stored value (up to 32 bits)."""
    return (float(slope).is_integer() and float(intercept).is_integer()
            and abs(slope) <= 1 << 16 and abs(intercept) <= 1 << 40)


def _place_int16(dest: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> bool:
    """``dest[...] = (stored * slope + intercept).T`` exactly, in int16; False (``dest`` untouched) when a value
    falls outside int16. The range is checked on the stored extremes (the rescale is monotone); then the
    sum is written straight into ``dest``, computed in a type that holds every term."""
    if not stored.size:
        return True
    s, i = int(slope), int(intercept)
    if stored.dtype == np.int16 and s == 1 and i == 0:  # the values are the stored ones: int16 holds them
        dest[...] = stored.T
        return True
    ends = (int(stored.min()) * s + i, int(stored.max()) * s + i)
    if min(ends) < _INT16.min or max(ends) > _INT16.max:
        return False
    wide = np.int32 if stored.dtype.itemsize <= 2 and abs(s) <= 1 << 14 and abs(i) < 1 << 30 else np.int64
    scaled = stored if s == 1 else np.multiply(stored, s, dtype=wide)
    np.add(scaled.T, i, out=dest, dtype=wide, casting="unsafe")  # exact: every sum lies in int16's range
    return True


def _fresh_volume(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised Fortran-ordered array in an anonymous memory map of its own.

    Not ``np.empty``: NumPy asks the kernel for huge pages on large arrays, and where the kernel's
    ``transparent_hugepage/defrag`` is ``madvise`` (Debian's default) the first touch can stall on
    memory compaction (numpy/numpy#31590); a 300-slice CT ingested 0.3 s slower for it. The map is
    unmapped when the last array viewing it goes."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes < 1 << 22:  # below NumPy's huge-page threshold
        return np.empty(shape, dtype=dtype, order="F")
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape, order="F")


@dataclass
class _Target:
    """The stack being filled: int16 while every value so far is a whole number in its range, else float32.

    Both hold exactly the rescaled values (float64 rounded once to float32, as ``_place``); a value that int16
    cannot hold turns the stack into float32 once, keeping the slices placed so far (exact in float32)."""

    data: np.ndarray

    def place(self, index: tuple[int, int], stored: np.ndarray, slope: float, intercept: float) -> None:
        z, t = index
        if self.data.dtype == np.int16:
            if _whole_rescale(slope, intercept) and _place_int16(self.data[:, :, z, t], stored, slope, intercept):
                return
            self.data = self.data.astype(np.float32, order="F")
        _place(self.data[:, :, z, t], stored, slope, intercept)


def decode_series(series: DicomSeries, blobs: Sequence[bytes | None], *, options: DicomOptions | None = None,
                  release: bool = False, decoded: dict[str, np.ndarray] | None = None) -> Volume:
    """Decode one stack into a RAS Volume (voxel order: column, row, slice[, volume]), int16 when every rescaled
    value is a whole number in int16's range (as ``storage_dtype`` would store it), else float32.

    Volumes of a 4D stack are in acquisition order (time last). ``volume.meta`` holds
    ``modality``, ``problems`` (a list of (code, message) oddities accepted) and ``volumes``.
    ``release`` (``blobs`` a list): each entry is set to None once its file is decoded, so that the series'
    bytes and its voxels are not all held at once (where the caller holds no other reference to them).
    ``decoded``: each file's decoded frames by path, kept for the next call on the same bytes (the volumes that
    ``split_4d`` makes of one enhanced multi-frame file: a compressed file is then decoded once, and its header
    bytes checked against discovery's digest once, not once a volume). Only files whose bytes matched that digest
    are kept; a file changed since discovery is parsed again by each call, as without it.
    """
    options = options or DicomOptions()
    check_supported(series)
    problems: list[tuple[str, str]] = []
    files = _files(series, blobs, problems, checked=decoded or ())  # decoded: these bytes were checked then
    refs = [(f_index, frame) for f_index, item in enumerate(files) for frame in item.frames]
    if options.philips_scaling == "precise":
        refs = _philips_precise(refs, series.folder, problems)
    slices = [frame.geometry for _, frame in refs]
    volumes = group_volumes(slices, [frame.order for _, frame in refs])
    stack = analyse_stack([slices[i] for i in volumes[0]])
    if stack.tilted and options.gantry_tilt == "refuse":
        raise tilt_error(stack, [slices[i] for i in volumes[0]])
    if stack.irregular and options.irregular_slices == "refuse":
        raise spacing_error(stack, [slices[i] for i in volumes[0]])
    slot = {position: z for z, position in enumerate(stack.order)}  # index in volume -> sorted slice
    place = {ref: (slot[pos], t) for t, volume in enumerate(volumes) for pos, ref in enumerate(volume)}
    first = slices[0]
    resampled = stack.tilted or stack.irregular  # interpolated: float32 throughout
    # Fortran order: each slice is one contiguous block (a frame's rows, transposed, are copied straight in),
    # and NIfTI stores voxels in this order, so writing needs no transposing copy either.
    whole = not resampled and all(_whole_rescale(frame.slope, frame.intercept) for _, frame in refs)
    target = _Target(_fresh_volume((first.columns, first.rows, len(stack.order), len(volumes)),
                                   np.int16 if whole else np.float32))
    by_file: dict[int, list[int]] = defaultdict(list)
    for ref_index, (f_index, _) in enumerate(refs):
        by_file[f_index].append(ref_index)
    decoders = set()
    released = 0
    for f_index, ref_indices in by_file.items():
        item = files[f_index]
        stored = decoded.get(item.header.path) if decoded is not None else None
        if stored is None:
            stored = _frames_of(item)
            if decoded is not None and item.trusted:  # so a later call may skip the check (``checked``)
                decoded[item.header.path] = stored
        for ref_index in ref_indices:
            frame = refs[ref_index][1]
            target.place(place[ref_index], stored[frame.index], frame.slope, frame.intercept)
        del stored
        decoder = decoder_for(item.header.transfer_syntax, item.header.rel)
        if decoder is not None:
            decoders.add(decoder_note(decoder))
        if item.header.photometric == "MONOCHROME1":
            problems.append(("dicom_monochrome1", (f"{series.folder}: MONOCHROME1 (inverted grey scale); stored "
                                                   "values inverted so that higher values are brighter")))
        if release:
            released += len(item.blob)
            item.blob, item.dataset = b"", None
            if isinstance(blobs, list):
                blobs[item.position] = None
            if released >= _TRIM_EVERY:
                released = 0
                trim_heap()
    data = target.data
    problems += [("dicom_decoder", f"{series.folder}: {note}") for note in sorted(decoders)]
    if resampled:
        data, affine, notes = resample_stack(data, stack, regularise=options.irregular_slices == "resample",
                                             name=series.folder)
        problems += notes
    else:
        affine = stack.affine()
    if len(volumes) > 1:
        problems.append(("dicom_4d", (f"{series.folder}: {len(volumes)} volumes of {len(stack.order)} slices, "
                                      "stored as 4D (time last) in acquisition order")))
    array = data[..., 0] if len(volumes) == 1 else data
    if array.dtype != np.int16 and not np.all(np.isfinite(array)):
        raise IngestError(f"{series.folder}: rescaled values overflow float32", code="dicom_bad_rescale")
    unique = list(dict.fromkeys(problems))
    return Volume(array=array, affine=affine, meta={"modality": series.modality, "problems": unique,
                                                     "volumes": len(volumes)})


def storage_dtype(array: np.ndarray) -> type:
    """int16 when every value is a whole number in its range (lossless, half the bytes), else float32.

    Checked one slice at a time, so that it needs no second volume-sized array."""
    if array.dtype == np.int16:
        return np.int16
    if not array.size or array.min() < -32768 or array.max() > 32767:
        return np.float32
    whole = all(np.array_equal(np.trunc(part), part) for part in (array[:, :, z] for z in range(array.shape[2])))
    return np.int16 if whole else np.float32
