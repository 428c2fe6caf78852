"""The ingest stage on synthetic NIfTI, MSD and DICOM folders: outputs, failures, reruns, privacy."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import IngestError
from pipeline.fileio import read_json, sha256_file
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest, pseudonym
from pipeline.stages.ingest import ingest
from tests.fixtures.dicom_writer import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    oblique_cosines,
    write_junk,
    write_series,
)


def _stored(seed: int, shape: tuple[int, int, int] = (6, 5, 4)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-300, 900, size=shape).astype(np.int16)


def _by_source(manifest) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in manifest.studies:
        out.setdefault(s.source, []).append(s)
    return out


@pytest.fixture
def dicom_scan(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "scan"
    row, col = oblique_cosines(30.0)
    written = {
        "one": write_series(root / "patient" / "mixed", _stored(1), series_tag="one", name_pattern="a{index}",
                            slope=[1, 2, 0.5, 1], intercept=[-1024, 0, 10, 3], shuffle_seed=4),
        "two": write_series(root / "patient" / "mixed", _stored(2, (4, 7, 3)), series_tag="two",
                            name_pattern="b{index}.dcm", row_cosine=row, col_cosine=col, step=-1.25),
        "gap": write_series(root / "patient" / "gappy", _stored(3), series_tag="gap", offsets=[0, 1, 2, 4]),
    }
    write_junk(root / "patient" / "mixed")
    return root, written


def test_dicom_series_become_exact_volumes_and_bad_series_fail_alone(dicom_scan, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    root, written = dicom_scan
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        record = ingest(root, out)
    assert record["status"] == "partial"
    assert record["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    manifest = load_manifest(out)
    by_source = _by_source(manifest)
    (gap,) = by_source["patient/gappy"]
    assert gap.status == "failed" and gap.error is not None
    assert gap.error.code == "dicom_nonuniform_spacing"
    assert "patient/gappy/IM000" in gap.error.message
    mixed = by_source["patient/mixed"]
    assert len(mixed) == 2 and len({s.id for s in mixed}) == 2
    for study in mixed:
        assert study.status == "ok" and study.format == "dicom" and study.modality == "MR" and study.label is None
        volume = load_nifti(out / study.image)  # the output passes the strict NIfTI checks
        match = [w for k, w in written.items() if k != "gap" and w.expected_values.shape == volume.shape]
        assert len(match) == 1
        np.testing.assert_allclose(volume.affine, match[0].expected_affine_ras, atol=1e-4)
        np.testing.assert_allclose(study.affine, match[0].expected_affine_ras, atol=1e-4)
        whole = bool(np.all(match[0].expected_values == np.rint(match[0].expected_values)))
        assert volume.array.dtype == (np.int16 if whole else np.float32)  # DICOM: int16 when lossless
        np.testing.assert_array_equal(volume.array, match[0].expected_values.astype(np.float32))
        assert study.shape == list(volume.shape) and study.orientation == volume.orientation
        assert study.spacing == pytest.approx(volume.spacing, abs=1e-5)
    # privacy: no names, IDs, UIDs or descriptions in anything written or logged
    texts = [(out / "manifest.json").read_text(), (out / "record.json").read_text(), caplog.text]
    secrets = [FAKE_PATIENT_NAME, "Doe", FAKE_PATIENT_ID, "Secret Hospital", "secret description", "19700101",
               *(w.series_uid for w in written.values())]
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_lps_to_ras_marker_through_the_stage(tmp_path: Path) -> None:
    stored = np.zeros((6, 5, 4), np.int16)
    stored[4, 1, 2] = 500
    write_series(tmp_path / "scan" / "s", stored, origin=(-15.0, 25.0, -40.0), pixel_spacing=(0.7, 1.3), step=2.5)
    ingest(tmp_path / "scan", tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    img = nib.load(str(tmp_path / "out" / study.image))
    index = np.unravel_index(int(np.argmax(np.asanyarray(img.dataobj))), img.shape)
    world = img.affine @ np.array([*index, 1.0])
    lps = np.array([-15.0 + 4 * 1.3, 25.0 + 1 * 0.7, -40.0 + 2 * 2.5])
    np.testing.assert_allclose(world[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert study.orientation == "LPS"


def test_nifti_folder_keeps_dtype_and_voxel_order(tmp_path: Path, phantom_pair) -> None:
    image, _ = phantom_pair
    flipped = Volume(image.array[::-1].copy().astype(np.int16), image.affine @ np.diag([-1.0, 1, 1, 1]))
    save_nifti(image, tmp_path / "scan" / "a" / "b" / "deep.nii.gz", dtype=np.float32)
    save_nifti(flipped, tmp_path / "scan" / "flat.nii", dtype=np.int16)
    record = ingest(tmp_path / "scan", tmp_path / "out")
    assert record["counts"]["ok"] == 2
    studies = _by_source(load_manifest(tmp_path / "out"))
    deep, flat = studies["a/b/deep.nii.gz"][0], studies["flat.nii"][0]
    assert nib.load(str(tmp_path / "out" / deep.image)).get_data_dtype() == np.float32
    assert nib.load(str(tmp_path / "out" / flat.image)).get_data_dtype() == np.int16
    assert flat.orientation == "LAS" and deep.orientation == "RAS"
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / flat.image).array, flipped.array)
    assert flat.label is None and flat.format == "nifti"


def test_msd_dataset_pairs_images_with_labels(msd_dataset: Path, tmp_path: Path) -> None:
    record = ingest(msd_dataset, tmp_path / "out")
    assert record["status"] == "complete" and record["counts"]["ok"] == 6
    manifest = load_manifest(tmp_path / "out")
    meta = json.loads((msd_dataset / "dataset.json").read_text())
    assert manifest.dataset == meta["name"] and manifest.labels == meta["labels"]
    assert len(manifest.studies) == 6
    for study in manifest.studies:
        name = Path(study.source).name
        assert study.source == f"imagesTr/{name}" and study.label_source == f"labelsTr/{name}"
        assert study.modality == "MRI"
        label = nib.load(str(tmp_path / "out" / study.label))
        assert label.get_data_dtype() == np.uint8
        source_label = load_nifti(msd_dataset / "labelsTr" / name)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), source_label.array)
        np.testing.assert_allclose(label.affine, source_label.affine, atol=1e-5)
    assert [s.source for s in manifest.studies] == sorted(s.source for s in manifest.studies)


def _copy_msd(msd_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "msd"
    shutil.copytree(msd_dataset, root)
    return root


def test_bad_labels_fail_only_their_study(msd_dataset: Path, tmp_path: Path) -> None:
    root = _copy_msd(msd_dataset, tmp_path)
    names = sorted(p.name for p in (root / "labelsTr").iterdir())
    first = load_nifti(root / "labelsTr" / names[0])
    bad = first.array.copy()
    bad[0, 0, 0] = 7
    save_nifti(first.with_array(bad), root / "labelsTr" / names[0], dtype=np.uint8)
    second = load_nifti(root / "labelsTr" / names[1])
    shifted = second.affine.copy()
    shifted[0, 3] += 2.0
    save_nifti(Volume(second.array, shifted), root / "labelsTr" / names[1], dtype=np.uint8)
    third = load_nifti(root / "labelsTr" / names[2])
    save_nifti(third.with_array(third.array.astype(np.float32) * 0.5), root / "labelsTr" / names[2],
               dtype=np.float32)
    record = ingest(root, tmp_path / "out")
    assert record["status"] == "partial" and record["counts"] == {"ok": 3, "failed": 3, "skipped": 0}
    errors = {Path(s.source).name: s.error for s in load_manifest(tmp_path / "out").studies if s.error}
    assert errors[names[0]].code == "label_undeclared_values" and "[7]" in errors[names[0]].message
    assert errors[names[1]].code == "label_grid_mismatch"
    assert errors[names[2]].code == "label_not_integer"
    assert all(f"labelsTr/{n}" in errors[n].message for n in names[:3])


def test_msd_test_images_and_unlisted_images_are_unlabeled(msd_dataset: Path, tmp_path: Path, phantom_pair) -> None:
    root = _copy_msd(msd_dataset, tmp_path)
    save_nifti(phantom_pair[0], root / "imagesTs" / "test_001.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    dropped = meta["training"].pop()
    (root / "dataset.json").write_text(json.dumps(meta))
    ingest(root, tmp_path / "out")
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert len(studies) == 7  # labelsTr files are never studies of their own
    test = studies["imagesTs/test_001.nii.gz"]
    assert test.status == "ok" and test.label is None and test.problems == []
    unlisted = studies[dropped["image"].removeprefix("./")]
    assert unlisted.label is None and [p.code for p in unlisted.problems] == ["msd_unlisted_image"]


def test_an_image_listed_twice_in_dataset_json_is_one_study(msd_dataset: Path, tmp_path: Path) -> None:
    root = _copy_msd(msd_dataset, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    first, second = meta["training"][:2]
    meta["training"] += [dict(first),  # the same entry again
                         {"image": second["image"], "label": first["label"]}]  # the image with another label
    (root / "dataset.json").write_text(json.dumps(meta))
    record = ingest(root, tmp_path / "out")
    studies = load_manifest(tmp_path / "out").studies
    assert len({s.id for s in studies}) == len(studies) == 8  # ids stay unique: the manifest is keyed on them
    assert record["counts"] == {"ok": 6, "failed": 1, "skipped": 1} and record["status"] == "partial"
    (repeated,) = [s for s in studies if s.status == "skipped"]
    assert repeated.source == first["image"].removeprefix("./") and repeated.problems[0].code == "msd_repeated_entry"
    assert "entry 7 repeats entry 1" in repeated.problems[0].message
    (conflict,) = [s for s in studies if s.status == "failed"]
    assert conflict.error.code == "msd_conflicting_labels" and "entry 8" in conflict.error.message
    converted = next(s for s in studies if s.status == "ok" and s.source == conflict.source)
    assert converted.label_source == second["label"].removeprefix("./")  # the first entry's label was used


def test_rerun_is_byte_identical_and_reuses_studies(msd_dataset: Path, dicom_scan, tmp_path: Path) -> None:
    root = _copy_msd(msd_dataset, tmp_path)
    shutil.copytree(dicom_scan[0], root / "dicom")  # a mixed folder: MSD plus DICOM
    out = tmp_path / "out"
    first = ingest(root, out)
    assert first["counts"] == {"ok": 8, "failed": 1, "skipped": 0}
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*.nii.gz")} | {
        Path("manifest.json"): sha256_file(out / "manifest.json")}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    again = ingest(root, out, force=True)
    after = {p.relative_to(out): sha256_file(p) for p in out.rglob("*.nii.gz")} | {
        Path("manifest.json"): sha256_file(out / "manifest.json")}
    assert after == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes  # reused, not rewritten
    assert sum(1 for s in again["studies"] if s.get("reused")) == 8
    rerun = ingest(root, out)  # the last run was partial (one bad series), so it runs, reusing all
    assert not rerun.get("skipped") and sum(1 for s in rerun["studies"] if s.get("reused")) == 8
    # a changed input is converted again; the rest is reused
    victim = sorted((root / "imagesTr").iterdir())[0]
    volume = load_nifti(victim)
    save_nifti(volume.with_array(volume.array + 1), victim, dtype=np.float32)
    third = ingest(root, out)
    assert sum(1 for s in third["studies"] if s.get("reused")) == 7


def test_record_lists_every_output_with_the_digest_its_worker_took(msd_dataset: Path, dicom_scan, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage record's output digests are true, and images are not hashed a second time at the end."""
    import pipeline.provenance as provenance

    root = _copy_msd(msd_dataset, tmp_path)
    shutil.copytree(dicom_scan[0], root / "dicom")
    hashed: list[str] = []
    monkeypatch.setattr(provenance, "sha256_file", lambda p: hashed.append(Path(p).name) or sha256_file(p))
    out = tmp_path / "out"
    record = ingest(root, out)
    images = sorted(p for p in out.rglob("*.nii.gz"))
    written = {out / rel for study in load_manifest(out).studies for rel in (study.image, study.label) if rel}
    assert set(images) == written and len(written) > 8  # images and labels
    assert record["outputs"] == {str(p.relative_to(out)): sha256_file(p)
                                 for p in [*images, out / "manifest.json", out / "config.yaml"]}
    assert not any(name.endswith(".nii.gz") for name in hashed)  # only the manifest and the config
    rerun = ingest(root, out)  # partial (one bad series): runs again, every study reused
    assert rerun["outputs"] == record["outputs"]


