"""``ingest.split_4d`` (contract case 15): a study per volume of a 4D NIfTI image or DICOM series, each recorded as
volume N of M, in acquisition order. Reference: each volume written alone as a 3D file and ingested."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import GeometryError, IngestError
from pipeline.io import dicom as dicom_module
from pipeline.io.channels import check_channels
from pipeline.io.dicom import discover_series
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest
from pipeline.sharding import merge_shards
from pipeline.stages import ingest_study
from pipeline.stages.ingest import ingest
from pipeline.stages.ingest_study import IngestTask, process_study, process_volumes
from pipeline.stages.ingest_survey import survey
from pipeline.stages.ingest_volumes import MIN_VOLUMES_PER_JOB, volume_jobs
from tests.fixtures.dicom_kinds import write_enhanced
from tests.unit.test_dicom_split import SHAPE, _time_series

SPLIT = load_config(None, overrides=["ingest.split_4d=true"])
AFFINE = np.array([[0.0, 0.0, -2.5, 40.0], [-1.2, 0.0, 0.0, 10.0], [0.0, 1.5, 0.0, -7.0], [0, 0, 0, 1]])


def _volumes(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(-200, 900, size=(4, 5, 6, n)).astype(np.int16)


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def test_a_4d_nifti_image_becomes_a_study_per_volume_equal_to_that_volume_ingested_alone(tmp_path: Path) -> None:
    data = _volumes(3)
    _save(tmp_path / "scan" / "bold.nii.gz", data)
    _save(tmp_path / "scan" / "t1.nii.gz", data[..., 0] * 2)  # a 3D image beside it: one study, as before
    for t in range(3):
        _save(tmp_path / "alone" / f"v{t + 1}.nii.gz", data[..., t])
    record = ingest(tmp_path / "scan", tmp_path / "out", config=SPLIT)
    ingest(tmp_path / "alone", tmp_path / "ref")
    assert record["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    studies = [s for s in load_manifest(tmp_path / "out").studies if s.source == "bold.nii.gz"]
    assert [(s.volume, s.volumes) for s in studies] == [(1, 3), (2, 3), (3, 3)]  # listed in volume order
    (t1,) = [s for s in load_manifest(tmp_path / "out").studies if s.source == "t1.nii.gz"]
    assert (t1.volume, t1.volumes) == (None, None)
    references = {s.source: s for s in load_manifest(tmp_path / "ref").studies}
    for study in studies:
        reference = references[f"v{study.volume}.nii.gz"]
        ours, theirs = (load_nifti(tmp_path / folder / s.image) for folder, s in (("out", study), ("ref", reference)))
        np.testing.assert_array_equal(ours.array, theirs.array)
        np.testing.assert_array_equal(ours.array, data[..., study.volume - 1])  # the file's voxel order is kept
        np.testing.assert_allclose(ours.affine, AFFINE, atol=1e-6)
        assert (study.shape, study.affine, study.orientation) == (reference.shape, reference.affine,
                                                                  reference.orientation)
    assert len({s.id for s in studies}) == 3 and len({s.sha256["input"] for s in studies}) == 3

    before = (tmp_path / "out" / "manifest.json").read_bytes()
    again = ingest(tmp_path / "scan", tmp_path / "out", config=SPLIT, force=True)
    assert again["counts"]["ok"] == 4 and sum(1 for s in again["studies"] if s.get("reused")) == 4
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before  # a rerun reuses every volume

    planned = [s for s in survey(tmp_path / "scan", config=SPLIT) if s.source == "bold.nii.gz"]
    assert [s.volume for s in planned] == [(1, 3), (2, 3), (3, 3)]  # the dry run lists them in order
    assert [s.id for s in planned] == [s.id for s in sorted(studies, key=lambda s: s.volume or 0)]



def test_the_manifest_lists_the_volumes_of_a_source_in_volume_order_and_a_shard_merge_too(tmp_path: Path) -> None:
    """Listed by (source, id) before, a file's volumes came in the order of their hashed ids."""
    _save(tmp_path / "scan" / "bold.nii.gz", _volumes(8))
    _save(tmp_path / "scan" / "a.nii.gz", _volumes(1)[..., 0])
    ingest(tmp_path / "scan", tmp_path / "out", config=SPLIT)
    listed = [(s.source, s.volume) for s in load_manifest(tmp_path / "out").studies]
    assert listed == [("a.nii.gz", None), *(("bold.nii.gz", t) for t in range(1, 9))]
    for index in (0, 1):  # two shards, merged: the same list
        sharded = load_config(None, overrides=["ingest.split_4d=true", f"execution.shard={index}/2"])
        ingest(tmp_path / "scan", tmp_path / "sharded", config=sharded)
    merge_shards(tmp_path / "sharded")
    assert [(s.source, s.volume) for s in load_manifest(tmp_path / "sharded").studies] == listed


