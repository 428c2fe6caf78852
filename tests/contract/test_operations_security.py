"""Bad-input contract, operations and security (cases 21-27): paths, names, checkpoints, kills, reruns, exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, main
from pipeline.config import load_config
from pipeline.fileio import read_json, sha256_file
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_kinds import write_object
from tests.fixtures.dicom_writer import write_series

REPO = Path(__file__).resolve().parents[2]


def _outputs(out: Path) -> dict[str, str]:
    """Checksums of what must be byte-identical between runs: the manifest and every image and label."""
    files = [out / "manifest.json", *sorted(out.glob("images/*")), *sorted(out.glob("labels/*"))]
    return {str(p.relative_to(out)): sha256_file(p) for p in files}


# ---- case 21: links and manifest paths that leave the input root ---------------------------------


def test_links_and_manifest_paths_outside_the_root_are_refused(msd_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "msd"
    shutil.copytree(msd_dataset, root)
    outside = tmp_path / "outside"
    secret = write_series(outside / "series", small_stored(1), series_tag="outside")
    shutil.copy(root / "imagesTr" / sorted(os.listdir(root / "imagesTr"))[0], outside / "secret.nii.gz")
    (root / "imagesTr" / "escape.nii.gz").symlink_to(outside / "secret.nii.gz")
    (root / "linked_series").symlink_to(outside / "series", target_is_directory=True)
    (root / "stray.dcm").symlink_to(secret.files[0])
    meta = json.loads((root / "dataset.json").read_text())
    label = meta["training"][0]["label"]
    meta["training"] += [{"image": "../outside/secret.nii.gz", "label": label},
                         {"image": str(outside / "secret.nii.gz"), "label": label},
                         {"image": "./imagesTr/escape.nii.gz", "label": label}]
    (root / "dataset.json").write_text(json.dumps(meta))
    record = ingest(root, tmp_path / "out")
    studies = load_manifest(tmp_path / "out").studies
    refused = [s for s in studies if s.error is not None]
    assert len(refused) == 3 and {s.error.code for s in refused} == {"path_outside_root"}
    assert sum(s.status == "ok" for s in studies) == 6 and record["status"] == "partial"
    assert not any("linked_series" in s.source or "stray" in s.source for s in studies)  # never followed
    # the links themselves are accounted for (the one dataset.json lists already is, by its refused entry)
    links = [s for s in studies if s.status == "skipped"]
    assert [s.problems[0].code for s in links] == ["link_outside_root"] * 2
    assert all(s.format == "unknown" and s.image is None and s.source.startswith("phi-") for s in links)
    assert record["counts"] == {"ok": 6, "failed": 3, "skipped": 2}


def test_links_left_out_are_recorded_and_a_new_one_is_seen_on_rerun(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    scan, outside = tmp_path / "scan", tmp_path / "outside"
    write_series(scan / "SE1", small_stored(1), series_tag="inside")
    secret = write_series(outside / "series", small_stored(2), series_tag="outside")
    (scan / "SE1" / "DOE_JANE.dcm").symlink_to(secret.files[0])  # a name no header reveals as PHI
    (scan / "SE1" / "gone.dcm").symlink_to(tmp_path / "deleted.dcm")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        record = ingest(scan, out)
    assert record["status"] == "complete" and record["counts"] == {"ok": 1, "failed": 0, "skipped": 2}
    skipped = sorted((s.problems[0].code, s.source) for s in load_manifest(out).studies if s.status == "skipped")
    assert [code for code, _ in skipped] == ["link_dangling", "link_outside_root"]
    assert all(re.fullmatch(r"SE1/phi-[0-9a-f]{8}", source) for _, source in skipped)  # the folder was read
    texts = caplog.text + "".join(p.read_text() for p in out.glob("*.json"))
    assert "DOE" not in texts and "gone" not in texts and "outside/series" not in texts

    # a link added to a complete scan changes no file of the listing, but the stage sees it
    (scan / "later.dcm").symlink_to(secret.files[1])
    record = ingest(scan, out)
    assert record["counts"] == {"ok": 1, "failed": 0, "skipped": 3} and record["reused_studies"] == 1


# ---- case 22: tag values never become file names ------------------------------------------------


def test_tag_values_never_reach_the_filesystem(tmp_path: Path) -> None:
    hostile = {"SeriesDescription": "../../../../tmp/evil", "PatientName": "$(touch pwned)",
               "ProtocolName": "a/b;rm -rf ~", "StudyID": "`id`", "PatientID": "..\\..\\x"}

    def edit(ds, _k):
        for keyword, value in hostile.items():
            setattr(ds, keyword, value)

    scan = tmp_path / "scan"
    write_series(scan / "s", small_stored(2), series_tag="hostile", edit=edit)
    before = {p for p in tmp_path.rglob("*")}
    cwd_before = set(os.listdir("."))
    ingest(scan, tmp_path / "out")
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "out") for p in created)
    names = {str(p.relative_to(tmp_path / "out")) for p in created if p.is_file()}
    ids = [s.id for s in load_manifest(tmp_path / "out").studies]
    assert len(ids) == 1 and re.fullmatch(r"case_[0-9a-f]{12}", ids[0])
    assert names == {"manifest.json", "record.json", "config.yaml", f"images/{ids[0]}.nii.gz"}
    assert set(os.listdir(".")) == cwd_before and not list(tmp_path.rglob("pwned"))


# ---- case 24: a checkpoint cut short by a crash; the last good one is used ------------------------


def test_checkpoint_write_killed_midway_leaves_the_last_good_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from pipeline.training.checkpoints import LAST, load_checkpoint, load_latest, save_checkpoint

    child = textwrap.dedent(f"""
        import os, signal, torch
        from pipeline.training.checkpoints import save_checkpoint
        def state(epoch):
            model = torch.nn.Linear(64, 64)
            return {{"epoch": epoch, "model": model.state_dict(), "optimizer": {{}}}}
        save_checkpoint(state(1), {str(tmp_path)!r})
        real_save = torch.save
        def dying_save(obj, path, *a, **k):  # the power goes off halfway through writing epoch 2
            real_save(obj, path, *a, **k)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_checkpoint(state(2), {str(tmp_path)!r})
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1  # the final name never held the partial epoch 2
    state, path = load_latest(tmp_path)
    assert path.name == LAST and state["epoch"] == 1
    save_checkpoint({**state, "epoch": 2}, tmp_path)  # training goes on over the leftover
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 2