def test_pseudonymous_ids_are_stable_keyed_and_hide_names(msd_dataset: Path, tmp_path: Path) -> None:
    ingest(msd_dataset, tmp_path / "a")
    ids_a = [s.id for s in load_manifest(tmp_path / "a").studies]
    assert ingest(msd_dataset, tmp_path / "a").get("skipped") is True  # complete and unchanged
    ingest(msd_dataset, tmp_path / "b")
    assert [s.id for s in load_manifest(tmp_path / "b").studies] == ids_a
    other = PipelineConfig.model_validate({"ingest": {"pseudonym_key": "another-site"}})
    ingest(msd_dataset, tmp_path / "c", config=other)
    ids_c = [s.id for s in load_manifest(tmp_path / "c").studies]
    assert not set(ids_c) & set(ids_a)
    for study in load_manifest(tmp_path / "a").studies:
        assert study.id == pseudonym(study.source, key="medpipe")
        assert "phantom" not in study.id and study.image == f"images/{study.id}.nii.gz"
    assert {p.name for p in (tmp_path / "a" / "images").iterdir()} == {f"{i}.nii.gz" for i in ids_a}


def test_worker_processes_give_the_same_manifest(dicom_scan, tmp_path: Path) -> None:
    ingest(dicom_scan[0], tmp_path / "one")
    ingest(dicom_scan[0], tmp_path / "two", config=load_config(None, overrides=["ingest.workers=2"]))
    assert read_json(tmp_path / "one" / "manifest.json") == read_json(tmp_path / "two" / "manifest.json")


