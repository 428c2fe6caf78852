"""DICOM pixel decoding: every compressed transfer syntax against its uncompressed original, bits, inversion."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.errors import IngestError
from pipeline.io.dicom import decode_series, discover_series, read_series_bytes
from pipeline.io.dicom_header import header_from_bytes
from pipeline.io.dicom_pixels import decode_stored
from tests.fixtures.dicom_kinds import encode_jpeg_lossless
from tests.fixtures.dicom_writer import write_series

SHAPE = (6, 5, 3)


def _load(root: Path):
    (series,) = discover_series(sorted(p for p in root.rglob("*") if p.is_file()), root=root).series
    return decode_series(series, read_series_bytes(series)[1])


def _codes(volume) -> list[str]:
    return [code for code, _ in volume.meta["problems"]]


def _reference_mr_small() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    return ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.mark.parametrize(("name", "plugin"), [
    ("MR_small_RLE.dcm", "pylibjpeg-rle"),
    ("MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),
    ("MR_small_jpeg_ls_lossless.dcm", "pyjpegls"),
    ("MR_small_bigendian.dcm", "read by pydicom"),
    ("MR_small_implicit.dcm", None),
    ("MR_small.dcm", None),
])
def test_pydicom_compressed_files_decode_to_the_uncompressed_values(tmp_path: Path, name: str, plugin) -> None:
    shutil.copy(get_testdata_file(name), tmp_path / "image")
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array[:, :, 0], _reference_mr_small().T.astype(np.float32))
    notes = [m for c, m in volume.meta["problems"] if c == "dicom_decoder"]
    if plugin is None:
        assert notes == []  # plain little-endian data: numpy reads it, nothing to record
    else:
        assert len(notes) == 1 and plugin in notes[0]


def test_deflated_file_decodes_to_the_uncompressed_values(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(str(tmp_path / "deflated.dcm"), enforce_file_format=True)
    assert b"MR_small" not in (tmp_path / "deflated.dcm").read_bytes()[200:]  # really deflated
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array[:, :, 0], _reference_mr_small().T.astype(np.float32))
    assert any("Deflated" in m for c, m in volume.meta["problems"] if c == "dicom_decoder")


def _compress_series(tmp_path: Path, stored: np.ndarray, syntax, *, bits: int = 12, signed: bool = True):
    """A synthetic series re-encoded with pydicom's encoders (each file compressed on its own)."""
    written = write_series(tmp_path / "s", stored)
    for path in written.files:
        ds = pydicom.dcmread(str(path))
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
        ds.compress(syntax, encoding_plugin="pydicom" if syntax == RLELossless else "")
        ds.save_as(str(path), enforce_file_format=True)
    return written


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_signed_12_bit_series_survives_lossless_compression(tmp_path: Path, syntax) -> None:
    stored = np.random.default_rng(1).integers(-2048, 2047, size=(40, 36, 3)).astype(np.int16)
    written = _compress_series(tmp_path, stored, syntax)
    assert pydicom.dcmread(str(written.files[0])).file_meta.TransferSyntaxUID == syntax
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    assert "dicom_decoder" in _codes(volume)


def test_jpeg_lossless_sv1_from_an_independent_encoder(tmp_path: Path) -> None:
    stored = np.random.default_rng(2).integers(0, 4095, size=SHAPE).astype(np.int16)
    written = write_series(tmp_path / "s", stored)
    for k, path in enumerate(written.files):
        ds = pydicom.dcmread(str(path))
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        plane = np.ascontiguousarray(stored[:, :, k].T).astype(np.uint16)
        ds.PixelData = encapsulate([encode_jpeg_lossless(plane, precision=16)])
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(str(path), enforce_file_format=True)
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    assert any("JPEG Lossless SV1" in m and "pylibjpeg-libjpeg" in m for m in
               (m for c, m in volume.meta["problems"] if c == "dicom_decoder"))


@pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="Pillow makes the baseline JPEG")
def test_jpeg_baseline_matches_pillow_and_is_marked_lossy(tmp_path: Path) -> None:
    from PIL import Image

    stored = (np.add.outer(np.arange(6) * 30, np.arange(5) * 20)[:, :, None] + np.arange(3) * 5).astype(np.int16)
    written = write_series(tmp_path / "s", stored)
    pillow = []
    for k, path in enumerate(written.files):
        ds = pydicom.dcmread(str(path))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(stored[:, :, k].T).astype(np.uint8)).save(buffer, "JPEG", quality=95)
        pillow.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).T)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.save_as(str(path), enforce_file_format=True)
    volume = _load(tmp_path)
    assert np.abs(volume.array - np.stack(pillow, axis=-1)).max() <= 1  # two IDCTs may round differently
    assert np.abs(volume.array - stored).max() <= 8  # and both are close to the original
    assert any("lossy" in m for c, m in volume.meta["problems"] if c == "dicom_decoder")


