"""The whole ``medpipe run`` killed with SIGKILL mid-stage and rerun gives the outputs of an uninterrupted run;
two runs of one config on one data set give byte-identical outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.fileio import sha256_file
from pipeline.layout import RunLayout

TINY = """\
name: tiny
seed: 0
preprocess: {spacing: [1.0, 1.0, 1.0], patch_size: [24, 24, 24]}
train:
  epochs: 3
  batch_size: 2
  samples_per_volume: 1
  val_fraction: 0.34
  network: {channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}
evaluate: {bootstrap: 200}
infer: {sw_batch_size: 2}
"""

# Run-specific by design: records (timestamps, host, durations), logs, training checkpoints (their optimizer
# state holds wall-clock fields), and the cohort page, whose provenance block shows each stage's start time and
# duration from the records (everything else on it is checked through studies/*.json and the metric files), and
# history.csv, whose timing columns are wall times (tests/stages/test_train.py compares the other columns), and the
# training curves drawn from it (progress.png, tensorboard/).
RUN_SPECIFIC = {"record.json", "medpipe.log", "index.html", "history.csv", "progress.png"}


def _outputs(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): sha256_file(p) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in RUN_SPECIFIC
            and "checkpoints" not in p.parts and "tensorboard" not in p.parts}


def _command(config: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(config), "--out", str(out), "--data", str(data), "-q"]


def _interrupted(layout: RunLayout) -> str | None:
    """The stage to kill in: mid-preprocess (volumes written, no record) or mid-training (a checkpoint, no model)."""
    data = layout.preprocess / "data"
    if data.is_dir() and any(data.glob("*.nii.gz")) and not (layout.preprocess / "record.json").exists():
        return "preprocess"
    if (layout.train / "checkpoints" / "last.pt").exists() and not (layout.train / "record.json").exists():
        return "train"
    return None


@pytest.fixture(scope="module")
def runs(msd_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("killrun")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    plain = root / "plain"
    subprocess.run(_command(config, msd_dataset, plain), check=True, env=env, timeout=600)
    killed = root / "killed"
    layout = RunLayout(killed)
    kills: list[str] = []
    proc = subprocess.Popen(_command(config, msd_dataset, killed), env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        stage = _interrupted(layout)
        if stage:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any worker it started
            proc.wait()
            kills.append(stage)
            break
        time.sleep(0.01)
    assert kills, "the run finished before it could be killed mid-stage"
    subprocess.run(_command(config, msd_dataset, killed), check=True, env=env, timeout=600)
    return plain, killed, kills


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_outputs(runs: tuple[Path, Path, list[str]]) -> None:
    plain, killed, kills = runs
    expected, got = _outputs(plain), _outputs(killed)
    for required in ("01_ingest/manifest.json", "04_infer/predictions.json", "05_evaluate/summary.json",
                     "05_evaluate/per_study.csv", "03_train/model/model.pt"):
        assert required in expected, required
    assert not [p for p in killed.rglob(".*.partial*")], "a partial file survived under the run folder"
    diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    assert not diff, f"killed during {kills[0]} and rerun, these differ from the uninterrupted run: {diff}"


@pytest.mark.slow
def test_two_runs_of_one_config_are_byte_identical(runs: tuple[Path, Path, list[str]]) -> None:
    """Also checks that nothing run-specific leaked into a deterministic file: every record says complete and
    the files compared include the manifest, predictions, metrics, per-study report JSON/HTML and pictures."""
    plain, killed, _ = runs
    expected = _outputs(plain)
    assert any(k.startswith("06_report/studies/") and k.endswith(".json") for k in expected)
    assert any(k.startswith("04_infer/predictions/") for k in expected)
    assert expected == _outputs(killed)