def test_missing_empty_and_imageless_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(IngestError) as info:
        ingest(tmp_path / "nope", tmp_path / "out")
    assert info.value.code == "scan_dir_missing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError) as info:
        ingest(tmp_path / "empty", tmp_path / "out")
    assert info.value.code == "scan_dir_empty"
    write_junk(tmp_path / "junk")
    with pytest.raises(IngestError) as info:
        ingest(tmp_path / "junk", tmp_path / "out")
    assert info.value.code == "no_studies"


def test_truncated_nifti_fails_with_its_relative_path(tmp_path: Path, phantom_pair) -> None:
    save_nifti(phantom_pair[0], tmp_path / "scan" / "good.nii.gz")
    bad = tmp_path / "scan" / "sub" / "bad.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes((tmp_path / "scan" / "good.nii.gz").read_bytes()[:2000])
    record = ingest(tmp_path / "scan", tmp_path / "out")
    assert record["counts"] == {"ok": 1, "failed": 1, "skipped": 0}
    (failed,) = [s for s in load_manifest(tmp_path / "out").studies if s.status == "failed"]
    assert failed.error.code == "nifti_corrupt" and failed.error.message.startswith("sub/bad.nii.gz:")


@pytest.mark.parametrize("out", [".", ".."])
def test_an_output_folder_holding_the_scan_folder_is_refused_by_name(tmp_path: Path, phantom_pair, out: str) -> None:
    scan = tmp_path / "scan"
    save_nifti(phantom_pair[0], scan / "one.nii.gz")
    with pytest.raises(IngestError) as info:  # not "the scan folder is empty"
        ingest(scan, scan / out)
    assert info.value.code == "out_holds_scan" and "another output folder" in str(info.value)
    assert sorted(p.name for p in scan.iterdir()) == ["one.nii.gz"]


