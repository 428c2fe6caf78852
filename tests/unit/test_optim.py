"""Optimisers and learning-rate schedules against their closed forms; schedule state for exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.training.optim import LRSchedule, learning_rate, make_optimizer, make_schedule, scheduler_name


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(2, 2).parameters())


def test_sgd_is_nnunet_recipe_and_adamw_the_alternative() -> None:
    sgd = make_optimizer(_params(), TrainConfig())
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    adamw = make_optimizer(_params(), TrainConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-3
    assert make_optimizer(_params(), TrainConfig(learning_rate=0.05)).param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize(("optimizer", "scheduler", "name", "lr"), [
    ("sgd", "auto", "poly", 1e-2), ("adamw", "auto", "cosine", 1e-3), ("sgd", "cosine", "cosine", 1e-2),
    ("adamw", "poly", "poly", 1e-3)])
def test_defaults_follow_the_optimizer(optimizer: str, scheduler: str, name: str, lr: float) -> None:
    cfg = TrainConfig(optimizer=optimizer, scheduler=scheduler)
    assert scheduler_name(cfg) == name and learning_rate(cfg) == lr
    assert make_schedule(cfg).name == name and make_schedule(cfg).base_lr == lr


@pytest.mark.parametrize("fraction", [0.0, 0.25, 3.3, 7.5, 10.0, 12.0])
def test_poly_closed_form(fraction: float) -> None:
    schedule = LRSchedule("poly", 0.01, epochs=10)
    p = min(fraction / 10, 1.0)
    assert schedule.lr(epoch_fraction=fraction) == pytest.approx(0.01 * (1 - p) ** 0.9, abs=1e-15)


@pytest.mark.parametrize("fraction", [0.0, 2.5, 5.0, 9.0, 10.0])
def test_cosine_closed_form(fraction: float) -> None:
    schedule = LRSchedule("cosine", 1e-3, epochs=10)
    assert schedule.lr(epoch_fraction=fraction) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * fraction / 10)))


@pytest.mark.parametrize("name", ["poly", "cosine"])
def test_whichever_budget_runs_out_first_drives_the_schedule(name: str) -> None:
    schedule = LRSchedule(name, 0.01, epochs=100, max_seconds=60.0)
    # 10 % of the epochs but half the time: the time decides
    assert schedule.progress_at(epoch_fraction=10, seconds=30) == pytest.approx(0.5)
    # 80 % of the epochs, 10 % of the time: the epochs decide
    assert schedule.progress_at(epoch_fraction=80, seconds=6) == pytest.approx(0.8)
    assert schedule.lr(epoch_fraction=1, seconds=120) == pytest.approx(0.0, abs=1e-12)
    untimed = LRSchedule(name, 0.01, epochs=100)
    assert untimed.progress_at(epoch_fraction=10, seconds=1e9) == pytest.approx(0.1)


def test_from_config_budget() -> None:
    schedule = make_schedule(TrainConfig(epochs=50, max_minutes=2))
    assert (schedule.epochs, schedule.max_seconds) == (50, 120.0)


def test_state_round_trip_and_mismatch() -> None:
    schedule = LRSchedule("poly", 0.01, epochs=10)
    schedule.lr(epoch_fraction=4)
    state = schedule.state_dict()
    fresh = LRSchedule("poly", 0.01, epochs=10)
    fresh.load_state_dict(state)
    assert fresh.progress == pytest.approx(0.4) and fresh.state_dict() == state
    with pytest.raises(CheckpointError, match="schedule"):
        LRSchedule("cosine", 0.01, epochs=10).load_state_dict(state)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("step", 0.01, epochs=10)


def test_apply_sets_every_group() -> None:
    opt = torch.optim.SGD([{"params": _params()}, {"params": _params()}], lr=1.0)
    LRSchedule.apply(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
