"""``torchrun --nproc_per_node 2 -m pipeline train``: the train stage under DDP (gloo, CPU) writes its
files once (rank 0), records the world size, and a rerun is skipped by every rank together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stages.test_train import preprocessed  # noqa: F401 - module fixture reused

pytestmark = pytest.mark.slow

TINY = ["--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.samples_per_volume=1",
        "--set", "train.num_workers=0", "--set", "train.network.name=unet",
        "--set", "train.network.channels=[4,8,16]", "--set", "train.network.strides=[2,2]",
        "--set", "train.network.num_res_units=1", "--set", "train.tensorboard=false", "--set", "train.device=cpu",
        "--set", "train.val_fraction=0.34", "--set", "preprocess.patch_size=[24,24,24]"]


def _torchrun(preprocess_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline", "train", str(preprocess_dir), "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_train_stage_writes_once_and_reruns_skip(preprocessed: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "train"
    first = _torchrun(preprocessed, out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "complete"
    assert record["world_size"] == 2
    assert record["epochs_run"] == 2
    assert (out / "model" / "model.pt").is_file() and (out / "validation.json").is_file()
    assert first.stdout.count("train: complete") == 1  # only rank 0 prints its summary
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "medpipe.log"}

    second = _torchrun(preprocessed, out)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "up to date, skipped" in second.stdout
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "medpipe.log"}
    assert after == before  # neither rank touched a file (medpipe.log appends each command)