def test_an_earlier_output_folder_inside_the_scan_is_left_out_not_ingested_again(tmp_path: Path,
                                                                                phantom_pair) -> None:
    scan = tmp_path / "scan"
    save_nifti(phantom_pair[0], scan / "one.nii.gz")
    ingest(scan, scan / "first")  # inside: left out of its own run
    (scan / "notes").mkdir()
    (scan / "notes" / "record.json").write_text('{"stage": "mine"}')  # someone else's record: listed as usual
    save_nifti(phantom_pair[0], scan / "notes" / "two.nii.gz")
    record = ingest(scan, tmp_path / "second")  # an earlier output folder inside the scan, this run's elsewhere
    assert record["counts"] == {"ok": 2, "failed": 0, "skipped": 1} and record["status"] == "complete"
    studies = {s.source: s for s in load_manifest(tmp_path / "second").studies}
    assert set(studies) == {"one.nii.gz", "notes/two.nii.gz", "first"}  # not first/images/case_....nii.gz
    assert studies["first"].problems[0].code == "medpipe_output" and "medpipe ingest output" in (
        studies["first"].problems[0].message)
    assert ingest(scan, tmp_path / "second")["skipped"]  # nothing changed: up to date


def test_an_unfinished_run_inside_the_scan_is_left_out_not_ingested_again(tmp_path: Path, phantom_pair) -> None:
    """A run stopped before its record was written leaves its resolved config.yaml and the images it had
    written: its folder is an output folder too; a config.yaml of anyone else's hides nothing."""
    scan = tmp_path / "scan"
    save_nifti(phantom_pair[0], scan / "one.nii.gz")
    ingest(scan, scan / "stopped")
    (scan / "stopped" / "record.json").unlink()  # as a run killed after converting leaves it
    (scan / "notes").mkdir()
    (scan / "notes" / "config.yaml").write_text("# resolved by hand\nname: mine\n")
    save_nifti(phantom_pair[0], scan / "notes" / "two.nii.gz")
    record = ingest(scan, tmp_path / "out")
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert set(studies) == {"one.nii.gz", "notes/two.nii.gz", "stopped"} and record["counts"]["skipped"] == 1
    (problem,) = studies["stopped"].problems
    assert problem.code == "medpipe_output" and "did not finish" in problem.message
    ingest(scan, scan / "stopped")  # the run finished: its record changes the listing, so ingest runs again
    assert not ingest(scan, tmp_path / "out").get("skipped")
    assert "medpipe ingest output" in {s.source: s for s in load_manifest(tmp_path / "out").studies}[
        "stopped"].problems[0].message


