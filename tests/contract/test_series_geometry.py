"""Bad-input contract, series and geometry (cases 10-16): the gaps the unit tests leave, through the stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.fileio import sha256_file
from pipeline.io.nifti import load_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series


def test_one_series_split_over_two_folders_is_one_study(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    written = write_series(scan / "patient" / "a", small_stored(1, (6, 5, 6)), series_tag="split", shuffle_seed=2)
    (scan / "patient" / "b").mkdir()
    for path in written.files[::2]:  # every other file moves to a sibling folder
        shutil.move(path, scan / "patient" / "b" / path.name)
    record = ingest(scan, tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    assert record["status"] == "complete" and study.source == "patient" and study.shape == [6, 5, 6]
    volume = load_nifti(tmp_path / "out" / study.image)
    np.testing.assert_array_equal(volume.array, written.expected_values.astype(np.float32))
    np.testing.assert_allclose(volume.affine, written.expected_affine_ras, atol=1e-4)


def test_file_and_instance_order_never_change_the_output_bytes(tmp_path: Path) -> None:
    stored = small_stored(2, (7, 6, 5))
    for seed in (None, 11, 12):
        write_series(tmp_path / f"scan{seed}" / "s", stored, series_tag="order", shuffle_seed=seed,
                     name_pattern="f{index:03d}" if seed else "IM{index:04d}.dcm")
        ingest(tmp_path / f"scan{seed}", tmp_path / f"out{seed}")
    digests = {sha256_file(next((tmp_path / f"out{seed}" / "images").iterdir())) for seed in (None, 11, 12)}
    assert len(digests) == 1


@pytest.mark.parametrize(("position", "row", "col"), [
    ("HFDL", (0.0, -1.0, 0.0), (1.0, 0.0, 0.0)),  # head first, decubitus left: image rows run anterior-posterior
    ("HFDR", (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),  # head first, decubitus right
    ("FFP", (1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),   # feet first prone
])
def test_marker_voxel_lands_at_its_ras_position_in_any_patient_position(tmp_path: Path, position: str, row,
                                                                        col) -> None:
    stored = np.zeros((6, 5, 4), np.int16)
    stored[1, 3, 2] = 900  # column 1, row 3, third slice along the normal
    origin, spacing, step = np.array([12.0, -7.0, 30.0]), (0.9, 1.1), 2.5
    write_series(tmp_path / "scan" / "s", stored, origin=origin, row_cosine=row, col_cosine=col,
                 pixel_spacing=spacing, step=step, shuffle_seed=4,
                 edit=lambda ds, _k: setattr(ds, "PatientPosition", position))
    ingest(tmp_path / "scan", tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    image = nib.load(str(tmp_path / "out" / study.image))
    index = np.unravel_index(int(np.argmax(np.asanyarray(image.dataobj))), image.shape)
    lps = origin + 1 * spacing[1] * np.array(row) + 3 * spacing[0] * np.array(col) + 2 * step * np.cross(row, col)
    np.testing.assert_allclose((image.affine @ [*index, 1.0])[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
