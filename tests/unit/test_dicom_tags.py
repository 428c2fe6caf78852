"""The fast header walker: same headers as pydicom, sequences skipped, prefixes, refusals, junk."""

from __future__ import annotations

import dataclasses
import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.errors import FileUnreadable
from pipeline.io.dicom_header import _pydicom_header, header_from_bytes, read_header
from pipeline.io.dicom_tags import FastParseError, NeedMoreData, NotDicom, parse_header
from tests.fixtures.dicom_kinds import write_mosaic
from tests.fixtures.dicom_writer import oblique_cosines, write_series

_FAST_ONLY = ("pixel_offset", "pixel_length", "header_sha256")


def _without_fast_fields(header):
    return dataclasses.replace(header, **{name: None for name in _FAST_ONLY})


def _both(data: bytes, rel: str = "f.dcm"):
    fast, raw, ds = header_from_bytes(data, path=rel, rel=rel)
    slow, _ = _pydicom_header(io.BytesIO(data), path=rel, rel=rel, full=True)
    return fast, raw, ds, slow


def _assert_same(data: bytes) -> None:
    fast, raw, ds, slow = _both(data)
    assert raw is not None and ds is None, "expected the fast walker to read this file"
    assert fast is not None and slow is not None
    assert _without_fast_fields(fast) == slow


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "priv_SQ.dcm", "nested_priv_SQ.dcm", "rtdose.dcm",
                                  "ExplVR_LitEndNoMeta.dcm"])