def test_missing_decoder_names_the_pip_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(get_testdata_file("MR_small_jp2klossless.dcm"), tmp_path / "image")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openjpeg" else real(name, *a))
    with pytest.raises(IngestError) as info:
        _load(tmp_path)
    assert info.value.code == "dicom_no_decoder"
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in str(info.value) and "image" in str(info.value)


def test_corrupt_compressed_stream_fails_with_a_code(tmp_path: Path) -> None:
    data = bytearray(Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes())
    data[-400:-200] = b"\x00" * 200  # wreck the end of the codestream
    (tmp_path / "image").write_bytes(bytes(data[:-150]))
    with pytest.raises(IngestError) as info:
        _load(tmp_path)
    assert info.value.code in ("dicom_pixel_error", "dicom_unreadable")


@pytest.mark.parametrize(("signed", "low", "high"), [(False, 0, 4095), (True, -2048, 2047)])
def test_monochrome1_is_inverted_within_the_stored_range(tmp_path: Path, signed: bool, low: int, high: int) -> None:
    stored = np.random.default_rng(3).integers(low, high + 1, size=SHAPE).astype(np.int16)
    written = write_series(tmp_path / "s", stored, slope=2.0, intercept=-5.0)
    for path in written.files:
        ds = pydicom.dcmread(str(path))
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.save_as(str(path), enforce_file_format=True)
    volume = _load(tmp_path)
    expected = (low + high - stored.astype(np.float64)) * 2.0 - 5.0
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    assert "dicom_monochrome1" in _codes(volume)


def test_unsigned_12_bit_with_overlay_bits_is_masked(tmp_path: Path) -> None:
    stored = np.random.default_rng(4).integers(0, 4096, size=SHAPE).astype(np.int16)
    written = write_series(tmp_path / "s", stored)
    for path in written.files:
        ds = pydicom.dcmread(str(path))
        raw = np.frombuffer(ds.PixelData, "<u2")
        ds.PixelData = (raw | 0x5000).astype("<u2").tobytes()  # an overlay in bits 12 and 14
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.save_as(str(path), enforce_file_format=True)
    np.testing.assert_array_equal(_load(tmp_path).array, written.expected_values.astype(np.float32))


def test_multi_frame_native_pixels_come_from_the_recorded_offset(tmp_path: Path) -> None:
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    header, _, _ = header_from_bytes(data, path="x", rel="x")
    assert header is not None and header.pixel_offset is not None
    stored = decode_stored(data, header)
    np.testing.assert_array_equal(stored[0], pydicom.dcmread(io.BytesIO(data)).pixel_array)


def test_ct_small_rescales_to_hounsfield_units(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T.astype(np.float32))
    assert volume.spacing == pytest.approx((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]),
                                            float(ds.SliceThickness)))


def test_native_pixels_needing_no_change_are_not_copied(tmp_path: Path) -> None:
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()  # 16 bits stored of 16, MONOCHROME2
    header, _, _ = header_from_bytes(data, path="x", rel="x")
    assert header is not None and header.bits_stored == header.bits_allocated == 16
    stored = decode_stored(data, header)
    assert np.shares_memory(stored, np.frombuffer(data, np.uint8)) and not stored.flags.writeable
    masked = decode_stored(data, dataclasses.replace(header, bits_stored=12))
    assert masked.dtype == np.int32  # a copy, wide enough for the sign extension
    np.testing.assert_array_equal(masked, ((stored.astype(np.int64) & 0xFFF) ^ 0x800) - 0x800)


@pytest.mark.parametrize("name", ["image_dfl.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm"])
def test_bundled_files_without_geometry_decode_like_pydicom(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    header, _, dataset = header_from_bytes(data, path=name, rel=name)
    stored = decode_stored(data, header, dataset)
    reference = pydicom.dcmread(io.BytesIO(data)).pixel_array
    np.testing.assert_array_equal(stored.reshape(reference.shape), reference)


def test_big_endian_file_without_meta_takes_its_encoding_from_the_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))  # pixel bytes stay big endian
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(str(tmp_path / "be"), ds, implicit_vr=False, little_endian=False)
    assert Path(tmp_path / "be").read_bytes()[:2] == b"\x00\x08"  # big endian, no preamble, no meta
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array[:, :, 0], _reference_mr_small().T.astype(np.float32))
    assert "dicom_no_file_meta" in _codes(volume)