# ---- case 25: a stage killed mid-write, then rerun -----------------------------------------------


@pytest.mark.timeout(180)
def test_ingest_killed_mid_write_leaves_no_partial_file_and_the_rerun_matches(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    rng = np.random.default_rng(25)
    for k in range(20):
        write_series(scan / f"s{k:02d}", rng.integers(-500, 1500, size=(128, 128, 16)).astype(np.int16),
                     series_tag=f"kill{k}")
    ingest(scan, tmp_path / "reference")
    reference = _outputs(tmp_path / "reference")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", str(scan), "--out", str(out), "-q"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_finished(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the stage and its worker
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # killed mid-batch, before the end
    finals = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for path in finals:  # every file under a final name is complete: the very bytes of the full run
        rel = str(path.relative_to(out))
        if rel.startswith("images/"):
            assert sha256_file(path) == reference[rel], rel
    assert 3 <= len(_finished(out)) < 20
    assert main(["ingest", str(scan), "--out", str(out), "-q"]) == EXIT_OK
    assert _outputs(out) == reference
    assert not [p for p in out.rglob(".*") if p.is_file()]  # leftovers of the killed run are gone


def _finished(out: Path) -> list[Path]:
    return [p for p in out.glob("images/*.nii.gz") if not p.name.startswith(".")]  # not temporary files


# ---- case 26: an input replaced at the same path is noticed (content, not names or times) ----------


def test_input_replaced_at_the_same_path_with_the_same_size_and_time_is_converted_again(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    write_series(scan / "a", small_stored(3), series_tag="a")
    written = write_series(scan / "b", small_stored(4), series_tag="b")
    volume = load_nifti(_nifti(scan / "c.nii.gz", 5))
    out = tmp_path / "out"
    ingest(scan, out)
    replacement = write_series(tmp_path / "other", small_stored(40), series_tag="b")  # same UIDs, other pixels
    victim = written.files[2]
    stat = victim.stat()
    assert replacement.files[2].stat().st_size == stat.st_size
    shutil.copyfile(replacement.files[2], victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    nifti = scan / "c.nii.gz"
    nstat = nifti.stat()
    save_nifti(volume.with_array(volume.array[::-1].copy()), nifti)
    os.utime(nifti, ns=(nstat.st_atime_ns, nstat.st_mtime_ns))
    record = ingest(scan, out)
    assert not record.get("skipped")
    reused = {s["id"]: s.get("reused", False) for s in record["studies"]}
    studies = {s.source: s for s in load_manifest(out).studies}
    assert reused[studies["a"].id] and not reused[studies["b"].id] and not reused[studies["c.nii.gz"].id]
    expected = written.expected_values.copy()
    expected[:, :, 2] = replacement.expected_values[:, :, 2]
    np.testing.assert_array_equal(load_nifti(out / studies["b"].image).array, expected.astype(np.float32))


def _nifti(path: Path, seed: int) -> Path:
    data = np.random.default_rng(seed).integers(0, 100, size=(5, 6, 7)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def test_preprocess_cache_follows_content_not_paths(msd_dataset: Path, tmp_path: Path) -> None:
    """Case 26 for preprocess: after an input changes at the same path, only that study is recomputed.

    The case is mirrored (image and label): same intensities, so the plans stay the same and
    every other study's cached output stays valid."""
    from pipeline.stages.preprocess import preprocess

    root = tmp_path / "msd"
    shutil.copytree(msd_dataset, root)
    ingest(root, tmp_path / "ingest")
    preprocess(tmp_path / "ingest", tmp_path / "pre")
    victim = sorted((root / "imagesTr").iterdir())[0]
    for path, dtype in ((victim, np.float32), (root / "labelsTr" / victim.name, np.uint8)):
        volume, stat = load_nifti(path), path.stat()
        save_nifti(volume.with_array(volume.array[::-1].copy()), path, dtype=dtype)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ingest(root, tmp_path / "ingest")
    changed = next(s.id for s in load_manifest(tmp_path / "ingest").studies if s.source.endswith(victim.name))
    record = preprocess(tmp_path / "ingest", tmp_path / "pre")
    reused = {s["id"]: s.get("reused", False) for s in record["studies"]}
    assert reused.pop(changed) is False and all(reused.values())


def test_preprocess_notices_an_ingest_image_replaced_behind_the_manifest(msd_dataset: Path, tmp_path: Path) -> None:
    from pipeline.stages.preprocess import preprocess

    ingest(msd_dataset, tmp_path / "ingest")
    preprocess(tmp_path / "ingest", tmp_path / "pre")
    study = load_manifest(tmp_path / "ingest").studies[0]
    image = load_nifti(tmp_path / "ingest" / study.image)
    save_nifti(image.with_array(image.array[::-1].copy()), tmp_path / "ingest" / study.image, dtype=np.float32)
    record = preprocess(tmp_path / "ingest", tmp_path / "pre")
    reused = {s["id"]: s.get("reused", False) for s in record["studies"]}
    assert not record.get("skipped") and reused[study.id] is False


# ---- case 27 and the exit status ------------------------------------------------------------------


@pytest.fixture
def mixed_scan(tmp_path: Path) -> Path:
    scan = tmp_path / "scan"
    write_series(scan / "ok", small_stored(6), series_tag="ok", shuffle_seed=3)
    write_series(scan / "gap", small_stored(7), series_tag="gap", offsets=[0, 1, 2, 4])
    write_object(scan / "report" / "sr.dcm", "sr")
    _nifti(scan / "volume.nii.gz", 8)
    return scan


def test_the_same_batch_twice_gives_identical_manifest_and_outputs(mixed_scan: Path, tmp_path: Path) -> None:
    first = ingest(mixed_scan, tmp_path / "a")
    second = ingest(mixed_scan, tmp_path / "b", config=load_config(None, overrides=["ingest.workers=2"]))
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert first["studies"] == second["studies"] and first["counts"] == {"ok": 2, "failed": 1, "skipped": 1}


def test_exit_status_tells_complete_partial_and_failed(mixed_scan: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", str(mixed_scan / "ok"), "--out", str(tmp_path / "one"), "-q"]) == EXIT_OK
    assert main(["ingest", str(mixed_scan / "ok"), "--out", str(tmp_path / "one"), "-q"]) == EXIT_OK  # up to date
    assert main(["ingest", str(mixed_scan), "--out", str(tmp_path / "mixed"), "-q", "--workers", "2"]) == EXIT_PARTIAL
    assert main(["ingest", str(mixed_scan / "gap"), "--out", str(tmp_path / "none"), "-q"]) == EXIT_FAILED
    printed = capsys.readouterr().out
    assert re.search(r"failed case_[0-9a-f]{12}: \[dicom_nonuniform_spacing\] gap/IM000\d\.dcm", printed)
    assert "  skipped: 1 dicom_non_image\n" in printed  # skipped studies, by reason
    assert read_json(tmp_path / "mixed" / "record.json")["status"] == "partial"
