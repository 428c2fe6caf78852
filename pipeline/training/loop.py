"""The training loop: seeded epochs, AMP on CUDA, time budget, sliding-window validation, checkpoints, history."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig
from pipeline.errors import StageError
from pipeline.fileio import write_text_atomic
from pipeline.models.segmenters import build_segmenter
from pipeline.training.checkpoints import restore_rng_state, rng_state, save_checkpoint, save_weights
from pipeline.training.data import train_dataset, train_loader, validation_volumes
from pipeline.transforms.augmentation import training_transforms

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.pt"
POLY_POWER = 0.9
VAL_OVERLAP = 0.25


@dataclass
class TrainResult:
    """What a finished (or time-limited) run produced."""

    epochs_run: int
    best_epoch: int | None
    best_metric: float | None
    best_dice: dict[str, float]
    history: list[dict[str, Any]]
    stopped_by: str
    resumed_from_epoch: int | None
    best_weights: Path
    train_seconds: float


@dataclass
class PolySchedule:
    """Polynomial LR decay over whichever budget runs out first: the epochs or the training minutes."""

    base_lr: float
    epochs: int
    max_seconds: float | None
    power: float = POLY_POWER
    progress: float = field(default=0.0)

    def lr(self, *, epoch_fraction: float, seconds: float) -> float:
        """``epoch_fraction``: epochs done (fractional, 0-based); ``seconds``: training time used so far."""
        progress = epoch_fraction / self.epochs
        if self.max_seconds:
            progress = max(progress, seconds / self.max_seconds)
        self.progress = min(max(progress, 0.0), 1.0)
        return self.base_lr * (1.0 - self.progress) ** self.power

    def state_dict(self) -> dict[str, Any]:
        return {"name": "poly", "base_lr": self.base_lr, "epochs": self.epochs, "power": self.power,
                "progress": self.progress}


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed for one epoch's sampling and augmentation, so a resumed run replays the same randomness."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


def make_optimizer(model: torch.nn.Module, config: PipelineConfig) -> torch.optim.Optimizer:
    cfg = config.train
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def validate(model: torch.nn.Module, volumes: Sequence[dict[str, Any]], *, num_classes: int,
             patch_size: Sequence[int], device: str, amp: bool, sw_batch_size: int = 4) -> list[float]:
    """Per-class Dice (classes 1..K-1) of argmax predictions over whole volumes (sliding window)."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    model.eval()
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
        for item in volumes:
            image = item["image"].to(device)
            logits = sliding_window_inference(image, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                              predictor=model, overlap=VAL_OVERLAP, mode="gaussian")
            pred = one_hot(torch.argmax(logits.float(), dim=1, keepdim=True), num_classes=num_classes)
            metric(y_pred=pred.cpu(), y=one_hot(item["label"].long(), num_classes=num_classes))
    scores = metric.aggregate()
    metric.reset()
    return [float(v) for v in torch.as_tensor(scores).reshape(-1).tolist()]


