"""nnU-Net v2 dataset folders (one file per channel, ``channel_names``, ``file_ending``) through ingest.

The reference: the same phantoms written in MSD's layout (one 4D file per study) and ingested, which
tests/stages/test_multichannel.py checks against the source voxels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo_data import DEMO_LABELS, write_demo_dataset
from pipeline.errors import IngestError
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest

CHANNELS = ("T2", "ADC")


def _as_nnunet(msd: Path, out: Path, *, channels: int, ending: str = ".nii.gz") -> list[str]:
    """Write ``msd``'s studies as nnU-Net v2 cases (CASE_0000.nii.gz, ...); return the case names."""
    cases = []
    for image in sorted((msd / "imagesTr").iterdir()):
        case = image.name.removesuffix(".nii.gz")
        volume = load_nifti(image, allow_4d=True)
        for number in range(channels):
            array = volume.array[..., number] if volume.array.ndim == 4 else volume.array
            save_nifti(volume.with_array(array), out / "imagesTr" / f"{case}_{number:04d}{ending}")
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr" / f"{case}{ending}").write_bytes((msd / "labelsTr" / image.name).read_bytes())
        cases.append(case)
    names = CHANNELS[:channels] if channels > 1 else ("CT",)
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {str(n): name for n, name in enumerate(names)},
        "labels": {name: int(value) for value, name in DEMO_LABELS.items()},
        "numTraining": len(cases), "file_ending": ending}))
    return cases


@pytest.fixture(scope="module")
def msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("v2src") / "msd", n=5, seed=5, shape=(20, 24, 18),
                              channels=CHANNELS)


def test_cases_are_stacked_into_the_images_msd_layout_gives_and_broken_cases_fail_alone(msd: Path,
                                                                                         tmp_path: Path) -> None:
    scan = tmp_path / "Dataset001_Two"
    cases = _as_nnunet(msd, scan, channels=2)
    (scan / f"imagesTr/{cases[1]}_0001.nii.gz").unlink()  # a channel file missing
    moved = load_nifti(scan / f"imagesTr/{cases[2]}_0001.nii.gz")
    shifted = moved.affine.copy()
    shifted[0, 3] += 2.0
    save_nifti(type(moved)(moved.array, shifted), scan / f"imagesTr/{cases[2]}_0001.nii.gz")  # another grid
    (scan / f"labelsTr/{cases[3]}.nii.gz").unlink()  # a training case without its label
    (scan / f"imagesTr/{cases[0]}_0002.nii.gz").write_bytes((scan / f"imagesTr/{cases[0]}_0000.nii.gz").read_bytes())
    (scan / "imagesTr/notes.nii.gz").write_bytes(b"not a case")
    (scan / "imagesTs").mkdir()
    for number in range(2):
        (scan / f"imagesTs/new_{number:04d}.nii.gz").write_bytes(
            (scan / f"imagesTr/{cases[4]}_{number:04d}.nii.gz").read_bytes())

    assert ingest(msd, tmp_path / "msd_ingest")["status"] == "complete"
    reference = {Path(s.source).name.removesuffix(".nii.gz"): s for s in load_manifest(tmp_path / "msd_ingest").studies}
    assert ingest(scan, tmp_path / "out")["status"] == "partial"
    manifest = load_manifest(tmp_path / "out")
    assert manifest.channels == list(CHANNELS)
    assert manifest.labels == DEMO_LABELS
    by_source = {s.source: s for s in manifest.studies}
    assert set(by_source) == {*(f"imagesTr/{c}" for c in cases), "imagesTr/notes.nii.gz", "imagesTs/new"}

    extra = by_source[f"imagesTr/{cases[0]}"]
    assert extra.error.code == "nnunet_channel_files"
    assert f"imagesTr/{cases[0]}_0002.nii.gz is beyond them" in extra.error.message
    missing = by_source[f"imagesTr/{cases[1]}"]
    assert missing.error.code == "nnunet_channel_files"
    assert f"imagesTr/{cases[1]}_0001.nii.gz is missing" in missing.error.message
    grid = by_source[f"imagesTr/{cases[2]}"]
    assert grid.error.code == "channel_grid_mismatch"
    assert grid.error.message.startswith(f"imagesTr/{cases[2]}_0001.nii.gz: grid")
    assert "origin" in grid.error.message
    assert by_source["imagesTr/notes.nii.gz"].error.code == "nnunet_file_name"

    unlabeled = by_source[f"imagesTr/{cases[3]}"]
    assert unlabeled.status == "ok" and unlabeled.label is None
    assert [p.code for p in unlabeled.problems] == ["nnunet_missing_label"]
    test_case = by_source["imagesTs/new"]
    assert test_case.status == "ok" and test_case.label is None and not test_case.problems
    for case, study in ((cases[3], unlabeled), (cases[4], by_source[f"imagesTr/{cases[4]}"]), (cases[4], test_case)):
        ours = load_nifti(tmp_path / "out" / study.image, allow_4d=True)
        theirs = load_nifti(tmp_path / "msd_ingest" / reference[case].image, allow_4d=True)
        np.testing.assert_array_equal(ours.array, theirs.array)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
    labelled = by_source[f"imagesTr/{cases[4]}"]
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / labelled.label).array,
                                  load_nifti(tmp_path / "msd_ingest" / reference[cases[4]].label).array)

    again = ingest(scan, tmp_path / "out")  # a rerun reuses every converted case
    assert again["status"] == "partial"
    record = json.loads((tmp_path / "out/record.json").read_text())
    assert record["reused_studies"] == 3
    changed = load_nifti(scan / f"imagesTr/{cases[4]}_0001.nii.gz")
    save_nifti(changed.with_array(changed.array + 1.0), scan / f"imagesTr/{cases[4]}_0001.nii.gz")
    ingest(scan, tmp_path / "out")  # a changed channel file converts its case again
    record = json.loads((tmp_path / "out/record.json").read_text())
    assert record["reused_studies"] == 2
    study = load_manifest(tmp_path / "out").by_id()[labelled.id]
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / study.image, allow_4d=True).array[..., 1],
                                  changed.array + 1.0)