def test_fast_walker_agrees_with_pydicom_on_its_test_files(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    try:
        raw = parse_header(data)
    except FastParseError:
        pytest.fail(f"{name}: the walker gave up")
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" in ds and raw.pixel_length is not None:
        assert data[raw.pixel_offset:raw.pixel_offset + raw.pixel_length] == ds.PixelData
    fast, _, _, slow = _both(data)
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert _without_fast_fields(fast) == slow


def _series_file(tmp_path: Path, **kwargs) -> Path:
    row, col = oblique_cosines(17.0)
    written = write_series(tmp_path / "s", np.arange(30, dtype=np.int16).reshape(6, 5, 1), row_cosine=row,
                           col_cosine=col, slope=1.5, intercept=-3.0, **kwargs)
    return written.files[0]


def test_undefined_length_sequences_and_un_elements_are_skipped(tmp_path: Path) -> None:
    def nested(ds: Dataset, _: int) -> None:
        inner = Dataset()
        inner.CodeValue, inner.CodeMeaning = "1", "ImagePositionPatient look-alike \\x20\\x00\\x32\\x00"
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3"
        item.PurposeOfReferenceCodeSequence = DicomSequence([inner, inner])
        ds.ReferencedImageSequence = DicomSequence([item, item])
        ds.add_new(0x00091010, "UN", b"\x20\x00\x32\x00DS\x04\x001\\2\\3 " * 3)  # bytes that look like an IPP

    path = _series_file(tmp_path, edit=nested)
    ds = pydicom.dcmread(str(path))
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
    ds.save_as(str(path), enforce_file_format=True)
    data = path.read_bytes()
    assert b"\xff\xff\xff\xff" in data and b"\xfe\xff\xdd\xe0" in data  # really undefined lengths
    _assert_same(data)


def test_implicit_vr_files_read_like_pydicom(tmp_path: Path) -> None:
    path = _series_file(tmp_path)
    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(str(path), enforce_file_format=True)
    _assert_same(path.read_bytes())


def _with_group_lengths(ds: Dataset, *, implicit: bool = False) -> bytes:
    """``ds`` as a file with a correct group length element (gggg,0000) heading each group, as GE writes (pydicom
    writes none: they are retired)."""
    uid = pydicom.uid
    ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
    whole = io.BytesIO()
    ds.save_as(whole, enforce_file_format=True)
    meta_end = 132 + 12 + struct.unpack_from("<I", whole.getvalue(), 140)[0]
    body = b""
    for group in sorted({tag.group for tag in ds.keys()}):
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        write_dataset(buffer, Dataset({tag: ds[tag] for tag in ds.keys() if tag.group == group}))
        members = buffer.getvalue()
        head = struct.pack("<HHI", group, 0, 4) if implicit else struct.pack("<HH2sH", group, 0, b"UL", 4)
        body += head + struct.pack("<I", len(members)) + members
    return whole.getvalue()[:meta_end] + body


def _ge_like(tmp_path: Path) -> Dataset:
    """A slice with patient and private groups that the walker reads nothing of, and a private group it reads."""
    def groups(ds: Dataset, _: int) -> None:
        for group, count in ((0x0009, 9), (0x0043, 40)):
            ds.add_new((group, 0x0010), "LO", "GEMS_PARM_01")
            for element in range(count):
                ds.add_new((group, 0x1001 + element), "DS", f"{element}.5")
        ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
        ds.add_new(0x0019100A, "US", 1)
        ds.add_new(0x00191020, "DS", "7")

    return pydicom.dcmread(str(_series_file(tmp_path, edit=groups)))


def _length_at(data: bytes, group: int) -> int:
    """Where the value of ``group``'s group length element (explicit VR) lies in ``data``."""
    return data.index(struct.pack("<HH", group, 0) + b"UL\x04\x00") + 8


def _with_length(data: bytes, group: int, change: int) -> bytes:
    """``data`` with ``group``'s group length element (explicit VR) off by ``change`` bytes: stale."""
    at = _length_at(data, group)
    return data[:at] + struct.pack("<I", struct.unpack_from("<I", data, at)[0] + change) + data[at + 4:]


def _garbled_in_group(data: bytes, group: int, *, implicit: bool = False) -> bytes:
    """``data`` with an element inside private ``group`` made unreadable: its VR replaced by bytes that are no VR
    (explicit VR), or its length by one past the end of the file (implicit VR)."""
    at = data.index(struct.pack("<HH", group, 0x1010)) + 4
    return data[:at] + (struct.pack("<I", len(data)) if implicit else b"\x01\x02") + data[at + (4 if implicit else 2):]


@pytest.mark.parametrize("implicit", [False, True])
def test_group_lengths_skip_groups_the_walker_reads_nothing_of(tmp_path: Path, implicit: bool) -> None:
    data = _with_group_lengths(_ge_like(tmp_path), implicit=implicit)
    _assert_same(data)
    raw = parse_header(data)
    assert raw.values[0x0019100A] == (b"US", b"\x01\x00")  # a group read up to its last wanted element
    assert data[raw.pixel_offset:] == pydicom.dcmread(io.BytesIO(data)).PixelData
    garbled = _garbled_in_group(data, 0x0043, implicit=implicit)  # a walk through group 0043 stops there
    assert parse_header(garbled).values == raw.values and parse_header(garbled).pixel_offset == raw.pixel_offset


@pytest.mark.parametrize("change", [-8, -2, 2, 8, 10_000])
def test_a_stale_group_length_is_not_trusted(tmp_path: Path, change: int) -> None:
    data = _with_group_lengths(_ge_like(tmp_path))
    reference = parse_header(data)
    for group in (0x0043, 0x0010, 0x0018, 0x0019):  # groups skipped whole, or after their last element read
        raw = parse_header(_with_length(data, group, change))
        assert (raw.values, raw.pixel_offset, raw.pixel_length) == (reference.values, reference.pixel_offset,
                                                                    reference.pixel_length)
    with pytest.raises(FastParseError):  # not trusted, so walked through: garbage inside the group is met
        parse_header(_with_length(_garbled_in_group(data, 0x0043), 0x0043, change))


def test_mosaic_private_tags_and_csa_are_read_by_both(tmp_path: Path) -> None:
    files, _, _ = write_mosaic(tmp_path / "m", np.zeros((4, 3, 5, 1), np.int16))
    fast, _, _, slow = _both(files[0].read_bytes())
    assert fast.layout == "mosaic" and len(fast.frames) == 5
    assert _without_fast_fields(fast) == slow


def test_headers_beyond_the_first_read_are_completed(tmp_path: Path) -> None:
    path = _series_file(tmp_path, edit=lambda ds, _: ds.add_new(0x00091011, "OB", b"\0" * 100_000))
    root = tmp_path
    with pytest.raises(NeedMoreData):
        parse_header(path.read_bytes()[:65536])
    header = read_header(path, root=root)
    assert header is not None and header.pixel_offset == len(path.read_bytes()) - 60
    assert _without_fast_fields(header) == _pydicom_header(str(path), path=str(path), rel="s/IM0001.dcm",
                                                           full=False)[0]


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_big_endian_and_deflate_are_left_to_pydicom(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    with pytest.raises(FastParseError) as caught:
        parse_header(data)
    assert not isinstance(caught.value, NotDicom)  # a DICOM file that pydicom must read
    fast, raw, ds, _ = _both(data)
    assert raw is None and ds is not None and fast is not None


def test_a_file_that_cannot_be_read_again_by_pydicom_is_unreadable_not_junk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker opens a big endian file and leaves it to pydicom; by then its permissions have changed."""
    path = tmp_path / "s" / "slice.dcm"
    path.parent.mkdir()
    path.write_bytes(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes())

    def denied(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(pydicom.filereader, "open", denied, raising=False)
    with pytest.raises(FileUnreadable) as caught:
        read_header(path, root=tmp_path)
    assert caught.value.reason == "Permission denied" and str(caught.value).startswith("s/slice.dcm: cannot be read")
    monkeypatch.undo()
    assert read_header(path, root=tmp_path) is not None


def test_an_os_error_a_parser_raises_still_means_not_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "slice.dcm"
    path.write_bytes(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes())

    def parser_error(*args: object, **kwargs: object) -> object:
        raise OSError("not a gzipped file")  # no errno: a library's complaint about the bytes, not the disk's

    monkeypatch.setattr(pydicom, "dcmread", parser_error)
    assert read_header(path, root=tmp_path) is None


@pytest.mark.parametrize("junk", [b"", b"hello\n", bytes(range(256)) * 20, b"\0\0\0\1Bud1" + b"\0" * 64,
                                  b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7fxx"])
def test_junk_is_refused_or_ignored(junk: bytes, tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(junk)
    assert read_header(path, root=tmp_path) is None


@pytest.mark.parametrize("text", [b"Study exported 2018-09-18 by the scanner\n", b"PK\x03\x04" + b"\0" * 40,
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"tiny"])
def test_files_that_cannot_be_dicom_are_told_apart_without_pydicom(text: bytes) -> None:
    """A README, an archive or a picture in a scan folder: refused by the walker itself (NotDicom), so that
    discovery never imports pydicom for it; a big endian data set (above) is a FastParseError only."""
    with pytest.raises(NotDicom):
        parse_header(text)