def test_output_inside_scan_folder_and_outside_links_are_not_studies(tmp_path: Path, phantom_pair) -> None:
    scan = tmp_path / "scan"
    save_nifti(phantom_pair[0], scan / "one.nii.gz")
    save_nifti(phantom_pair[0], tmp_path / "elsewhere" / "secret.nii.gz")
    (scan / "link.nii.gz").symlink_to(tmp_path / "elsewhere" / "secret.nii.gz")
    ingest(scan, scan / "run")
    record = ingest(scan, scan / "run", force=True)  # its own outputs must not be picked up
    assert record["counts"] == {"ok": 1, "failed": 0, "skipped": 1} and record["status"] == "complete"
    ok, link = sorted(load_manifest(scan / "run").studies, key=lambda s: s.status)
    assert ok.source == "one.nii.gz" and ok.status == "ok"
    # the link is accounted for, not followed: skipped with the reason, its name withheld (no header read)
    assert link.status == "skipped" and link.problems[0].code == "link_outside_root" and link.image is None
    assert re.fullmatch(r"phi-[0-9a-f]{8}", link.source) and "link.nii.gz" not in link.model_dump_json()
    # beside NIfTI images (whose paths the manifest shows as they are), only the link's own name is withheld
    save_nifti(phantom_pair[0], scan / "sub" / "two.nii.gz")
    (scan / "sub" / "gone.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    ingest(scan, scan / "run")
    (gone,) = [s for s in load_manifest(scan / "run").studies if s.problems and s.problems[0].code == "link_dangling"]
    assert re.fullmatch(r"sub/phi-[0-9a-f]{8}", gone.source)