def history_csv(history: Sequence[dict[str, Any]], classes: Sequence[int]) -> str:
    columns = ["epoch", "train_loss", *[f"val_dice_{c}" for c in classes], "val_mean_dice", "lr", "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def run_training(
    *,
    config: PipelineConfig,
    plans: dict[str, Any],
    train_items: Sequence[dict[str, str]],
    val_items: Sequence[dict[str, str]],
    out: Path,
    device: str,
    resume: dict[str, Any] | None = None,
    resume_key: str = "",
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train from scratch or from ``resume`` (a checkpoint dict) until ``epochs`` or ``max_minutes``."""
    cfg = config.train
    seed = config.seed
    num_classes = int(plans["num_classes"])
    patch_size = [int(v) for v in plans["patch_size"]]
    classes = list(range(1, num_classes))
    checkpoints = out / "checkpoints"
    amp = bool(cfg.amp and device == "cuda")

    model = build_segmenter(cfg.network, in_channels=1, out_channels=num_classes).to(device)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    schedule = PolySchedule(cfg.learning_rate, cfg.epochs, cfg.max_minutes * 60 if cfg.max_minutes else None)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    transform = training_transforms(config.preprocess.augmentation, patch_size=patch_size, num_classes=num_classes,
                                    samples_per_volume=cfg.samples_per_volume)
    dataset = train_dataset(train_items, transform)
    generator = torch.Generator()
    loader = train_loader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, generator=generator)
    volumes = validation_volumes(val_items)

    start, best_metric, best_epoch, history, train_seconds = 1, None, None, [], 0.0
    best_dice: dict[str, float] = {}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if amp and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["epoch"]) + 1
        best_metric, best_epoch = resume.get("best_metric"), resume.get("best_epoch")
        best_dice = dict(resume.get("best_dice") or {})
        history = list(resume.get("history") or [])
        train_seconds = float(resume.get("train_seconds", 0.0))
        if resume.get("rng"):
            restore_rng_state(resume["rng"])
        log.info("resuming at epoch %d (best mean Dice so far %s)", start, best_metric)
    resumed_from = start - 1 if resume is not None else None

    stopped_by = "epochs"
    last_epoch_seconds = 0.0
    bar = tqdm(range(start, cfg.epochs + 1), desc="train", unit="epoch", disable=None, initial=start - 1,
               total=cfg.epochs)
    for epoch in bar:
        if schedule.max_seconds and train_seconds >= schedule.max_seconds:
            stopped_by = "max_minutes"
            break
        tick = time.monotonic()
        seed_epoch = epoch_seed(seed, epoch)
        torch.manual_seed(seed_epoch)
        generator.manual_seed(seed_epoch)
        dataset.transform.set_random_state(seed=seed_epoch)  # every random transform, re-derived per epoch
        model.train()
        losses: list[float] = []
        steps = max(len(loader), 1)
        lr = cfg.learning_rate
        for step, batch in enumerate(loader):
            lr = schedule.lr(epoch_fraction=epoch - 1 + step / steps, seconds=train_seconds + time.monotonic() - tick)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        if losses and not any(math.isfinite(v) for v in losses):
            raise StageError(f"training diverged in epoch {epoch} (every loss was NaN or infinite); lower "
                             "train.learning_rate and run again (the last good checkpoint is kept)",
                             code="training_diverged")

        elapsed = time.monotonic() - tick
        budget_ends = bool(schedule.max_seconds and train_seconds + elapsed + max(elapsed, last_epoch_seconds)
                           >= schedule.max_seconds)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 6), "lr": lr}
        if volumes and (epoch % cfg.val_every == 0 or epoch == cfg.epochs or budget_ends):
            dice = validate(model, volumes, num_classes=num_classes, patch_size=patch_size, device=device, amp=amp)
            mean = _mean(dice)
            row.update({f"val_dice_{c}": round(d, 6) for c, d in zip(classes, dice, strict=True)})
            row["val_mean_dice"] = None if mean is None else round(mean, 6)
            if mean is not None and (best_metric is None or mean > best_metric):
                best_metric, best_epoch = mean, epoch
                best_dice = {str(c): d for c, d in zip(classes, dice, strict=True)}
                save_weights(model.state_dict(), checkpoints / BEST_WEIGHTS)
        elif not volumes:
            best_epoch = epoch
            save_weights(model.state_dict(), checkpoints / BEST_WEIGHTS)
        last_epoch_seconds = time.monotonic() - tick
        train_seconds += last_epoch_seconds
        row["seconds"] = round(last_epoch_seconds, 3)
        history.append(row)
        write_text_atomic(out / "history.csv", history_csv(history, classes))
        save_checkpoint({
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if amp else {},
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "best_dice": best_dice,
            "history": history,
            "train_seconds": train_seconds,
            "rng": rng_state(),
            "resume_key": resume_key,
        }, checkpoints)
        bar.set_postfix(loss=f"{train_loss:.4f}", dice=f"{row.get('val_mean_dice') or float('nan'):.4f}")
        log.info("epoch %d: loss %.4f, val Dice %s, lr %.2e, %.1f s", epoch, train_loss,
                 row.get("val_mean_dice"), lr, last_epoch_seconds)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if budget_ends:
            stopped_by = "max_minutes" if epoch < cfg.epochs else "epochs"
            break
    bar.close()
    epochs_run = int(history[-1]["epoch"]) if history else 0
    return TrainResult(epochs_run=epochs_run, best_epoch=best_epoch, best_metric=best_metric, best_dice=best_dice,
                       history=history, stopped_by=stopped_by, resumed_from_epoch=resumed_from,
                       best_weights=checkpoints / BEST_WEIGHTS, train_seconds=train_seconds)
