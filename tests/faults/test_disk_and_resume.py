"""A full disk (ENOSPC) on one study's write keeps the previous outputs and reports the study; a failed command
prints the exact command that resumes it."""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import pipeline.io.nifti as nifti
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.fileio import atomic_path, read_json, sha256_file
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import preprocess


def test_enospc_on_one_study_keeps_previous_outputs_and_reports_it(msd_dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ingest(msd_dataset, tmp_path / "ingest", config=load_config(None))
    out = tmp_path / "pre"
    preprocess(tmp_path / "ingest", out, config=load_config(None))
    before = {p.name: sha256_file(p) for p in (out / "data").iterdir()}
    victim = sorted(before)[0].split("_image")[0].split("_label")[0].removesuffix(".json")

    @contextmanager
    def full_disk(path: str | os.PathLike[str]) -> Iterator[Path]:
        with atomic_path(path) as tmp:
            if Path(path).name.startswith(victim):
                tmp.write_bytes(b"half a volume")  # the disk fills during the write
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            yield tmp

    monkeypatch.setattr(nifti, "atomic_path", full_disk)
    record = preprocess(tmp_path / "ingest", out, config=load_config(None, overrides=["preprocess.normalization=none"]))
    failed = [s for s in record["studies"] if s["status"] == "failed"]
    assert record["status"] == "partial" and [s["id"] for s in failed] == [victim]
    assert "No space left on device" in failed[0]["message"]
    after = {p.name: sha256_file(p) for p in (out / "data").iterdir()}
    assert {k: v for k, v in after.items() if k.startswith(victim)} == \
        {k: v for k, v in before.items() if k.startswith(victim)}  # the old volume, whole, under its name
    assert sum(after[k] != before[k] for k in before if not k.startswith(victim)) >= 10  # the others rewritten
    assert not list(out.rglob(".*.partial*"))
    assert victim not in {e["id"] for e in read_json(out / "dataset.json")["studies"]}
    monkeypatch.undo()  # space freed: the rerun finishes the job
    again = preprocess(tmp_path / "ingest", out, config=load_config(None, overrides=["preprocess.normalization=none"]))
    assert again["status"] == "complete" and again["counts"]["ok"] == 6


def test_failed_command_prints_the_command_that_resumes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "scans with space"
    empty.mkdir()
    argv = ["ingest", str(empty), "--out", str(tmp_path / "out"), "--shard", "1/2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    expected = "medpipe " + " ".join(shlex.quote(a) for a in argv)
    assert f"To resume after fixing this, run: {expected}\n" in err
    assert shlex.split(expected)[1:] == argv  # pasting it back gives the same arguments
