"""Nothing lost: a file or folder of the scan that cannot be read gets a failed entry in the manifest (its
name withheld, as it may carry PHI no header revealed), and a series beside an unreadable file says it may
be missing slices. Most tests simulate unreadable entries (tests may run as root, whom permissions do not
stop); the last one uses real permissions through the command line."""

from __future__ import annotations

import builtins
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import IngestError
from pipeline.io import dicom_header
from pipeline.manifest import Study, load_manifest
from pipeline.privacy import Scrubber
from pipeline.stages import ingest_headers
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series
from tests.fixtures.listing_faults import IO_ERROR, break_entries

DENIED = "Permission denied"


def _deny_files(monkeypatch: pytest.MonkeyPatch, paths: set[Path]) -> None:
    """Opening one of ``paths`` for reading headers fails as a file without read permission does."""
    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        if Path(str(path)) in paths:
            raise PermissionError(13, DENIED, str(path))
        return builtins.open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(dicom_header, "open", fake_open, raising=False)


def _deny_folders(monkeypatch: pytest.MonkeyPatch, names: set[str]) -> None:
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str] | str) -> object:
        if Path(path).name in names:
            raise PermissionError(13, DENIED)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _all_text(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out.rglob("*"))
                     if p.is_file() and p.suffix in (".json", ".log", ".yaml"))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_slice_is_recorded_and_its_series_warned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              workers: int) -> None:
    scan = tmp_path / "scan"
    victim = write_series(scan / "DOE_JANE_1234" / "SE1", small_stored(1), series_tag="victim")
    write_series(scan / "other", small_stored(2), series_tag="other")
    last = victim.files[-1]  # the last slice: its loss changes no spacing, only the extent
    _deny_files(monkeypatch, {last})
    if workers > 1:  # headers read in forked workers, in chunks, as a large scan's are
        monkeypatch.setattr(ingest_headers, "MIN_PARALLEL_FILES", 2)
        monkeypatch.setattr(ingest_headers, "CHUNK_FILES", 3)
    config = load_config(None, overrides=[f"ingest.workers={workers}"])
    out = tmp_path / "out"
    record = ingest(scan, out, config=config)

    assert record["status"] == "partial"
    studies = load_manifest(out).studies
    (failed,) = [s for s in studies if s.status == "failed"]
    assert failed.error is not None and failed.error.code == "file_unreadable" and failed.format == "dicom"
    assert DENIED in failed.error.message and last.name not in failed.error.message
    folder, token = failed.source.rsplit("/", 1)
    assert token.startswith("phi-") and folder.endswith("/SE1")  # the folder whose headers were read is shown
    assert "DOE" not in folder and "JANE" not in folder  # and scrubbed of the PHI those headers revealed
    series = {s.source.rsplit("/", 1)[-1]: s for s in studies if s.status == "ok"}
    assert series["SE1"].shape == [6, 5, 3] and series["other"].shape == [6, 5, 4]
    assert [p.code for p in series["SE1"].problems] == ["dicom_unreadable_neighbour"]
    assert "1 file(s)" in series["SE1"].problems[0].message and series["other"].problems == []
    assert record["ignored_files"] == 0  # recorded, not merely counted
    assert last.name not in _all_text(out) and "DOE" not in _all_text(out)

    # the permissions are fixed (chmod changes the file's ctime): the rerun converts the whole series
    monkeypatch.undo()
    os.chmod(last, 0o644)
    record = ingest(scan, out, config=config)
    assert record["status"] == "complete"
    studies = load_manifest(out).studies
    assert all(s.status == "ok" and not s.problems for s in studies) and len(studies) == 2
    (whole,) = [s for s in studies if s.source.endswith("SE1")]
    assert whole.shape == [6, 5, 4]


def test_an_unreadable_folder_is_recorded_under_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan"
    write_series(scan / "SMITH_JOHN_99" / "SE1", small_stored(1), series_tag="hidden")
    write_series(scan / "readable", small_stored(2), series_tag="readable")
    _deny_folders(monkeypatch, {"SMITH_JOHN_99"})
    out = tmp_path / "out"
    record = ingest(scan, out)
    assert record["status"] == "partial"
    studies = {s.status: s for s in load_manifest(out).studies}
    assert set(studies) == {"ok", "failed"}
    failed: Study = studies["failed"]
    assert failed.format == "unknown" and failed.error is not None and failed.error.code == "folder_unreadable"
    assert failed.source.startswith("phi-") and "/" not in failed.source  # no header was read under it
    assert DENIED in failed.error.message and "! -readable" in failed.error.message
    assert "SMITH" not in _all_text(out)
    np.testing.assert_array_equal(studies["ok"].shape, [6, 5, 4])


