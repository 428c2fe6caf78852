"""Enhanced multi-frame DICOM: per-frame positions, rescale and temporal index, in any frame order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.errors import PipelineError
from pipeline.io.dicom import DicomOptions, decode_series, discover_series, read_series_bytes
from pipeline.io.dicom_enhanced import groups_from_bytes
from pipeline.io.dicom_header import DicomHeader, _pydicom_header, header_from_tags, read_header
from pipeline.io.dicom_tags import FastParseError, Tags, parse_header
from tests.fixtures.dicom_kinds import write_enhanced
from tests.fixtures.dicom_writer import write_series


def _scan(root: Path):
    return discover_series(sorted(p for p in root.rglob("*") if p.is_file()), root=root).series


def _load(root: Path):
    (series,) = _scan(root)
    return decode_series(series, read_series_bytes(series)[1])


def _stored(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 2000, size=shape).astype(np.int16)


def test_shuffled_frames_with_per_frame_rescale(tmp_path: Path) -> None:
    stored = _stored((7, 5, 4, 1))
    slopes, intercepts = [0.5, 1.0, 2.0, 0.25], [-10.0, 0.0, 3.5, 100.0]
    affine, values = write_enhanced(tmp_path / "e.dcm", stored, slopes=slopes, intercepts=intercepts)
    volume = _load(tmp_path)
    assert volume.shape == (7, 5, 4)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, values.astype(np.float32))


def test_temporal_index_orders_volumes(tmp_path: Path) -> None:
    stored = _stored((6, 4, 3, 5), seed=1)
    affine, values = write_enhanced(tmp_path / "e.dcm", stored, shuffle_seed=7)
    volume = _load(tmp_path)
    assert volume.shape == (6, 4, 3, 5)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, values.astype(np.float32))


def test_frames_of_two_echoes_split_into_two_stacks(tmp_path: Path) -> None:
    stored = _stored((5, 4, 3, 2), seed=2)
    path = tmp_path / "e.dcm"
    _, values = write_enhanced(path, stored, shuffle_seed=None)
    ds = pydicom.dcmread(str(path))
    for item, content in zip(ds.PerFrameFunctionalGroupsSequence, range(6), strict=True):
        echo = pydicom.Dataset()
        echo.EffectiveEchoTime = 5.0 + 10 * (content // 3)  # frames are written volume by volume
        item.MREchoSequence = pydicom.Sequence([echo])
    ds.save_as(str(path), enforce_file_format=True)
    parts = _scan(tmp_path)
    assert len(parts) == 2 and len({p.key for p in parts}) == 2
    got = sorted((decode_series(p, read_series_bytes(p)[1]) for p in parts), key=lambda v: float(v.array[0, 0, 0]))
    want = sorted((values[..., t] for t in range(2)), key=lambda v: float(v[0, 0, 0]))
    for volume, expected in zip(got, want, strict=True):
        assert volume.shape == (5, 4, 3)
        np.testing.assert_array_equal(volume.array, expected.astype(np.float32))


def test_per_frame_group_count_must_match_the_frames(tmp_path: Path) -> None:
    path = tmp_path / "e.dcm"
    write_enhanced(path, _stored((4, 4, 3, 1)))
    ds = pydicom.dcmread(str(path))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData[: 2 * 4 * 4 * 2]
    ds.save_as(str(path), enforce_file_format=True)
    with pytest.raises(PipelineError) as info:
        _load(tmp_path)
    assert info.value.code == "dicom_bad_geometry_value" and "e.dcm" in str(info.value)


def test_the_header_read_at_discovery_is_trusted_when_decoding_and_a_changed_file_is_parsed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding re-parsed every enhanced file with pydicom (4-9 s for 3,600 frames), once per volume with split_4d."""
    path = tmp_path / "e.dcm"
    stored = _stored((6, 4, 3, 4), seed=3)
    affine, values = write_enhanced(path, stored, shuffle_seed=5)
    parts = discover_series([path], root=tmp_path, split_4d=True).series
    assert len(parts) == 4 and all(p.headers[0].header_sha256 and p.headers[0].pixel_offset for p in parts)
    real_read = pydicom.dcmread
    parsed: list[object] = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **kw: parsed.append(a) or real_read(*a, **kw))
    got = sorted((decode_series(p, read_series_bytes(p)[1]) for p in parts), key=lambda v: float(v.array.mean()))
    assert parsed == []  # the bytes before the pixel data are those discovery parsed: no second parse
    want = sorted((values[..., t] for t in range(4)), key=lambda v: float(v.mean()))
    for volume, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(volume.array, expected.astype(np.float32))

    ds = real_read(str(path))  # a frame moved after discovery: the file is parsed again, and the change refused
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[2] = "99.5"
    ds.save_as(str(path), enforce_file_format=True)
    with pytest.raises(PipelineError) as info:
        for part in parts:
            decode_series(part, read_series_bytes(part)[1])
    assert parsed and info.value.code == "dicom_changed" and "e.dcm" in str(info.value)


