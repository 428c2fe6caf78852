"""Optimisers (SGD with Nesterov momentum, AdamW) and learning-rate schedules over an epoch or time budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError

DEFAULT_LEARNING_RATE = {"sgd": 1e-2, "adamw": 1e-3}
SGD_MOMENTUM = 0.99
POLY_POWER = 0.9
SCHEDULES = ("poly", "cosine")


def learning_rate(cfg: TrainConfig) -> float:
    """``train.learning_rate``, or the optimiser's default (0.01 for SGD, 1e-3 for AdamW)."""
    return float(cfg.learning_rate) if cfg.learning_rate is not None else DEFAULT_LEARNING_RATE[cfg.optimizer]


def scheduler_name(cfg: TrainConfig) -> Literal["poly", "cosine"]:
    """``train.scheduler``; ``auto`` is poly for SGD (nnU-Net) and cosine for AdamW."""
    if cfg.scheduler != "auto":
        return cfg.scheduler
    return "poly" if cfg.optimizer == "sgd" else "cosine"


def make_optimizer(parameters: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.99, Nesterov; nnU-Net's recipe) or AdamW, at :func:`learning_rate`."""
    lr = learning_rate(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=SGD_MOMENTUM, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.weight_decay)


@dataclass
class LRSchedule:
    """Learning rate as a function of training progress ``p`` in [0, 1]: whichever budget runs out first,
    ``epoch_fraction / epochs`` or ``seconds / max_seconds``.

    poly: ``base_lr * (1 - p) ** power``; cosine: ``min_lr + (base_lr - min_lr) * (1 + cos(pi p)) / 2``.
    The learning rate depends only on (epochs done, seconds used), both saved in checkpoints, so a resumed
    run continues the same curve; ``epochs`` and ``max_seconds`` may change between a run and its resumption.
    """

    name: str
    base_lr: float
    epochs: int
    max_seconds: float | None = None
    power: float = POLY_POWER
    min_lr: float = 0.0
    progress: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.name}'; choose one of {', '.join(SCHEDULES)}")

    def progress_at(self, *, epoch_fraction: float, seconds: float = 0.0) -> float:
        progress = epoch_fraction / self.epochs
        if self.max_seconds:
            progress = max(progress, seconds / self.max_seconds)
        return min(max(progress, 0.0), 1.0)

    def lr(self, *, epoch_fraction: float, seconds: float = 0.0) -> float:
        """The rate at ``epoch_fraction`` epochs done (fractional, 0-based) and ``seconds`` of training used."""
        self.progress = self.progress_at(epoch_fraction=epoch_fraction, seconds=seconds)
        if self.name == "poly":
            return self.base_lr * (1.0 - self.progress) ** self.power
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * self.progress))

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_lr": self.base_lr, "epochs": self.epochs, "max_seconds": self.max_seconds,
                "power": self.power, "min_lr": self.min_lr, "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress of a checkpoint made with the same schedule (the budgets stay as configured)."""
        if state.get("name", self.name) != self.name or float(state.get("base_lr", self.base_lr)) != self.base_lr:
            raise CheckpointError(f"the checkpoint's learning-rate schedule ({state.get('name')}, base "
                                  f"{state.get('base_lr')}) differs from the configured one ({self.name}, base "
                                  f"{self.base_lr}); resume with the same train settings or start afresh",
                                  code="checkpoint_schedule_mismatch")
        self.progress = float(state.get("progress", 0.0))


def make_schedule(cfg: TrainConfig) -> LRSchedule:
    """The schedule for ``cfg``: :func:`scheduler_name` over ``epochs`` and ``max_minutes``."""
    return LRSchedule(scheduler_name(cfg), learning_rate(cfg), cfg.epochs,
                      cfg.max_minutes * 60 if cfg.max_minutes else None)


def next_epoch_fits(used_s: float, recent_epochs_s: Sequence[float], budget_s: float) -> bool:
    """Whether another epoch, as long as the longest of the ``recent_epochs_s``, ends within ``budget_s`` after
    ``used_s`` seconds of training: a time budget (``max_minutes``) stops training before the epoch that would
    overrun it, not after."""
    return used_s + max(recent_epochs_s, default=0.0) < budget_s