def _volume_tasks(path: Path, out: Path, n: int, *, source: str = "bold.nii.gz") -> tuple[IngestTask, ...]:
    return tuple(IngestTask(id=f"v{t}", source=source, format="nifti", out_dir=str(out), image_path=str(path),
                            volume=t, volumes=n) for t in range(1, n + 1))


def test_the_volumes_of_a_4d_image_are_read_and_checksummed_once_and_equal_one_study_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting read and hashed the whole file once per volume: 200 volumes of a 41 MB fMRI run took 54 s."""
    path = _save(tmp_path / "scan" / "bold.nii.gz", _volumes(5))
    reads, sums = [], []
    real_load, real_sum = ingest_study.load_nifti, ingest_study.sha256_file
    monkeypatch.setattr(ingest_study, "load_nifti", lambda p, **kw: reads.append(str(p)) or real_load(p, **kw))
    monkeypatch.setattr(ingest_study, "sha256_file", lambda p: sums.append(str(p)) or real_sum(p))
    results = process_volumes(_volume_tasks(path, tmp_path / "out", 5))
    assert reads.count(str(path)) == 1 and sums.count(str(path)) == 1
    references = {s.id: s for s in (process_study(t)[0] for t in _volume_tasks(path, tmp_path / "alone", 5))}
    assert [study.volume for study, _ in results] == [1, 2, 3, 4, 5]
    for study, reused in results:  # the reference: each volume a study of its own, as before
        assert not reused and study == references[study.id]
        assert (tmp_path / "out" / study.image).read_bytes() == (tmp_path / "alone" / study.image).read_bytes()

    reads.clear()
    (tmp_path / "out" / "images" / "v2.nii.gz").unlink()  # one output lost: only that volume is written again
    previous = tuple(replace(task, previous=study) for task, (study, _) in
                     zip(_volume_tasks(path, tmp_path / "out", 5), results, strict=True))
    again = process_volumes(previous)
    assert [reused for _, reused in again] == [True, False, True, True, True] and reads == [str(path)]
    assert [study for study, _ in again] == [study for study, _ in results]
    reads.clear()
    assert all(reused for _, reused in process_volumes(previous)) and reads == []  # all done: the file unread


def test_volume_jobs_keep_the_order_group_each_file_and_split_a_long_one_over_idle_workers(tmp_path: Path) -> None:
    long = _volume_tasks(tmp_path / "a.nii.gz", tmp_path, 2 * MIN_VOLUMES_PER_JOB + 3, source="a.nii.gz")
    short = _volume_tasks(tmp_path / "b.nii.gz", tmp_path, 3, source="b.nii.gz")
    alone = IngestTask(id="t1", source="t1.nii.gz", format="nifti", out_dir=str(tmp_path),
                       image_path=str(tmp_path / "t1.nii.gz"))
    tasks = [long[0], alone, *long[1:], *short]
    one = volume_jobs(tasks, workers=1)
    assert one == [long, (alone,), short]  # a file's volumes at the place of its first
    four = volume_jobs(tasks, workers=4)
    half = len(long) // 2
    assert four == [long[:half], long[half:], (alone,), short]  # halves of at least MIN_VOLUMES_PER_JOB
    assert volume_jobs(tasks, workers=16) == four  # no part smaller than that
    assert volume_jobs([alone, alone], workers=4) == [(alone,), (alone,)]



def _dicom_volume_tasks(scan: Path, out: Path) -> tuple[IngestTask, ...]:
    parts = discover_series(sorted(p for p in scan.rglob("*") if p.is_file()), root=scan, split_4d=True).series
    return tuple(IngestTask(id=f"p{k}", source=part.folder, format="dicom", out_dir=str(out), series=part, volume=k,
                            volumes=len(parts)) for k, part in enumerate(parts, start=1))


def test_the_volumes_of_an_enhanced_dicom_file_are_one_job_that_reads_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = np.random.default_rng(2).integers(0, 900, size=(6, 4, 3, 4)).astype(np.int16)
    write_enhanced(tmp_path / "scan" / "e.dcm", stored, shuffle_seed=3)
    tasks = _dicom_volume_tasks(tmp_path / "scan", tmp_path / "out")
    assert len(tasks) == 4 and volume_jobs(list(tasks)) == [tasks]
    reads: list[str] = []
    real_read = ingest_study.read_series_bytes
    monkeypatch.setattr(ingest_study, "read_series_bytes", lambda one: reads.append(one.part) or real_read(one))
    decodes: list[str] = []
    real_decode = dicom_module.decode_stored
    monkeypatch.setattr(dicom_module, "decode_stored", lambda blob, header, *a: decodes.append(header.path)
                        or real_decode(blob, header, *a))
    results = process_volumes(tasks)
    assert len(reads) == 1 and len(decodes) == 1  # read once, and its frames decoded once (a JPEG file, say)
    for (study, reused), task in zip(results, tasks, strict=True):  # the reference: each volume a study of its own
        reference, _ = process_study(replace(task, out_dir=str(tmp_path / "alone")))
        assert not reused and study == reference and study.volume == task.volume
        assert (tmp_path / "out" / study.image).read_bytes() == (tmp_path / "alone" / study.image).read_bytes()

    _time_series(tmp_path / "slices")  # one file per slice: each volume reads files of its own, a job each
    singles = _dicom_volume_tasks(tmp_path / "slices", tmp_path / "out2")
    assert len(singles) == 3 and volume_jobs(list(singles)) == [(task,) for task in singles]


def test_a_truncated_4d_image_fails_every_volume_by_name_and_the_rest_goes_on(tmp_path: Path) -> None:
    path = _save(tmp_path / "scan" / "bold.nii.gz", np.repeat(_volumes(2), 20, axis=3))  # 40 volumes: 2 halves
    path.write_bytes(path.read_bytes()[:-200])
    _save(tmp_path / "scan" / "t1.nii.gz", _volumes(1))
    config = load_config(None, overrides=["ingest.split_4d=true", "ingest.workers=3"])  # 3 jobs for 3 workers
    record = ingest(tmp_path / "scan", tmp_path / "out", config=config)
    assert record["counts"] == {"ok": 1, "failed": 40, "skipped": 0}
    failed = [s for s in load_manifest(tmp_path / "out").studies if s.status == "failed"]
    assert sorted(s.volume for s in failed) == list(range(1, 41))
    assert {(s.error.code, s.error.message.split(":")[0]) for s in failed} == {("nifti_corrupt", "bold.nii.gz")}
    assert {s.error.message.rpartition("(")[2] for s in failed if s.volume in (1, 21)} == {
        "volumes 1-20 of 40 of this source were converted together, reading it once)",
        "volumes 21-40 of 40 of this source were converted together, reading it once)"}

def test_without_split_4d_a_4d_nifti_image_fails_naming_the_fix(tmp_path: Path) -> None:
    _save(tmp_path / "scan" / "bold.nii.gz", _volumes(2))
    _save(tmp_path / "scan" / "one.nii.gz", _volumes(1))  # X*Y*Z*1 is 3D: one study, split or not
    ingest(tmp_path / "scan", tmp_path / "out")
    ingest(tmp_path / "scan", tmp_path / "split", config=SPLIT)
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert studies["bold.nii.gz"].error.code == "nifti_4d" and "ingest.split_4d=true" in studies[
        "bold.nii.gz"].error.message
    assert studies["one.nii.gz"].status == "ok"
    split = load_manifest(tmp_path / "split").studies
    assert sorted((s.source, s.volume) for s in split) == [("bold.nii.gz", 1), ("bold.nii.gz", 2),
                                                           ("one.nii.gz", None)]


def test_a_file_that_lost_volumes_since_discovery_fails_by_name(tmp_path: Path) -> None:
    path = _save(tmp_path / "scan" / "bold.nii.gz", _volumes(2))
    task = IngestTask(id="case_x", source="bold.nii.gz", format="nifti", out_dir=str(tmp_path / "out"),
                      image_path=str(path), volume=3, volumes=3)
    with pytest.raises(IngestError) as info:
        process_study(task)
    assert info.value.code == "file_changed" and str(info.value).startswith("bold.nii.gz: holds 2 volume(s)")


def test_dicom_volumes_are_recorded_as_volume_n_of_m_in_acquisition_order(tmp_path: Path) -> None:
    written = _time_series(tmp_path / "scan", temporal=True)  # TemporalPositionIdentifier runs backwards
    ingest(tmp_path / "scan", tmp_path / "whole")
    ingest(tmp_path / "scan", tmp_path / "split", config=SPLIT)
    (whole,) = load_manifest(tmp_path / "whole").studies
    assert (whole.volume, whole.volumes) == (None, 3)
    whole_image = load_nifti(tmp_path / "whole" / whole.image, allow_4d=True).array
    split = load_manifest(tmp_path / "split").studies
    assert [(s.volume, s.volumes) for s in split] == [(1, 3), (2, 3), (3, 3)]  # listed in volume order
    for study in split:
        image = load_nifti(tmp_path / "split" / study.image).array
        np.testing.assert_array_equal(image, whole_image[..., study.volume - 1])
        np.testing.assert_array_equal(image, written[3 - study.volume].expected_values.astype(image.dtype))
        assert image.shape == SHAPE
    stored = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert {(s["volume"], s["volumes"]) for s in stored["studies"]} == {(1, 3), (2, 3), (3, 3)}

    before = (tmp_path / "split" / "manifest.json").read_bytes()
    for study in stored["studies"]:  # a manifest written before medpipe recorded volumes
        del study["volume"], study["volumes"]
    (tmp_path / "split" / "manifest.json").write_text(json.dumps(stored))
    again = ingest(tmp_path / "scan", tmp_path / "split", config=SPLIT, force=True)
    assert sum(1 for s in again["studies"] if s.get("reused")) == 3  # reused, and now say which volume they are
    assert (tmp_path / "split" / "manifest.json").read_bytes() == before


def test_a_one_channel_model_given_a_4d_series_is_told_to_split_it() -> None:
    series = Volume(array=_volumes(3).astype(np.float32), affine=AFFINE)
    with pytest.raises(GeometryError) as info:
        check_channels(series, None, what="bold.nii.gz")
    assert info.value.code == "channels_mismatch" and "3 channels along the 4th axis" in str(info.value)
    assert "ingest.split_4d=true" in str(info.value)
    with pytest.raises(GeometryError) as info:  # one channel of two: the nnU-Net v2 naming is the hint
        check_channels(Volume(array=series.array[..., 0], affine=AFFINE), ["T2", "ADC"], what="t2.nii.gz")
    assert "CASE_0000.nii.gz" in str(info.value) and "split_4d" not in str(info.value)