PHILIPS_SCALES = (2.5, 0.125)  # MR Scale Slope of even and odd frames


def _philips_like(path: Path) -> None:
    """The fixture's file made like a Philips export: undefined-length sequences and items, an MR frame type and
    echo per frame (the echo time splits the frames into two stacks), and Philips' private item per frame, as
    Philips writes it: its MR Scale Slope, and a nested private sequence holding bytes that look like an
    ImagePositionPatient."""
    ds = pydicom.dcmread(str(path))
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame_type, echo = Dataset(), Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        echo.EffectiveEchoTime = 12.5 if index % 2 else 30.0
        item.MRImageFrameTypeSequence = DicomSequence([frame_type])
        item.MREchoSequence = DicomSequence([echo])
        private, inner = Dataset(), Dataset()
        inner.add_new(0x20051011, "OB", b"\x20\x00\x32\x00DS\x06\x009\\9\\9 ")  # an IPP look-alike
        private.add_new(0x20050010, "LO", "Philips MR Imaging DD 001")
        private.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
        private.add_new(0x2005100E, "FL", PHILIPS_SCALES[index % 2])
        private.add_new(0x2005140E, "SQ", DicomSequence([inner, inner]))
        item.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
        item.add_new(0x2005140F, "SQ", DicomSequence([private]))
        item.is_undefined_length_sequence_item = True
        for element in item:
            if element.VR == "SQ":
                element.is_undefined_length = True
    ds["PerFrameFunctionalGroupsSequence"].is_undefined_length = True
    ds.save_as(str(path), enforce_file_format=True)


def _pydicom_route(path: Path) -> DicomHeader:
    header, _ = _pydicom_header(str(path), path=str(path), rel=path.name, full=False)
    return dataclasses.replace(header, pixel_offset=None, pixel_length=None, header_sha256=None)


@pytest.mark.parametrize("philips", [False, True])
def test_functional_groups_are_read_from_the_walkers_bytes_as_pydicom_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, philips: bool) -> None:
    """pydicom's parse of the groups took 2.4 s of the 2.9 s that a 3,600-frame file's header cost."""
    path = tmp_path / "e.dcm"
    stored = _stored((6, 4, 3, 2), seed=4)
    write_enhanced(path, stored, slopes=[1 + f / 10 for f in range(6)], intercepts=[-f for f in range(6)])
    if philips:
        _philips_like(path)
        assert b"\xff\xff\xff\xff" in path.read_bytes()
    want = _pydicom_route(path)
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **kw: pytest.fail("pydicom read the file"))
    got = read_header(path, root=tmp_path, rel=path.name)
    assert got.header_sha256 and got.layout == "multiframe" and len(got.frames) == 6
    assert dataclasses.replace(got, pixel_offset=None, pixel_length=None, header_sha256=None) == want
    if philips:  # the frame type, echo time and Philips' scale slope were read
        assert {frame.split for frame in got.frames} == {(("ORIGINAL", "PRIMARY", "M", "NONE"), 12.5),
                                                        (("ORIGINAL", "PRIMARY", "M", "NONE"), 30.0)}
        assert {frame.philips_scale for frame in got.frames} == set(PHILIPS_SCALES)
    else:
        assert {frame.philips_scale for frame in got.frames} == {None}
    assert sorted(f.slope for f in got.frames) == [1 + f / 10 for f in range(6)]


