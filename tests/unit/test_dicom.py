"""DICOM series reading: discovery, slice ordering, the LPS->RAS affine, rescale, and refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from pipeline.errors import GeometryError, PipelineError
from pipeline.io.dicom import DicomSeries, decode_series, discover_series, read_series_bytes, skip_reason
from pipeline.io.dicom_geometry import series_affine
from pipeline.io.dicom_slice import SliceGeometry
from tests.fixtures.dicom_writer import oblique_cosines, write_junk, write_series

SHAPE = (6, 5, 4)  # columns, rows, slices


def _stored(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, size=shape).astype(np.int16)


def _scan(root: Path) -> list[DicomSeries]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return discover_series(files, root=root).series


def _load(root: Path):
    (series,) = _scan(root)
    _, blobs = read_series_bytes(series)
    return decode_series(series, blobs)


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(str(path))
    change(ds)
    ds.save_as(str(path))


def test_axial_series_exact_affine_and_values(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(), origin=(-20.0, -30.0, 10.0), pixel_spacing=(0.8, 0.6), step=2.0)
    volume = _load(tmp_path)
    expected = np.array([[-0.6, 0, 0, 20.0], [0, -0.8, 0, 30.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, expected, atol=1e-4)
    np.testing.assert_allclose(written.expected_affine_ras, expected, atol=1e-9)
    assert volume.array.dtype == np.int16  # whole numbers in range: decoded straight into int16
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    assert volume.orientation == "LPS" and volume.spacing == pytest.approx((0.6, 0.8, 2.0))


def test_shuffled_files_and_instance_numbers_give_identical_volume(tmp_path: Path) -> None:
    stored = _stored(1)
    ordered = _load_written(tmp_path / "a", stored, shuffle_seed=None)
    shuffled = _load_written(tmp_path / "b", stored, shuffle_seed=5, name_pattern="x{index}")
    np.testing.assert_array_equal(ordered.array, shuffled.array)
    np.testing.assert_allclose(ordered.affine, shuffled.affine, atol=1e-9)


def _load_written(root: Path, stored: np.ndarray, **kwargs):
    write_series(root / "series", stored, **kwargs)
    return _load(root)


def test_oblique_series_with_per_slice_rescale_and_reversed_stacking(tmp_path: Path) -> None:
    row, col = oblique_cosines(25.0)
    written = write_series(tmp_path / "s", _stored(2), row_cosine=row, col_cosine=col, origin=(12.5, -40.25, 80.0),
                           pixel_spacing=(0.9, 1.1), step=-1.5, slope=[1.0, 2.0, 0.5, 0.25],
                           intercept=[0.0, -1024.0, 3.0, 7.5], shuffle_seed=3)
    volume = _load(tmp_path)
    np.testing.assert_allclose(volume.affine, written.expected_affine_ras, atol=1e-4)
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    # slice k of the volume must be the file whose position is k-th along the normal
    normal = np.cross(row, col)
    lps_origin = np.diag([-1, -1, 1]) @ volume.affine[:3, 3]
    assert float(lps_origin @ normal) == pytest.approx(min(np.asarray((12.5, -40.25, 80.0)) @ normal - 1.5 * k
                                                           for k in range(4)), abs=1e-4)


@pytest.mark.parametrize(
    ("row", "col"),
    [((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # head-first supine axial
     ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # prone axial
     ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))],  # sagittal
)
def test_marker_voxel_lands_at_its_ras_position(tmp_path: Path, row, col) -> None:
    stored = np.zeros(SHAPE, np.int16)
    stored[2, 3, 1] = 1000  # column 2, row 3, second slice along the normal
    origin, spacing, step = np.array([10.0, 20.0, 30.0]), (0.8, 0.6), 2.0
    write_series(tmp_path / "s", stored, origin=origin, row_cosine=row, col_cosine=col, pixel_spacing=spacing,
                 step=step, shuffle_seed=1)
    volume = _load(tmp_path)
    index = np.array(np.unravel_index(int(np.argmax(volume.array)), volume.shape))
    normal = np.cross(row, col)
    lps = origin + 2 * spacing[1] * np.array(row) + 3 * spacing[0] * np.array(col) + 1 * step * normal
    ras = volume.affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_two_series_in_one_folder_and_junk_files(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", _stored(3), series_tag="one", name_pattern="a{index}.dcm")
    write_series(tmp_path / "mixed", _stored(4, (7, 3, 2)), series_tag="two", name_pattern="b{index}")
    write_junk(tmp_path / "mixed")
    scan = discover_series(sorted(p for p in tmp_path.rglob("*") if p.is_file()), root=tmp_path)
    assert scan.ignored == 4
    assert sorted(len(s.headers) for s in scan.series) == [2, 4]
    assert {s.folder for s in scan.series} == {"mixed"}
    assert len({s.key for s in scan.series}) == 2
    shapes = sorted(decode_series(s, read_series_bytes(s)[1]).shape for s in scan.series)
    assert shapes == [(6, 5, 4), (7, 3, 2)]


def test_file_without_preamble_and_implicit_vr_without_meta(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(5), preamble=False)
    ds = pydicom.dcmread(str(written.files[0]), force=True)
    del ds.file_meta
    pydicom.dcmwrite(str(written.files[0]), ds, implicit_vr=True, little_endian=True)
    volume = _load(tmp_path)
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    assert ("dicom_no_file_meta" in {code for code, _ in volume.meta["problems"]})


def test_identical_duplicate_file_is_dropped_with_a_problem(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(6))
    (tmp_path / "s" / "copy.dcm").write_bytes(written.files[0].read_bytes())
    volume = _load(tmp_path)
    assert volume.shape == SHAPE
    assert "dicom_duplicate_file" in {code for code, _ in volume.meta["problems"]}


def test_bits_above_bits_stored_are_ignored(tmp_path: Path) -> None:
    stored = np.random.default_rng(7).integers(-2048, 2047, size=SHAPE).astype(np.int16)
    written = write_series(tmp_path / "s", stored)
    for path in written.files:
        def garbage(ds: pydicom.Dataset) -> None:
            raw = np.frombuffer(ds.PixelData, "<i2").astype(np.uint16)
            ds.PixelData = ((raw & 0x0FFF) | 0xA000).astype("<u2").tobytes()  # 12-bit signed, junk above
            ds.BitsStored, ds.HighBit = 12, 11
        _edit(path, garbage)
    np.testing.assert_array_equal(_load(tmp_path).array, written.expected_values.astype(np.float32))


@pytest.mark.parametrize(
    ("change", "code"),
    [(lambda ds: setattr(ds, "RescaleSlope", "0"), "dicom_bad_rescale"),
     (lambda ds: setattr(ds, "NumberOfFrames", 2), "unsupported_dicom"),  # frames without positions
     (lambda ds: (setattr(ds.file_meta, "TransferSyntaxUID", JPEGBaseline8Bit),
                 setattr(ds, "PixelData", encapsulate([b"\xff\xd8not-a-jpeg\xff\xd9"]))), "dicom_pixel_error"),
     (lambda ds: setattr(ds, "PixelData", ds.PixelData[:-10]), "dicom_pixel_length"),
     (lambda ds: delattr(ds, "ImagePositionPatient"), "dicom_missing_geometry"),
     (lambda ds: setattr(ds, "PixelSpacing", [0.8, 0.7]), "dicom_inconsistent_spacing")],
)  # a different orientation, size or image type splits the series instead (tests/unit/test_dicom_split.py)
def test_bad_slice_fails_the_series_with_a_code_naming_the_file(tmp_path: Path, change, code: str) -> None:
    written = write_series(tmp_path / "s", _stored(8))
    _edit(written.files[1], change)
    with pytest.raises(PipelineError) as info:
        _load(tmp_path)
    assert info.value.code == code
    assert "s/IM" in str(info.value)


def test_unparseable_geometry_number_is_refused(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(8), pixel_spacing=(0.8, 0.6))
    data = written.files[2].read_bytes()
    assert data.count(b"0.8\\0.6") == 1
    written.files[2].write_bytes(data.replace(b"0.8\\0.6", b"0.8\\0,x"))
    with pytest.raises(GeometryError) as info:
        _load(tmp_path)
    assert info.value.code == "dicom_bad_geometry_value"
    assert "s/IM0003.dcm" in str(info.value) and "PixelSpacing" in str(info.value)


@pytest.mark.parametrize(
    "iop", [[1, 0, 0, 0.1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0.7071068, 0.7071068, 0], [1, 0, 0]])
def test_malformed_orientation_is_refused(tmp_path: Path, iop) -> None:
    written = write_series(tmp_path / "s", _stored(8))
    for path in written.files:
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", iop))
    with pytest.raises(GeometryError) as info:
        _load(tmp_path)
    assert info.value.code in ("dicom_bad_orientation", "dicom_bad_geometry_value")


def _slices(positions, orientation=(1, 0, 0, 0, 1, 0)) -> list[SliceGeometry]:
    return [SliceGeometry(name=f"f{i}", rows=4, columns=4, position=tuple(map(float, p)),
                          orientation=tuple(map(float, orientation)), pixel_spacing=(1.0, 1.0))
            for i, p in enumerate(positions)]


@pytest.mark.parametrize(
    ("positions", "code"),
    [([(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 4)], "dicom_nonuniform_spacing"),  # a missing slice
     ([(0, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 2)], "dicom_duplicate_position"),
     ([(0, 0, 0), (0, 0.3, 1), (0, 0.6, 2), (0, 0.9, 3)], "dicom_gantry_tilt")],
)
def test_series_affine_refuses_irregular_stacks(positions, code: str) -> None:
    with pytest.raises(GeometryError) as info:
        series_affine(_slices(positions))
    assert info.value.code == code


def test_series_affine_orders_by_normal_not_by_input() -> None:
    order, affine = series_affine(_slices([(0, 0, 3), (0, 0, 1), (0, 0, 2)]))
    assert order == [1, 2, 0]
    np.testing.assert_allclose(affine[:3, 3], [0, 0, 1])
    np.testing.assert_allclose(np.diag(affine)[:3], [-1, -1, 1])


def test_inconsistent_orientation_is_refused() -> None:
    slices = _slices([(0, 0, 0), (0, 0, 1)])
    slices[1] = SliceGeometry(name="f1", rows=4, columns=4, position=(0.0, 0.0, 1.0),
                              orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), pixel_spacing=(1.0, 1.0))
    with pytest.raises(GeometryError) as info:
        series_affine(slices)
    assert info.value.code == "dicom_inconsistent_orientation"


def test_single_slice_uses_slice_thickness_or_refuses() -> None:
    (one,) = _slices([(5, 6, 7)])
    with pytest.raises(GeometryError) as info:
        series_affine([one])
    assert info.value.code == "dicom_missing_geometry"
    thick = SliceGeometry(**{**one.__dict__, "slice_thickness": 3.0})
    _, affine = series_affine([thick])
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 3.0])


def test_image_files_without_pixel_data_are_set_apart_and_skipped(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(9))
    _edit(written.files[0], lambda ds: delattr(ds, "PixelData"))
    images, objects = sorted(_scan(tmp_path), key=lambda s: s.part)
    assert len(images.headers) == 3 and skip_reason(images) is None
    assert [h.rel for h in objects.headers] == ["s/IM0001.dcm"] and objects.key != images.key
    assert skip_reason(objects)[0] == "dicom_no_pixel_data"
