"""The NIfTI images of a folder given to infer: names, refusals, and what is left out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StageError
from pipeline.inference.folder_inputs import FolderImage, folder_images, no_images
from pipeline.stages.infer import collect_items
from tests.fixtures.dicom_writer import write_series


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_images_are_named_by_stem_and_clashes_and_links_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for rel in ("a.nii.gz", "sub/b.nii", "sub/a.nii", "notes.txt", ".hidden/c.nii.gz", "sub/.d.nii.gz"):
        _touch(folder / rel)
    _touch(tmp_path / "elsewhere.nii.gz")
    (folder / "e.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    (folder / "f.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    (folder / "g.nii.gz").symlink_to(folder / "sub" / "b.nii")  # inside: an image like any other
    images = {image.rel: image for image in folder_images(folder)}
    assert list(images) == ["a.nii.gz", "e.nii.gz", "f.nii.gz", "g.nii.gz", "sub/a.nii", "sub/b.nii"]
    assert images["sub/b.nii"] == FolderImage(id="b", path=folder / "sub" / "b.nii", rel="sub/b.nii")
    assert images["g.nii.gz"].id == "g" and images["g.nii.gz"].error is None
    for rel in ("a.nii.gz", "sub/a.nii"):  # predictions would share a.nii.gz: both refused, by relative path
        image = images[rel]
        assert image.id == rel and image.error is not None and image.error[0] == "duplicate_name"
    assert images["e.nii.gz"].error is not None and images["e.nii.gz"].error[0] == "link_outside_root"
    assert images["f.nii.gz"].error is not None and images["f.nii.gz"].error[0] == "link_dangling"


def test_the_output_folder_and_earlier_outputs_are_left_out(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _touch(folder / "a.nii.gz")
    _touch(folder / "out" / "predictions" / "a.nii.gz")  # this run's output folder
    _touch(folder / "old" / "predictions" / "a.nii.gz")  # an earlier run's, which its record.json says
    (folder / "old" / "record.json").write_text(json.dumps({"stage": "infer", "config_hash": "x",
                                                            "code_version": "y"}))
    assert [image.rel for image in folder_images(folder, exclude=folder / "out")] == ["a.nii.gz"]


def test_a_name_that_is_not_utf8_gets_a_writable_id(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _touch(Path(os.fsdecode(os.fsencode(str(folder)) + b"/h\xf6rn.nii.gz")))
    (image,) = folder_images(folder)
    assert image.id == "h\\xf6rn" and image.rel == "h\\xf6rn.nii.gz" and image.path.exists()


def test_an_input_without_nifti_images_is_refused_with_what_to_run(tmp_path: Path) -> None:
    series = write_series(tmp_path / "Doe^Jane" / "SE1", np.zeros((3, 4, 5), np.int16), series_tag="se1")
    error = no_images(tmp_path / "Doe^Jane")
    assert error.code == "no_inputs" and "holds DICOM files" in str(error)
    assert f"run 'medpipe ingest {tmp_path / 'Doe^Jane'} --out INGEST' first" in str(error)
    assert "SE1" not in str(error) and "IM0001" not in str(error)  # the files' names may carry PHI
    error = no_images(series.files[0])  # one DICOM file: ingest takes its folder
    assert "is a DICOM file" in str(error) and f"run 'medpipe ingest {series.files[0].parent} --out" in str(error)
    _touch(tmp_path / "notes" / "a.txt")
    error = no_images(tmp_path / "notes")
    assert error.code == "no_inputs" and "no NIfTI images" in str(error) and "DICOM" not in str(error)
    assert no_images(tmp_path / "missing").code == "input_missing"


def test_infer_refuses_a_dicom_folder_before_loading_a_model(tmp_path: Path) -> None:
    write_series(tmp_path / "scan", np.zeros((3, 4, 5), np.int16), series_tag="se1")
    with pytest.raises(StageError, match="holds DICOM files, not NIfTI images"):
        collect_items(tmp_path / "scan", tmp_path / "out")
