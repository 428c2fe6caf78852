"""Gantry tilt and irregular slice spacing: refused or resampled by configuration, never a sheared affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import GeometryError
from pipeline.io.dicom import DicomOptions, decode_series, discover_series, read_series_bytes
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import shear_magnitude
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.dicom_writer import write_series

COLS, ROWS = 9, 8
COEF = np.array([3.0, 2.0, 4.0])  # value = COEF . LPS position + 100: linear, so interpolation is exact


def _field(lps: np.ndarray) -> np.ndarray:
    return lps @ COEF + 100.0


def _write(root: Path, positions: list[np.ndarray]) -> None:
    """A series whose voxel values are the linear field at their own LPS positions (row x, column y)."""
    stored = np.zeros((COLS, ROWS, len(positions)), np.int16)
    i, j = np.meshgrid(np.arange(COLS), np.arange(ROWS), indexing="ij")
    for k, p in enumerate(positions):
        lps = np.stack([p[0] + i, p[1] + j, np.full(i.shape, p[2])], axis=-1)
        stored[:, :, k] = np.rint(_field(lps)).astype(np.int16)
    write_series(root / "s", stored, positions=positions, pixel_spacing=(1.0, 1.0), shuffle_seed=2)


def _decode(root: Path, **options):
    (series,) = discover_series(sorted(p for p in root.rglob("*") if p.is_file()), root=root).series
    return decode_series(series, read_series_bytes(series)[1], options=DicomOptions(**options))


def _check_against_field(volume, valid: np.ndarray) -> None:
    index = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    ras = (volume.affine @ np.c_[index, np.ones(len(index))].T).T[:, :3]
    expected = _field(ras * np.array([-1, -1, 1])).reshape(volume.shape)
    assert valid.any()
    np.testing.assert_allclose(volume.array[valid], expected[valid], atol=1e-3)


def _tilted(step: float = 2.0, drift: float = 0.5, n: int = 5) -> list[np.ndarray]:
    return [np.array([-10.0, -20.0 + k * drift, 30.0 + k * step]) for k in range(n)]


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    _write(tmp_path, _tilted())
    volume = _decode(tmp_path, gantry_tilt="resample")
    assert volume.shape == (COLS, ROWS, 5) and shear_magnitude(volume.affine) < 1e-9
    np.testing.assert_allclose(volume.affine[:3, 3], [10.0, 20.0, 30.0])
    np.testing.assert_allclose(np.diag(volume.affine)[:3], [-1, -1, 2])
    rows_inside = np.arange(ROWS)[None, :, None] - 0.5 * np.arange(5)[None, None, :] >= 0  # read from slice k
    _check_against_field(volume, np.broadcast_to(rows_inside, volume.shape))
    (code, message), = [p for p in volume.meta["problems"] if p[0].startswith("dicom_gantry")]
    assert code == "dicom_gantry_tilt_resampled" and "14.04 degrees" in message
    assert volume.array[:, 0, 4].max() == volume.array.min()  # read from outside the data: the fill value


def test_gantry_tilt_is_refused_by_policy(tmp_path: Path) -> None:
    _write(tmp_path, _tilted())
    with pytest.raises(GeometryError) as info:
        _decode(tmp_path, gantry_tilt="refuse")
    assert info.value.code == "dicom_gantry_tilt" and "ingest.gantry_tilt=resample" in str(info.value)


@pytest.mark.parametrize(("offsets", "slices"), [([0, 1, 2, 4, 5], 6), ([0, 1.5, 3, 4.5, 7.5], 6), ([0, 1, 3, 6], 7)])
def test_missing_or_variable_slices_are_resampled_by_policy(tmp_path: Path, offsets, slices: int) -> None:
    _write(tmp_path, [np.array([-10.0, -20.0, 30.0 + z]) for z in offsets])
    with pytest.raises(GeometryError) as info:
        _decode(tmp_path)  # the default policy refuses
    assert info.value.code == "dicom_nonuniform_spacing"
    volume = _decode(tmp_path, irregular_slices="resample")
    assert volume.shape == (COLS, ROWS, slices) and shear_magnitude(volume.affine) < 1e-9
    assert volume.affine[2, 2] == pytest.approx(offsets[-1] / (slices - 1))
    _check_against_field(volume, np.ones(volume.shape, bool))
    assert "dicom_irregular_slices_resampled" in [c for c, _ in volume.meta["problems"]]


def test_tilt_and_gap_together(tmp_path: Path) -> None:
    positions = _tilted(n=6)
    del positions[3]
    _write(tmp_path, positions)
    volume = _decode(tmp_path, gantry_tilt="resample", irregular_slices="resample")
    assert volume.shape == (COLS, ROWS, 6)
    rows_inside = np.arange(ROWS)[None, :, None] - 0.5 * np.arange(6)[None, None, :] >= 0.5
    _check_against_field(volume, np.broadcast_to(rows_inside, volume.shape))
    codes = [c for c, _ in volume.meta["problems"]]
    assert "dicom_gantry_tilt_resampled" in codes and "dicom_irregular_slices_resampled" in codes


def test_wildly_irregular_stack_is_refused_even_when_resampling(tmp_path: Path) -> None:
    _write(tmp_path, [np.array([-10.0, -20.0, z]) for z in (0.0, 0.1, 20.0, 40.0)])
    with pytest.raises(GeometryError) as info:
        _decode(tmp_path, irregular_slices="resample")
    assert info.value.code == "dicom_nonuniform_spacing" and "too irregular" in str(info.value)


def test_stage_applies_the_configured_policy(tmp_path: Path) -> None:
    _write(tmp_path / "scan", _tilted())
    ingest(tmp_path / "scan", tmp_path / "default")
    (study,) = load_manifest(tmp_path / "default").studies
    assert study.status == "ok" and "dicom_gantry_tilt_resampled" in [p.code for p in study.problems]
    assert shear_magnitude(load_nifti(tmp_path / "default" / study.image).affine) < 1e-6
    record = ingest(tmp_path / "scan", tmp_path / "refuse",
                    config=load_config(None, overrides=["ingest.gantry_tilt=refuse"]))
    assert record["status"] == "failed"
    (study,) = load_manifest(tmp_path / "refuse").studies
    assert study.status == "failed" and study.error.code == "dicom_gantry_tilt"
