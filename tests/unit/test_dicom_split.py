"""Series splitting like dcm2niix (orientation, size, echo, image type) and 4D volumes from single files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.errors import PipelineError
from pipeline.io.dicom import decode_series, discover_series, read_series_bytes
from tests.fixtures.dicom_writer import write_series

SHAPE = (6, 5, 4)


def _stored(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-300, 900, size=shape).astype(np.int16)


def _scan(root: Path, **kwargs):
    return discover_series(sorted(p for p in root.rglob("*") if p.is_file()), root=root, **kwargs).series


def _decode(series):
    return decode_series(series, read_series_bytes(series)[1])


def _edit_all(paths, change) -> None:
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(str(path))
        change(ds, k)
        ds.save_as(str(path), enforce_file_format=True)


def test_one_slice_with_another_orientation_becomes_its_own_stack(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(1))
    _edit_all(written.files[:1], lambda ds, _: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    parts = sorted(_scan(tmp_path), key=lambda s: len(s.headers))
    assert [len(p.headers) for p in parts] == [1, 3] and all(p.part for p in parts)
    assert parts[0].headers[0].rel == "s/IM0001.dcm" and parts[0].key != parts[1].key
    coronal, axial = (_decode(p) for p in parts)
    assert coronal.orientation == "LIP" and coronal.shape == (6, 5, 1)
    np.testing.assert_array_equal(axial.array, written.expected_values[:, :, 1:].astype(np.float32))


def test_split_keys_are_stable_and_distinct(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(2))
    _edit_all(written.files[:2], lambda ds, _: setattr(ds, "Rows", 5))  # same rows: no split
    first = [p.key for p in _scan(tmp_path)]
    again = [p.key for p in _scan(tmp_path)]
    assert first == again and len(first) == 1 and first[0].endswith(written.series_uid)


def test_different_slice_sizes_split(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _stored(3), series_tag="same")
    write_series(tmp_path / "s", _stored(4, (3, 7, 2)), series_tag="same", name_pattern="b{index}.dcm",
                 origin=(0, 0, 100))
    shapes = sorted(_decode(p).shape for p in _scan(tmp_path))
    assert shapes == [(3, 7, 2), (6, 5, 4)]


def test_two_echoes_at_the_same_positions_split_instead_of_4d(tmp_path: Path) -> None:
    first = write_series(tmp_path / "s", _stored(5), series_tag="me", name_pattern="e1_{index}.dcm",
                         edit=lambda ds, _: setattr(ds, "EchoNumbers", 1))
    second = write_series(tmp_path / "s", _stored(6), series_tag="me", name_pattern="e2_{index}.dcm",
                          edit=lambda ds, k: (setattr(ds, "EchoNumbers", 2),
                                              setattr(ds, "SOPInstanceUID", f"1.2.3.{k}")))
    volumes = sorted((_decode(p) for p in _scan(tmp_path)), key=lambda v: v.meta["problems"] == [])
    assert [v.shape for v in volumes] == [SHAPE, SHAPE]
    got = {v.array.tobytes() for v in volumes}
    assert got == {w.expected_values.astype(np.int16).tobytes() for w in (first, second)}


def test_magnitude_and_phase_split_by_image_type(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _stored(7), series_tag="mp", name_pattern="m{index}.dcm",
                 edit=lambda ds, _: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "ND"]))
    write_series(tmp_path / "s", _stored(8), series_tag="mp", name_pattern="p{index}.dcm",
                 edit=lambda ds, k: (setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "P", "ND"]),
                                     setattr(ds, "SOPInstanceUID", f"1.2.4.{k}")))
    parts = _scan(tmp_path)
    assert len(parts) == 2
    assert {p.headers[0].image_type[2] for p in parts} == {"M", "P"}
    assert all(_decode(p).shape == SHAPE for p in parts)


def _time_series(root: Path, volumes: int = 3, *, temporal: bool = False):
    """``volumes`` single-frame volumes at the same positions; InstanceNumber runs volume by volume."""
    stored = [_stored(10 + t) for t in range(volumes)]
    written = []
    for t in range(volumes):
        def edit(ds, k, t=t):
            ds.InstanceNumber = t * SHAPE[2] + k + 1
            ds.SOPInstanceUID = f"1.2.5.{t}.{k}"
            if temporal:  # volumes given in reverse by TemporalPositionIdentifier, which wins
                ds.TemporalPositionIdentifier = volumes - t
        written.append(write_series(root / "fmri", stored[t], series_tag="fmri", name_pattern=f"z{t}_{{index}}.dcm",
                                    shuffle_seed=t, edit=edit))
    return written


@pytest.mark.parametrize("temporal", [False, True])
def test_repeated_positions_become_volumes_in_acquisition_order(tmp_path: Path, temporal: bool) -> None:
    written = _time_series(tmp_path, temporal=temporal)
    (series,) = _scan(tmp_path)
    volume = _decode(series)
    assert volume.shape == (*SHAPE, 3) and volume.meta["volumes"] == 3
    order = [2, 1, 0] if temporal else [0, 1, 2]
    for t, source in enumerate(order):
        np.testing.assert_array_equal(volume.array[..., t], written[source].expected_values.astype(np.float32))
    np.testing.assert_allclose(volume.affine, written[0].expected_affine_ras, atol=1e-5)
    assert "dicom_4d" in [c for c, _ in volume.meta["problems"]]


def test_split_4d_gives_one_stack_per_volume(tmp_path: Path) -> None:
    written = _time_series(tmp_path)
    parts = _scan(tmp_path, split_4d=True)
    assert [p.part for p in parts] == ["t0001", "t0002", "t0003"]
    for part, source in zip(parts, written, strict=True):
        volume = _decode(part)
        assert volume.shape == SHAPE
        np.testing.assert_array_equal(volume.array, source.expected_values.astype(np.float32))


def test_incomplete_last_volume_is_refused(tmp_path: Path) -> None:
    written = _time_series(tmp_path)
    written[2].files[0].unlink()
    (series,) = _scan(tmp_path)
    with pytest.raises(PipelineError) as info:
        _decode(series)
    assert info.value.code == "dicom_incomplete_volumes" and "fmri/" in str(info.value)


def test_an_extra_slice_at_a_used_position_is_a_duplicate(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", _stored(9))
    data = pydicom.dcmread(str(written.files[0]))
    data.SOPInstanceUID = "1.2.6.1"
    data.PixelData = np.zeros(30, "<i2").tobytes()
    data.save_as(str(tmp_path / "s" / "extra.dcm"), enforce_file_format=True)
    (series,) = _scan(tmp_path)
    with pytest.raises(PipelineError) as info:
        _decode(series)
    assert info.value.code == "dicom_duplicate_position"