def test_functional_groups_the_byte_reader_refuses_are_left_to_pydicom(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An element written with VR UN (pydicom's dictionary knows its VR) and an implicit VR file."""
    path = tmp_path / "e.dcm"
    write_enhanced(path, _stored((6, 4, 3, 1), seed=5))
    ds = pydicom.dcmread(str(path))
    position = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    with monkeypatch.context() as patch:
        patch.setattr(pydicom.config, "replace_un_with_known_vr", False)  # else pydicom writes it as DS
        value = "\\".join(map(str, position.ImagePositionPatient)).encode() + b" "
        position[0x00200032] = DataElement(0x00200032, "UN", value)
        ds.save_as(str(path), enforce_file_format=True)
    assert path.read_bytes().count(b"\x20\x00\x32\x00UN") == 1
    implicit = tmp_path / "i.dcm"
    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(str(implicit), enforce_file_format=True)
    for file in (path, implicit):
        raw = parse_header(file.read_bytes())
        with pytest.raises(FastParseError):
            groups_from_bytes(file.read_bytes(), raw)
        got = read_header(file, root=tmp_path, rel=file.name)
        assert got.header_sha256 and len(got.frames) == 3 and not any(f.geometry_error for f in got.frames)
        assert dataclasses.replace(got, pixel_offset=None, pixel_length=None, header_sha256=None) == \
            _pydicom_route(file)


@pytest.mark.parametrize("where", ["macro", "groups"])
def test_sequences_written_as_un_are_refused_by_the_byte_reader(tmp_path: Path, where: str) -> None:
    """A sequence with VR UN holds implicit VR items: read as explicit VR, a macro would be lost unnoticed."""
    path = tmp_path / "e.dcm"
    write_enhanced(path, _stored((6, 4, 3, 1), seed=6))
    _philips_like(path)  # undefined lengths: the VR can change without changing any length
    data = path.read_bytes()
    tag = b"\x20\x00\x13\x91" if where == "macro" else b"\x00\x52\x30\x92"  # PlanePosition, PerFrameFunctionalGroups
    at = data.index(tag + b"SQ\x00\x00\xff\xff\xff\xff") + 4
    patched = data[:at] + b"UN" + data[at + 2:]
    assert groups_from_bytes(data, parse_header(data)).per_frame  # read before the change
    with pytest.raises(FastParseError):
        groups_from_bytes(patched, parse_header(patched))


def _decoded(root: Path, scaling: str) -> dict[float, Any]:
    """Each stack of the folder decoded with ``ingest.philips_scaling`` = ``scaling``, by its echo time."""
    series = discover_series(sorted(p for p in root.rglob("*.dcm")), root=root).series
    options = DicomOptions(philips_scaling=scaling)  # type: ignore[arg-type]
    return {s.headers[0].frames[0].split[1] if len(s.headers) == 1 else 0.0: decode_series(
        s, read_series_bytes(s)[1], options=options) for s in series}


def test_philips_precise_scaling_divides_each_frame_by_its_rescale_and_scale_slopes(tmp_path: Path) -> None:
    """FP = (stored x RS + RI) / (RS x SS), RS/RI each frame's rescale and SS its private MR Scale Slope."""
    path = tmp_path / "e.dcm"
    slopes, intercepts = [0.5, 1.5, 2.0, 0.25, 3.0, 1.0], [-10.0, 4.0, 0.0, 7.5, -1.0, 2.0]
    write_enhanced(path, _stored((5, 4, 6, 1), seed=7), slopes=slopes, intercepts=intercepts, shuffle_seed=None)
    _philips_like(path)  # frame k (slice k): SS = PHILIPS_SCALES[k % 2], echo time 12.5 for odd k, else 30
    display, precise = _decoded(tmp_path, "display"), _decoded(tmp_path, "precise")
    for echo, first in ((30.0, 0), (12.5, 1)):
        slices = range(first, 6, 2)
        scale = PHILIPS_SCALES[first]
        want = np.stack([display[echo].array[:, :, j].astype(np.float64) / (slopes[k] * scale)
                         for j, k in enumerate(slices)], axis=2)
        np.testing.assert_allclose(precise[echo].array, want, rtol=1e-6)
        np.testing.assert_array_equal(precise[echo].affine, display[echo].affine)
        assert [code for code, _ in precise[echo].meta["problems"]].count("dicom_philips_precise") == 1
        assert "dicom_philips_precise" not in [code for code, _ in display[echo].meta["problems"]]
    assert repr(DicomOptions()) == "DicomOptions(gantry_tilt='resample', irregular_slices='refuse')"  # old digests


@pytest.mark.parametrize("creator", ["Philips MR Imaging DD 001", "Another Vendor 1"])
def test_philips_scale_slope_of_single_frame_files_counts_under_philips_creator_only(
        tmp_path: Path, creator: str) -> None:
    def private(ds: Dataset, _: int) -> None:
        ds.add_new(0x20050010, "LO", creator)
        ds.add_new(0x2005100E, "FL", 0.125)

    write_series(tmp_path / "s", _stored((4, 3, 5)), slope=2.0, intercept=-3.0, edit=private)
    display, precise = _decoded(tmp_path, "display")[0.0], _decoded(tmp_path, "precise")[0.0]
    if creator.startswith("Philips"):
        np.testing.assert_allclose(precise.array, display.array.astype(np.float64) / (2.0 * 0.125), rtol=1e-6)
    else:  # another vendor's private block: its element (2005,100E) is not Philips' scale slope
        np.testing.assert_array_equal(precise.array, display.array)
        assert "dicom_philips_precise" not in [code for code, _ in precise.meta["problems"]]


def test_the_tags_written_as_numbers_are_those_their_keywords_name() -> None:
    """dicom_enhanced writes tags as numbers, to read items without pydicom: each against pydicom's dictionary."""
    from pydicom.datadict import tag_for_keyword as tag

    from pipeline.io import dicom_enhanced as enhanced

    assert enhanced._MACROS == {
        tag("PlanePositionSequence"): (tag("ImagePositionPatient"),),
        tag("PlaneOrientationSequence"): (tag("ImageOrientationPatient"),),
        tag("PixelMeasuresSequence"): (tag("PixelSpacing"), tag("SliceThickness"), tag("SpacingBetweenSlices")),
        tag("PixelValueTransformationSequence"): (tag("RescaleSlope"), tag("RescaleIntercept")),
    }
    assert enhanced._FRAME_TYPE_MACROS == tuple(tag(k) for k in (
        "MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence",
        "XAXRFFrameCharacteristicsSequence"))
    assert enhanced._TOP_FALLBACKS == tuple(tag(k) for k in ("RescaleSlope", "RescaleIntercept", "SliceThickness",
                                                             "SpacingBetweenSlices"))
    assert (enhanced._CONTENT, enhanced._ECHO, enhanced._FRAME_TYPE, enhanced._TEMPORAL, enhanced._ECHO_TIME,
            enhanced._ECHO_NUMBERS) == tuple(tag(k) for k in (
                "FrameContentSequence", "MREchoSequence", "FrameType", "TemporalPositionIndex", "EffectiveEchoTime",
                "EchoNumbers"))


def test_the_byte_reader_refuses_damaged_functional_groups_and_never_fails_otherwise(tmp_path: Path) -> None:
    """Every byte of the groups' encoding damaged in turn (a seeded sample): the reader reads the file or raises
    FastParseError (pydicom then reads it, or the file is refused); no other exception escapes it."""
    path = tmp_path / "e.dcm"
    write_enhanced(path, _stored((4, 3, 3, 2), seed=8))
    _philips_like(path)
    data = path.read_bytes()
    start, stop = parse_header(data).spans[0x52009230]
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for at in rng.choice(np.arange(start, stop), size=400, replace=False):
        damaged = data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:]
        try:
            raw = parse_header(damaged)
            groups = groups_from_bytes(damaged, raw)
        except FastParseError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1  # and the frames are gathered from what was read, whatever the values
        header = header_from_tags(Tags(raw=raw), path=str(path), rel="e.dcm", transfer_syntax=raw.transfer_syntax,
                                  has_meta=raw.has_meta, pixels=True, groups=groups)
        assert header is None or header.frames
    assert outcomes["read"] and outcomes["refused"]  # value bytes read as they are; structure refused
