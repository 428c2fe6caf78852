"""A decoded DICOM stack: rescaled exactly, held in NIfTI's (Fortran) voxel order, stored as int16 when lossless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.io.dicom import (
    _fresh_volume,
    _place,
    _place_int16,
    decode_series,
    discover_series,
    read_series_bytes,
    storage_dtype,
)
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
    assert volume.array.dtype == np.int16  # whole numbers in range: decoded straight into what is stored
    np.testing.assert_array_equal(volume.array, written.expected_values)
    assert storage_dtype(volume.array) is np.int16


@pytest.mark.parametrize(("dtype", "slope", "intercept"), [
    (np.uint16, 1.0, -1024.0),  # CT, unsigned
    (np.int16, 1.0, 0.0),  # no rescale
    (np.uint16, 1.0, -32768.0),  # stored values past int16, sums inside it
    (np.int16, -3.0, 7.0),  # a negative whole slope
    (np.uint32, 2.0, -4_294_000_000.0),  # wide terms
])
def test_int16_placement_is_exact(dtype: type, slope: float, intercept: float) -> None:
    info = np.iinfo(dtype)
    low = max(info.min, int(np.ceil((-32768 - intercept) / slope)) if slope > 0 else -10_000)
    high = min(info.max, int((32767 - intercept) // slope) if slope > 0 else 10_000)
    stored = np.random.default_rng(3).integers(low, high, size=(5, 6), endpoint=True).astype(dtype)
    stored.flat[:2] = [low, high]
    dest = np.zeros((6, 5), dtype=np.int16, order="F")
    assert _place_int16(dest, stored, slope, intercept)
    np.testing.assert_array_equal(dest, stored.astype(np.float64).T * slope + intercept)


def test_int16_placement_refuses_values_outside_int16() -> None:
    dest = np.full((3, 2), 5, dtype=np.int16, order="F")
    stored = np.array([[0, 1, 2], [3, 4, 32767]], dtype=np.uint16)
    assert not _place_int16(dest, stored, 1.0, 1.0)  # one sum is 32768
    assert not _place_int16(dest, stored, 2.0, 0.0)
    assert (dest == 5).all()  # untouched
    assert _place_int16(dest, stored, 1.0, -1.0)


def test_series_turns_float32_at_the_first_slice_past_int16(tmp_path: Path) -> None:
    """Slices 0-1 fit int16, slice 2 does not: the stack becomes float32 there, every value exact."""
    stored = np.random.default_rng(1).integers(-500, 1500, size=(7, 5, 4)).astype(np.int16)
    written = write_series(tmp_path / "s", stored, intercept=[0.0, -1024.0, 40_000.0, 3.0], modality="CT")
    (series,) = discover_series(sorted(written.files), root=tmp_path).series
    volume = decode_series(series, read_series_bytes(series)[1])
    assert volume.array.dtype == np.float32 and volume.array.flags.f_contiguous
    np.testing.assert_array_equal(volume.array, written.expected_values)
    assert written.expected_values.max() > 32767 and storage_dtype(volume.array) is np.float32


def test_fractional_rescale_decodes_to_float32(tmp_path: Path) -> None:
    stored = np.arange(7 * 5 * 3, dtype=np.int16).reshape(7, 5, 3)
    written = write_series(tmp_path / "s", stored, slope=[1.0, 0.5, 1.0])
    (series,) = discover_series(sorted(written.files), root=tmp_path).series
    volume = decode_series(series, read_series_bytes(series)[1])
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))


def test_release_drops_each_file_once_decoded(tmp_path: Path) -> None:
    stored = np.random.default_rng(2).integers(-500, 1500, size=(7, 5, 4)).astype(np.int16)
    written = write_series(tmp_path / "s", stored, intercept=-1024.0, modality="CT")
    (series,) = discover_series(sorted(written.files), root=tmp_path).series
    blobs = read_series_bytes(series)[1]
    kept = decode_series(series, list(blobs))
    released = decode_series(series, blobs, release=True)
    assert blobs == [None] * 4  # the caller's list no longer holds the files
    np.testing.assert_array_equal(released.array, kept.array)
    with pytest.raises(ValueError, match="released"):
        decode_series(series, blobs)


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


@pytest.mark.parametrize("shape", [(8, 6, 5, 1), (256, 256, 40, 1)])  # below and above NumPy's huge-page size
def test_fresh_volume_is_a_private_writable_fortran_array(shape: tuple[int, ...]) -> None:
    first, second = _fresh_volume(shape, np.int16), _fresh_volume(shape, np.float32)
    assert first.shape == second.shape == shape and first.dtype == np.int16 and second.dtype == np.float32
    assert first.flags.f_contiguous and first.flags.writeable and not np.shares_memory(first, second)
    values = (np.arange(np.prod(shape)) % 1000).reshape(shape, order="F")
    first[...] = values
    second[...] = first
    np.testing.assert_array_equal(second, values)
    assert np.array_equal(second.ravel(order="K"), values.ravel(order="F"))  # memory order is Fortran
