"""A decoded DICOM stack: rescaled exactly, held in NIfTI's (Fortran) voxel order, stored as int16 when lossless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.io.dicom import _place, decode_series, discover_series, read_series_bytes, storage_dtype
from tests.fixtures.dicom_writer import write_series


def _reference(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return (stored.astype(np.float64) * slope + intercept).T.astype(np.float32)


@pytest.mark.parametrize(("dtype", "slope", "intercept"), [
    (np.int16, 1.0, -1024.0),  # CT
    (np.uint16, 1.0, 8_388_000.0),  # sums near 2**23
    (np.uint16, 1.0, 9_000_000.0),  # and past it
    (np.int16, 1.0, 0.5),  # a fractional intercept
    (np.int16, 0.000244140625, -7.25),  # a real slope
    (np.int32, 1.0, 3.0),  # 32-bit stored values
])
def test_rescale_matches_float64_rounded_once(dtype: type, slope: float, intercept: float) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    stored = rng.integers(max(info.min, -2**20), min(info.max, 2**20), size=(5, 6), endpoint=True).astype(dtype)
    stored.flat[:2] = [max(info.min, -2**20), min(info.max, 2**20)]
    dest = np.empty((6, 5), dtype=np.float32, order="F")
    _place(dest, stored, slope, intercept)
    np.testing.assert_array_equal(dest, _reference(stored, slope, intercept))


def test_decoded_series_is_fortran_ordered_with_exact_values(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(-500, 1500, size=(7, 5, 4)).astype(np.int16)
    written = write_series(tmp_path / "s", stored, intercept=-1024.0, modality="CT")
    (series,) = discover_series(sorted(written.files), root=tmp_path).series
    volume = decode_series(series, read_series_bytes(series)[1])
    assert volume.array.flags.f_contiguous  # NIfTI's order: written without a transposing copy
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    assert storage_dtype(volume.array) is np.int16


@pytest.mark.parametrize("order", ["C", "F"])
def test_storage_dtype_checks_every_slice(order: str) -> None:
    whole = np.asarray(np.arange(-60, 60, dtype=np.float32).reshape(4, 5, 6), order=order)
    assert storage_dtype(whole) is np.int16
    fractional = whole.copy(order=order)
    fractional[3, 4, 5] += 0.5  # the last voxel of the last slice
    assert storage_dtype(fractional) is np.float32
    assert storage_dtype(whole + 40_000) is np.float32  # whole numbers past int16
    assert storage_dtype(np.zeros((0, 3, 3), dtype=np.float32)) is np.float32
    four_d = np.stack([whole, fractional], axis=-1)
    assert storage_dtype(four_d) is np.float32
    assert storage_dtype(np.stack([whole, whole], axis=-1)) is np.int16