def test_one_channel_cases_keep_their_file_as_source_and_their_modality(msd: Path, tmp_path: Path) -> None:
    one = write_demo_dataset(tmp_path / "one", n=2, seed=1, shape=(12, 14, 10))
    scan = tmp_path / "Dataset002_One"
    cases = _as_nnunet(one, scan, channels=1)
    assert ingest(scan, tmp_path / "out")["status"] == "complete"
    manifest = load_manifest(tmp_path / "out")
    assert manifest.channels is None
    assert sorted(s.source for s in manifest.studies) == [f"imagesTr/{c}_0000.nii.gz" for c in cases]
    assert {s.modality for s in manifest.studies} == {"CT"} and all(s.label for s in manifest.studies)
    assert load_nifti(tmp_path / "out" / manifest.studies[0].image).array.ndim == 3


def test_a_file_ending_medpipe_cannot_read_is_refused_with_the_fix(msd: Path, tmp_path: Path) -> None:
    scan = tmp_path / "Dataset003_Png"
    _as_nnunet(msd, scan, channels=2)
    meta = json.loads((scan / "dataset.json").read_text())
    (scan / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".png"}))
    with pytest.raises(IngestError, match="medpipe reads NIfTI"):
        ingest(scan, tmp_path / "out")


def test_region_based_labels_declare_every_value_they_name(tmp_path: Path) -> None:
    one = write_demo_dataset(tmp_path / "one", n=2, seed=2, shape=(12, 14, 10))
    scan = tmp_path / "Dataset004_Regions"
    cases = _as_nnunet(one, scan, channels=1)
    meta = json.loads((scan / "dataset.json").read_text())
    regions = {"background": 0, "organ": [1, 2], "core": [1]}  # nnU-Net v2 regions: the organ holds the core
    (scan / "dataset.json").write_text(json.dumps({**meta, "labels": regions, "regions_class_order": [2, 1]}))
    assert ingest(scan, tmp_path / "out")["status"] == "complete"
    assert load_manifest(tmp_path / "out").labels == {"0": "background", "1": "core", "2": "label_2"}
    (scan / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "core": [1]}}))
    ingest(scan, tmp_path / "narrow")  # value 2 of the phantoms' shell is named by no region
    studies = load_manifest(tmp_path / "narrow").studies
    assert [s.error.code for s in studies] == ["label_undeclared_values"] * len(cases)


