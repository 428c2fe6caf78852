"""DICOM pixel decoding: native data via numpy, compressed syntaxes via an explicit pylibjpeg/pyjpegls choice."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.io.dicom_header import DicomHeader
from pipeline.io.dicom_tags import EXPLICIT_LE, IMPLICIT_LE


@dataclass(frozen=True)
class Decoder:
    """How one transfer syntax is decoded: the pydicom plugin, the modules it needs, their pip names."""

    syntax: str
    plugin: str  # pydicom decoding plugin name ("" for pydicom's own native reader)
    modules: tuple[str, ...]
    packages: tuple[str, ...]
    lossy: bool = False


_LIBJPEG = (("pylibjpeg", "libjpeg"), ("pylibjpeg", "pylibjpeg-libjpeg"))
_OPENJPEG = (("pylibjpeg", "openjpeg"), ("pylibjpeg", "pylibjpeg-openjpeg"))
_RLE = (("pylibjpeg", "rle"), ("pylibjpeg", "pylibjpeg-rle"))
_CHARLS = (("jpeg_ls",), ("pyjpegls",))
DECODERS: dict[str, Decoder] = {
    "1.2.840.10008.1.2.4.50": Decoder("JPEG Baseline (Process 1)", "pylibjpeg", *_LIBJPEG, lossy=True),
    "1.2.840.10008.1.2.4.51": Decoder("JPEG Extended (Process 2 and 4)", "pylibjpeg", *_LIBJPEG, lossy=True),
    "1.2.840.10008.1.2.4.57": Decoder("JPEG Lossless (Process 14)", "pylibjpeg", *_LIBJPEG),
    "1.2.840.10008.1.2.4.70": Decoder("JPEG Lossless SV1 (Process 14)", "pylibjpeg", *_LIBJPEG),
    "1.2.840.10008.1.2.4.80": Decoder("JPEG-LS Lossless", "pyjpegls", *_CHARLS),
    "1.2.840.10008.1.2.4.81": Decoder("JPEG-LS Near-Lossless", "pyjpegls", *_CHARLS, lossy=True),
    "1.2.840.10008.1.2.4.90": Decoder("JPEG 2000 Lossless", "pylibjpeg", *_OPENJPEG),
    "1.2.840.10008.1.2.4.91": Decoder("JPEG 2000", "pylibjpeg", *_OPENJPEG, lossy=True),
    "1.2.840.10008.1.2.4.201": Decoder("HTJ2K Lossless", "pylibjpeg", *_OPENJPEG),
    "1.2.840.10008.1.2.4.202": Decoder("HTJ2K Lossless RPCL", "pylibjpeg", *_OPENJPEG),
    "1.2.840.10008.1.2.4.203": Decoder("HTJ2K", "pylibjpeg", *_OPENJPEG, lossy=True),
    "1.2.840.10008.1.2.5": Decoder("RLE Lossless", "pylibjpeg", *_RLE),
    "1.2.840.10008.1.2.2": Decoder("Explicit VR Big Endian", "", (), ()),
    "1.2.840.10008.1.2.1.99": Decoder("Deflated Explicit VR Little Endian", "", ("zlib",), ()),
}
_NATIVE_LE = {None, EXPLICIT_LE, IMPLICIT_LE}


def decoder_for(syntax: str | None, rel: str) -> Decoder | None:
    """The decoder of a transfer syntax (None: plain little-endian data, read with numpy)."""
    if syntax in _NATIVE_LE:
        return None
    decoder = DECODERS.get(syntax)  # type: ignore[arg-type]
    if decoder is None:
        raise IngestError(f"{rel}: transfer syntax {syntax} (video or an unknown compression) is not supported; "
                          "export the series uncompressed or as JPEG/JPEG-LS/JPEG 2000/RLE",
                          code="unsupported_dicom")
    missing = [m for m in decoder.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise IngestError(f"{rel}: pixel data is {decoder.syntax}, but its decoder is not installed "
                          f"(missing module {', '.join(missing)}); install it with "
                          f"'pip install {' '.join(decoder.packages)}'", code="dicom_no_decoder")
    return decoder


def decoder_note(decoder: Decoder) -> str:
    """What decoded the pixels, with package versions (recorded in the study's problems)."""
    if not decoder.plugin:
        return f"{decoder.syntax} read by pydicom"
    versions = []
    for package in decoder.packages:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(package)
    lossy = "; lossy compression: values are the decoder's reconstruction" if decoder.lossy else ""
    return f"{decoder.syntax} decoded with pydicom plugin '{decoder.plugin}' ({', '.join(versions)}){lossy}"


def _check_bits(header: DicomHeader) -> None:
    bits_alloc, bits_stored = header.bits_allocated, header.bits_stored
    if bits_alloc not in (8, 16, 32) or not 1 <= bits_stored <= bits_alloc:
        raise IngestError(f"{header.rel}: BitsAllocated {bits_alloc} / BitsStored {bits_stored} not supported",
                          code="unsupported_dicom")


def _native(blob: bytes, header: DicomHeader, offset: int, declared: int) -> np.ndarray:
    bytes_per = header.bits_allocated // 8
    count = header.n_frames * header.rows * header.columns
    expected = count * bytes_per
    available = max(0, min(len(blob) - offset, declared))
    if available < expected or declared > expected + 1:
        raise IngestError(f"{header.rel}: pixel data holds {available} bytes where "
                          f"{header.n_frames} frame(s) of {header.rows}x{header.columns}x{header.bits_allocated} "
                          f"bits need {expected}; the file is truncated or its size tags are wrong",
                          code="dicom_pixel_length")
    kind = "i" if header.pixel_representation == 1 else "u"
    pixels = np.frombuffer(blob, dtype=f"<{kind}{bytes_per}", count=count, offset=offset)
    return pixels.reshape(header.n_frames, header.rows, header.columns)


def _ensure_transfer_syntax(ds: Any, rel: str) -> None:
    """Files without meta: take the syntax from the encoding pydicom detected (recorded upstream)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit and little is False:
        raise IngestError(f"{rel}: implicit VR big endian is not a DICOM encoding", code="dicom_unreadable")
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _with_pydicom(blob: bytes, header: DicomHeader, dataset: Any, decoder: Decoder | None) -> np.ndarray:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dataset if dataset is not None else pydicom.dcmread(io.BytesIO(blob), force=True)
        if "PixelData" not in ds:
            raise IngestError(f"{header.rel}: no pixel data", code="dicom_pixel_error")
        if decoder is None or not decoder.plugin:  # native data that the fast reader left to pydicom
            expected = header.n_frames * header.rows * header.columns * header.bits_allocated // 8
            actual = len(ds.PixelData)
            if actual < expected or actual > expected + 1:
                raise IngestError(f"{header.rel}: pixel data holds {actual} bytes where {header.n_frames} frame(s) "
                                  f"of {header.rows}x{header.columns}x{header.bits_allocated} bits need {expected}; "
                                  "the file is truncated or its size tags are wrong", code="dicom_pixel_length")
        _ensure_transfer_syntax(ds, header.rel)
        ds.pixel_array_options(decoding_plugin=decoder.plugin if decoder else "")
        pixels = np.asarray(ds.pixel_array)
    return pixels


def decode_stored(blob: bytes, header: DicomHeader, dataset: Any = None) -> np.ndarray:
    """Stored values of every frame, (frames, rows, columns), masked to BitsStored and sign-extended.

    An integer array: the decoded pixels as they are (for native data, a read-only view of ``blob``) when
    no bit needs changing, else a copy in int32 (BitsAllocated up to 16) or int64 (32).
    """
    if header.float_pixels:
        raise IngestError(f"{header.rel}: float pixel data is not supported", code="unsupported_dicom")
    _check_bits(header)
    decoder = decoder_for(header.transfer_syntax, header.rel)
    try:
        if decoder is None and header.pixel_offset is not None and header.pixel_length is not None:
            pixels = _native(blob, header, header.pixel_offset, header.pixel_length)
        else:
            pixels = _with_pydicom(blob, header, dataset, decoder)
    except IngestError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # decoders raise anything (a Rust panic is a BaseException)
        raise IngestError(f"{header.rel}: cannot decode pixel data ({type(exc).__name__}: {str(exc)[:200]})",
                          code="dicom_pixel_error") from exc
    shape = (header.n_frames, header.rows, header.columns)
    if pixels.size != np.prod(shape):
        raise IngestError(f"{header.rel}: decoded pixels have shape {pixels.shape}, expected {shape}",
                          code="dicom_pixel_error")
    values = pixels.reshape(shape)
    bits_stored = header.bits_stored
    masked = bits_stored < header.bits_allocated  # bits above BitsStored carry no value (overlays, garbage)
    inverted = header.photometric == "MONOCHROME1"
    if values.dtype.kind in "iu" and not masked and not inverted:
        return values
    values = values.astype(np.int32 if header.bits_allocated <= 16 else np.int64)
    if masked:
        values &= (1 << bits_stored) - 1
        if header.pixel_representation == 1:
            sign = 1 << (bits_stored - 1)
            values ^= sign
            values -= sign
    if inverted:  # minimum is white: invert within the stored range
        low = -(1 << (bits_stored - 1)) if header.pixel_representation == 1 else 0
        high = (1 << (bits_stored - 1)) - 1 if header.pixel_representation == 1 else (1 << bits_stored) - 1
        np.subtract(low + high, values, out=values)
    return values
