"""Checkpoints (atomic save, weights-only load, truncation detection, last-good fallback) and the study split."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CheckpointError, ConfigError, StageError
from pipeline.training.checkpoints import (
    LAST,
    PREVIOUS,
    load_checkpoint,
    load_latest,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_weights,
)
from pipeline.training.split import check_split, make_split, read_split


def _state(epoch: int) -> dict:
    torch.manual_seed(epoch)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "history": [{"epoch": epoch, "train_loss": 0.5}], "best_metric": None, "rng": rng_state()}


def test_round_trip_is_weights_only(tmp_path: Path) -> None:
    state = _state(3)
    path = save_checkpoint(state, tmp_path)
    assert path == tmp_path / LAST
    # the file itself loads with the safe loader, no pickled classes needed
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3
    loaded = load_checkpoint(path)
    assert loaded["history"] == state["history"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == state["optimizer"]["state"][0]["step"]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({**_state(1), "rng": rng_state()}, tmp_path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: S311
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / LAST)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected  # noqa: S311


def test_rotation_keeps_previous(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 2
    assert load_checkpoint(tmp_path / PREVIOUS)["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("cut", [0, 100, 0.5, -30])
def test_truncated_checkpoint_is_detected_and_previous_used(tmp_path: Path, cut: float,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    last = tmp_path / LAST
    data = last.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    last.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(last)
    assert err.value.code == "checkpoint_corrupt"
    with caplog.at_level(logging.WARNING):
        found = load_latest(tmp_path)
    assert found is not None
    state, path = found
    assert path.name == PREVIOUS and state["epoch"] == 1
    assert "falling back" in caplog.text


def test_both_corrupt_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / LAST).write_bytes(b"garbage")
    (tmp_path / PREVIOUS).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert load_latest(tmp_path) is None
    assert "from scratch" in caplog.text
    assert load_latest(tmp_path / "empty") is None


class Payload:
    """Any class: unpickling it would run code, so weights-only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / LAST
    torch.save({"format": "medpipe-train-checkpoint-v1", "epoch": 1, "model": {}, "optimizer": {},
                "evil": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert err.value.code == "checkpoint_unsafe"


def test_foreign_or_incomplete_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="not a medpipe training checkpoint"):
        load_checkpoint(tmp_path / "a.pt")
    torch.save({"format": "medpipe-train-checkpoint-v1", "epoch": 1}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="lacks model, optimizer"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_round_trip(tmp_path: Path) -> None:
    weights = torch.nn.Conv3d(1, 2, 3).state_dict()
    save_weights(weights, tmp_path / "model.pt")
    loaded = load_weights(tmp_path / "model.pt")
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    (tmp_path / "bad.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError):
        load_weights(tmp_path / "bad.pt")


# ---- split -------------------------------------------------------------------------------

IDS = [f"case_{i:03d}" for i in range(23)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = make_split(IDS, val_fraction=0.2, seed=5)
    b = make_split(list(reversed(IDS)), val_fraction=0.2, seed=5)
    assert a == b
    assert len(a["validation"]) == 5 and len(a["train"]) == 18
    assert not set(a["train"]) & set(a["validation"])
    assert sorted(a["train"] + a["validation"]) == IDS
    assert make_split(IDS, val_fraction=0.2, seed=6)["validation"] != a["validation"]


def test_split_keeps_one_study_each_side() -> None:
    assert len(make_split(IDS[:2], val_fraction=0.9, seed=0)["train"]) == 1
    assert len(make_split(IDS[:3], val_fraction=0.01, seed=0)["validation"]) == 1
    with pytest.raises(StageError, match="at least 2"):
        make_split(IDS[:1], val_fraction=0.2, seed=0)


def test_given_split_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"seed": 1, "train": IDS[:20], "validation": IDS[20:]}))
    assert read_split(path, IDS)["validation"] == IDS[20:]
    with pytest.raises(ConfigError, match="both train and validation"):
        check_split({"train": IDS[:5], "validation": IDS[4:6]}, IDS, source="s")
    with pytest.raises(ConfigError, match="not in the preprocessed dataset"):
        check_split({"train": ["nobody"], "validation": []}, IDS, source="s")
    with pytest.raises(ConfigError, match="does not exist"):
        read_split(tmp_path / "missing.json", IDS)