def test_a_dataset_list_names_each_cases_files_wherever_they_lie(msd: Path, tmp_path: Path) -> None:
    """dataset.json's ``dataset`` object: cases by their listed files, checked against the MSD layout's ingest."""
    scan = tmp_path / "Dataset005_Listed"
    cases = _as_nnunet(msd, tmp_path / "named", channels=2)
    listed: dict[str, dict[str, object]] = {}
    for n, case in enumerate(cases[:3]):
        for number, name in enumerate(CHANNELS):
            target = scan / "scans" / case / f"{name.lower()}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((tmp_path / f"named/imagesTr/{case}_{number:04d}.nii.gz").read_bytes())
        (scan / "masks").mkdir(exist_ok=True)
        (scan / f"masks/{case}.nii.gz").write_bytes((tmp_path / f"named/labelsTr/{case}.nii.gz").read_bytes())
        label = f"masks/{case}.nii.gz" if n != 1 else str(scan / f"masks/{case}.nii.gz")  # absolute, inside
        listed[f"c{n}"] = {"images": [f"scans/{case}/t2.nii.gz", f"scans/{case}/adc.nii.gz"], "label": label}
    listed["away"] = {"images": ["scans/x/t2.nii.gz", str(tmp_path / "named/imagesTr" / f"{cases[3]}_0001.nii.gz")],
                      "label": "masks/x.nii.gz"}
    listed["short"] = {"images": [f"scans/{cases[0]}/t2.nii.gz"], "label": f"masks/{cases[0]}.nii.gz"}
    listed["gone"] = {"images": ["scans/gone/t2.nii.gz", "scans/gone/adc.nii.gz"], "label": "masks/gone.nii.gz"}
    listed["env"] = {"images": ["$DATA/t2.nii.gz", "$DATA/adc.nii.gz"], "label": "$DATA/label.nii.gz"}
    (scan / "imagesTr").mkdir()
    for number in range(2):  # an imagesTr case the list leaves out
        (scan / f"imagesTr/{cases[4]}_{number:04d}.nii.gz").write_bytes(
            (tmp_path / f"named/imagesTr/{cases[4]}_{number:04d}.nii.gz").read_bytes())
    meta = json.loads((tmp_path / "named/dataset.json").read_text())
    (scan / "dataset.json").write_text(json.dumps({**meta, "dataset": listed, "numTraining": len(listed)}))

    assert ingest(msd, tmp_path / "msd_ingest")["status"] == "complete"
    reference = {Path(s.source).name.removesuffix(".nii.gz"): s for s in load_manifest(tmp_path / "msd_ingest").studies}
    assert ingest(scan, tmp_path / "out")["status"] == "partial"
    by_source = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert set(by_source) == {*(f"scans/{c}/c{n}" for n, c in enumerate(cases[:3])), "scans/x/away",
                              f"scans/{cases[0]}/short", "scans/gone/gone", "dataset.json#env",
                              f"imagesTr/{cases[4]}"}
    for n, case in enumerate(cases[:3]):
        study = by_source[f"scans/{case}/c{n}"]
        assert study.status == "ok" and not study.problems
        for ours, theirs in ((study.image, reference[case].image), (study.label, reference[case].label)):
            np.testing.assert_array_equal(load_nifti(tmp_path / "out" / ours, allow_4d=True).array,
                                          load_nifti(tmp_path / "msd_ingest" / theirs, allow_4d=True).array)
    assert by_source["scans/x/away"].error.code == "path_outside_root"
    assert "lists its image 1 outside the dataset folder" in by_source["scans/x/away"].error.message
    assert str(tmp_path) not in json.dumps(by_source["scans/x/away"].error.message)
    assert by_source[f"scans/{cases[0]}/short"].error.code == "nnunet_channel_files"
    assert by_source["scans/gone/gone"].error.code == "missing_file"
    assert by_source["dataset.json#env"].error.code == "path_outside_root"
    unlisted = by_source[f"imagesTr/{cases[4]}"]
    assert unlisted.status == "ok" and unlisted.label is None
    assert [p.code for p in unlisted.problems] == ["nnunet_unlisted_case"]

    (scan / "dataset.json").write_text(json.dumps({**meta, "dataset": []}))
    with pytest.raises(IngestError, match="'dataset' must map each training case to its files"):
        ingest(scan, tmp_path / "bad")
