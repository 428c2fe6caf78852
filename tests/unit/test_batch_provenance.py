"""The batch loop (continue on error, workers) and stage records (up-to-date checks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.batch import run_batch
from pipeline.errors import IngestError
from pipeline.provenance import StageRecord, StudyStatus, is_up_to_date, load_record


def _work(x: int) -> int:
    if x == 2:
        raise IngestError("study 2: bad pixels", code="bad_pixels")
    if x == 3:
        raise ZeroDivisionError("boom")
    return x * 10


def _die(x: int) -> int:
    if x == 1:
        os._exit(9)  # a worker that dies like a segfaulting decoder
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_recorded_and_the_batch_goes_on(workers: int) -> None:
    outcomes = list(run_batch([0, 1, 2, 3, 4], _work, key=str, workers=workers))
    assert [o.key for o in outcomes] == ["0", "1", "2", "3", "4"]
    assert [o.result for o in outcomes if o.ok] == [0, 10, 40]
    assert outcomes[2].code == "bad_pixels" and "bad pixels" in (outcomes[2].message or "")
    assert outcomes[3].code == "unexpected_error" and "ZeroDivisionError" in (outcomes[3].message or "")


def test_dead_worker_fails_only_unfinished_items() -> None:
    outcomes = list(run_batch([0, 1], _die, key=str, workers=2))
    assert outcomes[1].code == "worker_died"
    assert all(o.ok or o.code == "worker_died" for o in outcomes)


def test_record_and_up_to_date(tmp_path: Path) -> None:
    out_file = tmp_path / "result.txt"
    out_file.write_text("v1")
    rec = StageRecord(stage="x", stage_dir=tmp_path, config={"a": 1}, config_hash="h1", inputs={"m": "abc"})
    rec.add(StudyStatus(id="s1", status="ok"))
    record = rec.finish(outputs=[out_file])
    assert record["status"] == "complete" and record["counts"]["ok"] == 1
    assert load_record(tmp_path)["outputs"] == {"result.txt": record["outputs"]["result.txt"]}
    assert is_up_to_date(tmp_path, config_hash="h1", inputs={"m": "abc"}) == (True, "up to date")
    assert is_up_to_date(tmp_path, config_hash="h2", inputs={"m": "abc"})[1] == "config changed"
    assert is_up_to_date(tmp_path, config_hash="h1", inputs={"m": "xyz"})[1] == "inputs changed"
    out_file.write_text("tampered")
    assert not is_up_to_date(tmp_path, config_hash="h1", inputs={"m": "abc"})[0]


def test_partial_and_failed_status(tmp_path: Path) -> None:
    rec = StageRecord(stage="x", stage_dir=tmp_path, config={}, config_hash="h")
    rec.add(StudyStatus(id="a", status="ok"))
    rec.add(StudyStatus(id="b", status="failed", code="c", message="m"))
    assert rec.status == "partial"
    rec.studies = [StudyStatus(id="b", status="failed")]
    assert rec.status == "failed"
    rec.finish()
    assert not is_up_to_date(tmp_path, config_hash="h", inputs={})[0]
