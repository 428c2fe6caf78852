"""Siemens mosaics: tile order along the CSA normal, dcm2niix's position correction, 4D, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.errors import PipelineError
from pipeline.io.dicom import decode_series, discover_series, read_series_bytes
from pipeline.io.dicom_mosaic import CsaError, parse_csa, untile
from tests.fixtures.dicom_kinds import csa_header, write_mosaic


def _load(root: Path):
    (series,) = discover_series(sorted(p for p in root.rglob("*") if p.is_file()), root=root).series
    return decode_series(series, read_series_bytes(series)[1])


def _stored(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 3000, size=shape).astype(np.int16)


@pytest.mark.parametrize("reverse", [False, True])
def test_mosaic_tiles_become_slices_at_their_positions(tmp_path: Path, reverse: bool) -> None:
    stored = _stored((8, 6, 5, 1))  # 5 tiles in a 3x3 grid: the corner correction is not trivial
    _, affine, values = write_mosaic(tmp_path / "m", stored, reverse=reverse, spacing=4.5)
    volume = _load(tmp_path)
    assert volume.shape == (8, 6, 5)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, values.astype(np.float32))
    # independent check of one voxel: tile 0's pixel (column 2, row 3) lies at corner + offsets
    origin = np.array([-30.0, -40.0, 12.0])
    lps = origin + np.array([2 * 2.5, 3 * 2.0, 0.0])
    index = np.linalg.solve(volume.affine, [-lps[0], -lps[1], lps[2], 1.0])[:3]
    np.testing.assert_allclose(index, [2, 3, 4 if reverse else 0], atol=1e-6)
    assert volume.array[2, 3, 4 if reverse else 0] == stored[2, 3, 0, 0]


def test_mosaic_time_series_keeps_volumes_in_acquisition_order(tmp_path: Path) -> None:
    stored = _stored((6, 6, 4, 3), seed=1)
    files, affine, values = write_mosaic(tmp_path / "m", stored)
    for path, new_name in zip(files, ["c.dcm", "a.dcm", "b.dcm"], strict=True):  # names disagree with time
        path.rename(path.with_name(new_name))
    volume = _load(tmp_path)
    assert volume.shape == (6, 6, 4, 3) and volume.meta["volumes"] == 3
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, values.astype(np.float32))


def test_mosaic_without_csa_normal_is_refused(tmp_path: Path) -> None:
    write_mosaic(tmp_path / "m", _stored((4, 4, 3, 1)), with_csa=False)
    with pytest.raises(PipelineError) as info:
        _load(tmp_path)
    assert info.value.code == "dicom_bad_mosaic" and "SliceNormalVector" in str(info.value)


def test_mosaic_without_image_count_is_refused(tmp_path: Path) -> None:
    files, _, _ = write_mosaic(tmp_path / "m", _stored((4, 4, 3, 1)), with_csa=False)
    ds = pydicom.dcmread(str(files[0]))
    del ds[0x0019100A]
    ds.save_as(str(files[0]), enforce_file_format=True)
    with pytest.raises(PipelineError) as info:
        _load(tmp_path)
    assert info.value.code == "dicom_bad_mosaic" and "NumberOfImagesInMosaic" in str(info.value)


def test_csa_parser_reads_items_and_refuses_garbage() -> None:
    parsed = parse_csa(csa_header({"SliceNormalVector": ["0", "0.5", "-1"], "Empty": []}))
    assert parsed == {"SliceNormalVector": ["0", "0.5", "-1"], "Empty": []}
    for bad in (b"", b"SV10" + b"\0" * 4 + b"\xff\xff\xff\xff" + b"\0" * 4, csa_header({"A": ["1"]})[:-6]):
        with pytest.raises(CsaError):
            parse_csa(bad)


def test_untile_reads_tiles_row_major() -> None:
    mosaic = np.arange(36).reshape(6, 6)
    tiles = untile(mosaic, count=7, tile_rows=2, tile_cols=2)
    assert tiles.shape == (7, 2, 2)
    np.testing.assert_array_equal(tiles[4], mosaic[2:4, 2:4])
    np.testing.assert_array_equal(tiles[6], mosaic[4:6, 0:2])
