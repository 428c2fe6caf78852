"""The demo end to end: phantoms -> all six stages -> report; a rerun skips everything and changes nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.fileio import sha256_file
from pipeline.layout import STAGES, RunLayout


def _deterministic_files(run: Path) -> dict[str, str]:
    """Checksums of every output except the run-specific records and logs."""
    skip = {"record.json", "medpipe.log"}
    return {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip and "checkpoints" not in p.parts}


@pytest.mark.slow
def test_demo_end_to_end_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--cases", "10", "--set", "train.max_minutes=4",
            "--set", "train.epochs=20", "--set", "train.val_every=5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    layout = RunLayout(out / "run")
    index = layout.report / "index.html"
    assert f"Report: {index.resolve()}" in printed
    assert index.is_file()

    for stage in STAGES:
        record = json.loads((layout.stage_dir(stage) / "record.json").read_text())
        assert record["status"] == "complete", stage
        assert record["config_hash"] and record["packages"]["torch"] and record["code_version"]

    manifest = json.loads((layout.ingest / "manifest.json").read_text())
    assert len(manifest["studies"]) == 10 and all(s["status"] == "ok" for s in manifest["studies"])
    split = json.loads((layout.train / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["validation"])
    rows = list(csv.DictReader((layout.evaluate / "per_study.csv").open()))
    assert {r["study"] for r in rows} == set(split["validation"])
    # Phantoms are easy: twenty short epochs must segment both classes.
    for cls, floor in (("1", 0.6), ("2", 0.8)):
        dice = [float(r["dice"]) for r in rows if r["class"] == cls]
        assert sum(dice) / len(dice) > floor, (cls, dice)

    before = _deterministic_files(layout.root)
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == len(STAGES)
    assert _deterministic_files(layout.root) == before