def test_an_entry_that_cannot_be_looked_at_warns_the_series_beside_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan"
    victim = write_series(scan / "SE1", small_stored(1), series_tag="victim")
    write_series(scan / "SE2", small_stored(2), series_tag="other")
    last = victim.files[-1].rename(victim.files[-1].with_name("DOE_JANE.dcm"))  # both series share file names
    break_entries(monkeypatch, {last.name})  # a file or a folder: its type cannot be looked up
    out = tmp_path / "out"
    record = ingest(scan, out)
    assert record["status"] == "partial"
    studies = load_manifest(out).studies
    (failed,) = [s for s in studies if s.status == "failed"]
    assert failed.error is not None and failed.error.code == "entry_unreadable" and IO_ERROR in failed.error.message
    assert re.fullmatch(r"SE1/phi-[0-9a-f]{8}", failed.source) and "DOE" not in _all_text(out)
    series = {s.source: s for s in studies if s.status == "ok"}
    assert series["SE1"].shape == [6, 5, 3] and series["SE2"].problems == []
    assert [p.code for p in series["SE1"].problems] == ["dicom_unreadable_neighbour"]
    assert "entry_unreadable" in series["SE1"].problems[0].message


def test_a_folder_that_may_hold_more_of_a_series_warns_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan"
    split = write_series(scan / "split" / "part1", small_stored(1, (6, 5, 6)), series_tag="split")
    (scan / "split" / "part2").mkdir()
    for path in split.files[3:]:  # one series over two folders, as some exports write long series
        path.rename(scan / "split" / "part2" / path.name)
    write_series(scan / "split" / "part3", small_stored(2), series_tag="blocked")  # more of it, for all we know
    write_series(scan / "below", small_stored(3), series_tag="below")
    write_series(scan / "below" / "more", small_stored(4), series_tag="more")
    write_series(scan / "study" / "SE1", small_stored(5), series_tag="se1")
    write_series(scan / "study" / "SE2", small_stored(6), series_tag="se2")  # another series' folder: no warning
    _deny_folders(monkeypatch, {"part3", "more", "SE2"})
    ingest(scan, tmp_path / "out")
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies if s.status == "ok"}
    assert set(studies) == {"split", "below", "study/SE1"}
    assert studies["split"].shape == [6, 5, 6]
    for name in ("split", "below"):
        assert [p.code for p in studies[name].problems] == ["dicom_unreadable_neighbour"]
        assert "1 folder(s) beside or below its files cannot be listed" in studies[name].problems[0].message
    assert studies["study/SE1"].problems == []


def test_an_unreadable_scan_folder_is_an_error_not_an_empty_scan(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan"
    write_series(scan, small_stored(1))
    _deny_folders(monkeypatch, {"scan"})
    with pytest.raises(IngestError) as info:
        ingest(scan, tmp_path / "out")
    assert info.value.code == "scan_dir_unreadable" and DENIED in str(info.value)


def test_scrubbing_off_keeps_unread_names() -> None:
    assert Scrubber(key="k", uids=False, enabled=False).withhold("a/b/c.dcm", known={"a"}) == "a/b/c.dcm"


@pytest.mark.parametrize(("rel", "known", "kept"), [
    ("a/b/c.dcm", {"a", "a/b"}, "a/b/"),  # a slice beside read ones: only its own name withheld
    ("a/b/c.dcm", {"a"}, "a/"),  # nothing read in b: b's name may be a patient's too
    ("a/b/c.dcm", set(), ""),
    ("c.dcm", {"a"}, ""),
])
def test_withhold_keeps_only_folders_whose_headers_were_read(rel: str, known: set[str], kept: str) -> None:
    scrubber = Scrubber(key="k")
    withheld = scrubber.withhold(rel, known=known)
    assert withheld == kept + scrubber.token(rel[len(kept):])
    assert withheld != Scrubber(key="other").withhold(rel, known=known)  # keyed


def _without_read_override() -> list[str]:
    """A command prefix under which file permissions bind (root reads anything, unless it drops the
    capabilities that let it); [] for other users; skip where root cannot drop them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: permissions cannot be made to bind")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_a_series_that_fails_for_a_missing_slice_names_the_unreadable_one(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "scan"
    series = write_series(scan / "SE1", small_stored(1, (6, 5, 6)), series_tag="s")
    _deny_files(monkeypatch, {series.files[2]})  # a middle slice: the stack has a gap
    ingest(scan, tmp_path / "out")
    (failed,) = [s for s in load_manifest(tmp_path / "out").studies if s.source == "SE1"]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "dicom_nonuniform_spacing"
    assert [p.code for p in failed.problems] == ["dicom_unreadable_neighbour"]


def test_real_permissions_through_the_command_line(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    series = write_series(scan / "SE1", small_stored(1), series_tag="s")
    write_series(scan / "SE2" / "inner", small_stored(2), series_tag="t")
    out = tmp_path / "out"
    os.chmod(series.files[-1], 0)
    os.chmod(scan / "SE2", 0)
    try:
        command = [*_without_read_override(), sys.executable, "-m", "pipeline", "ingest", str(scan), "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    finally:
        os.chmod(series.files[-1], 0o644)
        os.chmod(scan / "SE2", 0o755)
    assert done.returncode == 3, done.stderr  # partially done
    studies = {(s.status, s.error.code if s.error else None): s for s in load_manifest(out).studies}
    assert set(studies) == {("ok", None), ("failed", "file_unreadable"), ("failed", "folder_unreadable")}
    assert studies[("ok", None)].shape == [6, 5, 3]
    assert studies[("ok", None)].problems[0].code == "dicom_unreadable_neighbour"
    assert "SE2" not in studies[("failed", "folder_unreadable")].source
