"""Listing a scan folder: the scandir walk gives what an os.walk + pathlib listing gives, in the same order."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pipeline.stages.ingest_listing import (
    LeftOut,
    StageFolder,
    Unreadable,
    list_scan_files,
    listing_digest,
    relative,
    scan_listing,
)
from tests.fixtures.listing_faults import break_entries


def _reference(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """The listing by os.walk and pathlib (slow, obviously right), sorted: regular files, no links leaving the
    root, never into linked folders."""
    real_root = root.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve().is_relative_to(exclude):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if path.is_symlink():
                try:
                    if not path.resolve(strict=True).is_relative_to(real_root):
                        continue
                except (OSError, RuntimeError):  # dangling, or a loop
                    continue
            if path.is_file():
                files.append(path)
    return sorted(files)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "scan"
    for rel in ("b.dcm", "a.txt", "a/z.dcm", "a/b/c.dcm", "a/b/a.dcm", "a-b/x", "A/upper", "out/old.nii.gz",
                "deep/1/2/3/4/f"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "folder").mkdir(parents=True)
    (elsewhere / "secret.dcm").write_bytes(b"x")
    (root / "link_in.dcm").symlink_to(root / "a" / "z.dcm")
    (root / "link_out.dcm").symlink_to(elsewhere / "secret.dcm")
    (root / "dangling.dcm").symlink_to(root / "missing")
    (root / "a" / "dirlink_in").symlink_to(root / "deep", target_is_directory=True)
    (root / "dirlink_out").symlink_to(elsewhere / "folder", target_is_directory=True)
    os.mkfifo(root / "a" / "fifo")
    return root


def test_the_listing_equals_the_os_walk_listing(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tree / "a" / "loop").symlink_to(tree / "a" / "loop")
    with caplog.at_level(logging.DEBUG):
        listing = scan_listing(tree)
    assert listing.files == _reference(tree) == list_scan_files(tree)
    rels = [relative(tree, p) for p in listing.files]
    assert rels == ["A/upper", "a/b/a.dcm", "a/b/c.dcm", "a/z.dcm", "a-b/x", "a.txt", "b.dcm", "deep/1/2/3/4/f",
                    "link_in.dcm", "out/old.nii.gz"]  # Path order: a folder's entries by name, depth first
    # links not followed, in the same order, for the caller to record (names withheld): nothing logged here
    assert [(relative(tree, link.path), link.leads) for link in listing.links] == [
        ("a/loop", "nowhere"), ("dangling.dcm", "nowhere"), ("dirlink_out", "outside"), ("link_out.dcm", "outside")]
    assert listing.links[0] == LeftOut(tree / "a" / "loop", "nowhere")
    assert caplog.records == [] and listing.unreadable == []


def test_folders_a_medpipe_stage_wrote_are_left_out_below_the_top(tree: Path) -> None:
    record = {"stage": "preprocess", "config_hash": "0" * 16, "code_version": "abc", "status": "complete"}
    (tree / "a" / "b" / "record.json").write_text(json.dumps(record))
    (tree / "A" / "record.json").write_text("{not json")  # not a medpipe record: listed as a file
    listing = scan_listing(tree)
    assert listing.outputs == [StageFolder(tree / "a" / "b", "preprocess")]
    assert not any(p.is_relative_to(tree / "a" / "b") for p in listing.files)
    assert tree / "A" / "record.json" in listing.files
    assert scan_listing(tree / "a" / "b").files == sorted((tree / "a" / "b").iterdir())  # the top: read as asked


def test_an_excluded_folder_is_not_listed(tree: Path) -> None:
    exclude = (tree / "out").resolve()
    files = list_scan_files(tree, exclude=exclude)
    assert files == _reference(tree, exclude=exclude)
    assert not any("out" in p.parts for p in files)
    assert list_scan_files(tree, exclude=tree.resolve()) == []  # an output folder holding the scan folder


def test_relative_paths_match_pathlib(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for root in (tree, Path(os.path.relpath(tree))):
        for path in list_scan_files(root):
            assert relative(root, path) == path.relative_to(root).as_posix()
    monkeypatch.chdir(tree)
    here = list_scan_files(Path("."))
    assert [relative(Path("."), p) for p in here] == [p.relative_to(".").as_posix() for p in here]
    assert relative(Path("/"), Path("/etc/hosts")) == "etc/hosts"


def test_the_digest_follows_names_sizes_and_change_times(tree: Path) -> None:
    files = list_scan_files(tree)
    first = listing_digest(tree, files)
    assert listing_digest(tree, files) == first
    (tree / "a" / "z.dcm").write_bytes(b"new content")  # new size and times
    second = listing_digest(tree, files)
    assert second != first
    # what the listing left out counts too: a new link or unreadable folder is a change of the scan
    assert listing_digest(tree, files, left_out=scan_listing(tree).links) != second
    assert listing_digest(tree, files, left_out=[Unreadable(tree / "x", "Permission denied")]) != second


def test_an_unreadable_folder_is_returned_unlogged_and_the_rest_listed(
        tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    everything = _reference(tree)
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str] | str) -> object:
        if Path(path).name == "b":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.DEBUG):
        listing = scan_listing(tree)
    assert listing.unreadable == [(tree / "a" / "b", "Permission denied", True)]
    assert "a/b" not in caplog.text  # a folder's name may be PHI: the caller records it, scrubbed
    assert [relative(tree, p) for p in listing.files if p.parent.name == "a"] == ["a/z.dcm"]
    assert listing.files == [p for p in everything if p.parent.name != "b"]
    assert len(listing.files) == len(everything) - 2
    assert list_scan_files(tree) == listing.files


def test_an_unreadable_scan_folder_is_the_only_entry(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scandir(path: os.PathLike[str] | str) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", scandir)
    listing = scan_listing(tree)
    assert listing.files == [] and listing.unreadable == [(tree, "Permission denied", True)]


def test_a_file_that_cannot_be_looked_at_still_gets_a_digest_line(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = list_scan_files(tree)
    real_stat = os.stat

    def stat(path: os.PathLike[str] | str, *args: object, **kwargs: object) -> os.stat_result:
        if Path(path).name == "c.dcm":
            raise PermissionError(13, "Permission denied")
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    first = listing_digest(tree, files)
    monkeypatch.setattr(os, "stat", stat)
    assert listing_digest(tree, files) != first  # no crash, and the change is seen


def test_an_entry_whose_type_cannot_be_looked_up_is_returned_and_its_folder_still_listed(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    everything = _reference(tree)
    break_entries(monkeypatch, {"z.dcm"})
    listing = scan_listing(tree)
    assert listing.unreadable == [Unreadable(tree / "a" / "z.dcm", "Input/output error", folder=False)]
    assert listing.files == [p for p in everything if p != tree / "a" / "z.dcm"]  # a/b/* and the rest kept
