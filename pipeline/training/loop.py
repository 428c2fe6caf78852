"""The training loop: seeded epochs, AMP/channels-last/compile on CUDA, DDP, time budget, validation, exact resume.

Every epoch reseeds torch, the loader's generator and every random transform from (seed, rank, epoch), and
the learning rate is a function of (epochs done, seconds used); a checkpoint holds the model, optimiser,
schedule, grad scaler, RNG states, history and best-model bookkeeping, so a run resumed after epoch k ends
with the same weights as an uninterrupted one (on the CPU with ``num_workers=0``; bit for bit).

The best model is chosen by an exponential moving average of the validation mean Dice (nnU-Net's idea:
``ema = 0.9 * ema + 0.1 * dice``, starting at the first value), which is less noisy than single epochs;
``best_metric``/``best_dice`` report the raw validation Dice of the chosen epoch.

Under ``torchrun`` (see :mod:`pipeline.training.distributed`) each rank trains on its shard with
``batch_size // world_size`` samples per step (the global batch stays ``batch_size``), gradients are averaged
by DDP and the batch Dice is computed over the global batch, so a step equals a single-process step on the
whole batch. Only rank 0 validates and writes files; the others wait for its decisions (stop, time used).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig
from pipeline.errors import StageError
from pipeline.io.channels import channel_count, channel_names
from pipeline.models.segmenters import build_segmenter
from pipeline.training import distributed as ddp
from pipeline.training.checkpoints import restore_rng_state, rng_state, save_checkpoint, save_weights
from pipeline.training.data import train_dataset, train_loader, validation_volumes
from pipeline.training.deep_supervision import segmentation_loss
from pipeline.training.history import HistoryLogger
from pipeline.training.optim import make_optimizer, make_schedule, next_epoch_fits
from pipeline.transforms.augmentation import training_transforms

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.pt"
VAL_OVERLAP = 0.25
EMA_DECAY = 0.9
GRAD_CLIP_NORM = 12.0
DEFAULT_BATCH_SIZE = 2


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
    world_size: int = 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed for one epoch's sampling and augmentation, so a resumed run replays the same randomness."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


def batch_size(config: PipelineConfig, plans: dict[str, Any]) -> int:
    """``train.batch_size``, else the plans' ``batch_size``, else 2 (the global batch under DDP)."""
    return int(config.train.batch_size or plans.get("batch_size") or DEFAULT_BATCH_SIZE)


def validate(model: torch.nn.Module, volumes: Sequence[dict[str, Any]], *, num_classes: int,
             patch_size: Sequence[int], device: str, amp: bool, sw_batch_size: int = 4) -> list[float]:
    """Per-class Dice (classes 1..K-1) of argmax predictions over whole volumes (Gaussian sliding window),
    averaged over the volumes holding the class (NaN where none does).

    Computed here rather than with MONAI's DiceMetric, which gathers over all ranks when a process group
    exists (only rank 0 validates under DDP).
    """
    was_training = model.training
    model.eval()
    scores: list[list[float]] = [[] for _ in range(1, num_classes)]
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.float16, enabled=amp):
        for item in volumes:
            image = item["image"].to(device)
            logits = sliding_window_inference(image, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                              predictor=model, overlap=VAL_OVERLAP, mode="gaussian")
            pred = torch.argmax(logits.float(), dim=1).cpu()
            truth = item["label"].reshape(pred.shape).round().long()
            for c in range(1, num_classes):
                p, t = pred == c, truth == c
                reference = int(t.sum())
                if reference:  # a class absent from the reference is left out (MONAI's ignore_empty)
                    scores[c - 1].append(2.0 * int((p & t).sum()) / (int(p.sum()) + reference))
    model.train(was_training)
    return [sum(v) / len(v) if v else float("nan") for v in scores]


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


@dataclass
class _Best:
    """Best-model bookkeeping (saved in checkpoints)."""

    metric: float | None = None
    epoch: int | None = None
    dice: dict[str, float] | None = None
    ema: float | None = None
    best_ema: float | None = None

    def update(self, mean: float, dice: dict[str, float], epoch: int) -> bool:
        self.ema = mean if self.ema is None else EMA_DECAY * self.ema + (1.0 - EMA_DECAY) * mean
        if self.best_ema is None or self.ema > self.best_ema:
            self.best_ema, self.metric, self.epoch, self.dice = self.ema, mean, epoch, dict(dice)
            return True
        return False


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
    """Train from scratch or from ``resume`` (a checkpoint dict) until ``epochs`` or ``max_minutes``.

    Under torchrun, rank 0's ``resume`` is used on every rank, only rank 0 writes into ``out``, and every rank
    returns rank 0's result.
    """
    cfg = config.train
    ctx = ddp.setup(device)
    device = ctx.device
    dev_type = torch.device(device).type
    num_classes = int(plans["num_classes"])
    patch_size = [int(v) for v in plans["patch_size"]]
    classes = list(range(1, num_classes))
    checkpoints = out / "checkpoints"
    amp = bool(cfg.amp and dev_type == "cuda")
    channels_last = bool(cfg.channels_last and dev_type == "cuda")
    resume = ddp.broadcast_object(resume, ctx)

    net = build_segmenter(cfg.network, in_channels=channel_count(plans), out_channels=num_classes,
                          plans=plans).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(net.parameters(), cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    schedule = make_schedule(cfg)
    loss_fn = segmentation_loss()

    global_batch = batch_size(config, plans)
    batch = max(1, global_batch // ctx.world_size)
    if ctx.enabled and global_batch % ctx.world_size:
        log.warning("batch size %d does not divide over %d processes; each trains on %d", global_batch,
                    ctx.world_size, batch)
    transform = training_transforms(config.preprocess.augmentation, patch_size=patch_size, num_classes=num_classes,
                                    samples_per_volume=cfg.samples_per_volume, sampling=cfg.sampling,
                                    foreground_fraction=cfg.foreground_fraction)
    dataset = train_dataset(train_items, transform, channels=channel_names(plans))
    generator = torch.Generator()
    loader = train_loader(dataset, batch_size=batch, num_workers=cfg.num_workers, generator=generator,
                          rank=ctx.rank, world_size=ctx.world_size, shuffle_seed=config.seed)
    volumes = validation_volumes(val_items, channels=channel_names(plans)) if ctx.is_main else []
    has_validation = bool(val_items)

    start, history, train_seconds, best = 1, [], 0.0, _Best()
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scheduler"):
            schedule.load_state_dict(resume["scheduler"])
        if amp and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["epoch"]) + 1
        best = _Best(metric=resume.get("best_metric"), epoch=resume.get("best_epoch"),
                     dice=dict(resume.get("best_dice") or {}), ema=resume.get("val_ema"),
                     best_ema=resume.get("best_ema", resume.get("best_metric")))
        history = list(resume.get("history") or [])
        train_seconds = float(resume.get("train_seconds", 0.0))
        if resume.get("rng") and ctx.is_main:
            restore_rng_state(resume["rng"], loader=generator)
        log.info("resuming at epoch %d (best mean Dice so far %s)", start, best.metric)
    resumed_from = start - 1 if resume is not None else None

    model = ddp.wrap_model(net, ctx)
    if cfg.compile and dev_type == "cuda":
        model = torch.compile(model)
    logger = HistoryLogger(out, classes, tensorboard=cfg.tensorboard, start_epoch=start) if ctx.is_main else None
    seed = ddp.rank_seed(config.seed, ctx.rank)
    stopped_by = "epochs"
    last_epoch_seconds = 0.0
    bar = tqdm(range(start, cfg.epochs + 1), desc="train", unit="epoch", disable=None if ctx.is_main else True,
               initial=start - 1, total=cfg.epochs)
    try:
        for epoch in bar:
            if schedule.max_seconds and train_seconds >= schedule.max_seconds:
                stopped_by = "max_minutes"
                break
            tick = time.monotonic()
            seed_epoch = epoch_seed(seed, epoch)
            torch.manual_seed(seed_epoch)
            generator.manual_seed(seed_epoch)
            if hasattr(dataset.transform, "set_random_state"):
                dataset.transform.set_random_state(seed=seed_epoch)  # every random transform, per epoch
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            stats = _train_epoch(model, net, loader, optimizer, scaler, schedule, loss_fn, ctx=ctx, epoch=epoch,
                                 tick=tick, train_seconds=train_seconds, amp=amp, channels_last=channels_last)
            loss_sum, finite, total, samples = ddp.sum_floats(
                [stats["loss_sum"], stats["finite"], stats["steps"], stats["samples"]], ctx)
            if total and not finite:
                raise StageError(f"training diverged in epoch {epoch} (every loss was NaN or infinite); lower "
                                 "train.learning_rate and run again (the last good checkpoint is kept)",
                                 code="training_diverged")
            train_loss = loss_sum / finite if finite else float("nan")
            elapsed = time.monotonic() - tick
            budget_ends = bool(schedule.max_seconds and not next_epoch_fits(
                train_seconds + elapsed, (elapsed, last_epoch_seconds), schedule.max_seconds))
            if ctx.is_main:
                row: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 6), "lr": stats["lr"],
                                       "samples": int(samples), "data_seconds": round(stats["data_seconds"], 3),
                                       "step_seconds": round(stats["step_seconds"], 3)}
                if dev_type == "cuda":
                    row["gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                val_tick = time.monotonic()
                if volumes and (epoch % cfg.val_every == 0 or epoch == cfg.epochs or budget_ends):
                    dice = validate(net, volumes, num_classes=num_classes, patch_size=patch_size, device=device,
                                    amp=amp)
                    mean = _mean(dice)
                    row.update({f"val_dice_{c}": round(d, 6) for c, d in zip(classes, dice, strict=True)})
                    row["val_mean_dice"] = None if mean is None else round(mean, 6)
                    if mean is not None:
                        improved = best.update(mean, {str(c): d for c, d in zip(classes, dice, strict=True)}, epoch)
                        row["val_ema_dice"] = round(best.ema, 6)
                        if improved:
                            save_weights(net.state_dict(), checkpoints / BEST_WEIGHTS)
                elif not has_validation:
                    best.epoch = epoch
                    save_weights(net.state_dict(), checkpoints / BEST_WEIGHTS)
                row["val_seconds"] = round(time.monotonic() - val_tick, 3)
                last_epoch_seconds = time.monotonic() - tick
                row["seconds"] = round(last_epoch_seconds, 3)
                history.append(row)
                _save(checkpoints, epoch=epoch, net=net, optimizer=optimizer, schedule=schedule, scaler=scaler,
                      amp=amp, best=best, history=history, train_seconds=train_seconds + last_epoch_seconds,
                      generator=generator, resume_key=resume_key, world_size=ctx.world_size)
                logger.log(history)
                last_epoch_seconds = time.monotonic() - tick  # the budget counts writing the logs too
                bar.set_postfix(loss=f"{train_loss:.4f}", dice=f"{row.get('val_mean_dice') or float('nan'):.4f}")
                log.info("epoch %d: loss %.4f, val Dice %s, lr %.2e, %.1f s (data %.1f s, steps %.1f s)", epoch,
                         train_loss, row.get("val_mean_dice"), stats["lr"], last_epoch_seconds,
                         stats["data_seconds"], stats["step_seconds"])
            else:
                last_epoch_seconds = time.monotonic() - tick
            # rank 0 decides; the others wait here while it validates and writes
            last_epoch_seconds, budget_flag = ddp.broadcast_floats([last_epoch_seconds, float(budget_ends)], ctx)
            train_seconds += last_epoch_seconds
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            if budget_flag:
                stopped_by = "max_minutes" if epoch < cfg.epochs else "epochs"
                break
        if ctx.is_main and history and best.epoch is None:  # validation never gave a Dice: keep the last weights
            log.warning("no validation Dice was measured; the last epoch's weights are kept as the model")
            best.epoch = int(history[-1]["epoch"])
            save_weights(net.state_dict(), checkpoints / BEST_WEIGHTS)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    final = ddp.broadcast_object({"history": history, "best": best, "stopped_by": stopped_by}, ctx)
    history, best = final["history"], final["best"]
    epochs_run = int(history[-1]["epoch"]) if history else 0
    return TrainResult(epochs_run=epochs_run, best_epoch=best.epoch, best_metric=best.metric,
                       best_dice=best.dice or {}, history=history, stopped_by=final["stopped_by"],
                       resumed_from_epoch=resumed_from, best_weights=checkpoints / BEST_WEIGHTS,
                       train_seconds=train_seconds, world_size=ctx.world_size)


def _train_epoch(model: torch.nn.Module, net: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, schedule: Any, loss_fn: torch.nn.Module, *, ctx: ddp.DistContext,
                 epoch: int, tick: float, train_seconds: float, amp: bool, channels_last: bool) -> dict[str, float]:
    """One pass over ``loader``; the time spent waiting for batches and in steps is measured separately."""
    model.train()
    dev_type = torch.device(ctx.device).type
    steps = max(len(loader), 1)
    sync_time = ctx.enabled and schedule.max_seconds is not None  # ranks must agree on the learning rate
    stats = {"loss_sum": 0.0, "finite": 0.0, "steps": 0.0, "samples": 0.0, "data_seconds": 0.0, "step_seconds": 0.0,
             "lr": schedule.lr(epoch_fraction=epoch - 1, seconds=train_seconds)}
    iterator = iter(loader)
    waiting = time.monotonic()
    for step in range(len(loader)):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        began = time.monotonic()
        stats["data_seconds"] += began - waiting
        seconds = train_seconds + began - tick
        if sync_time:
            seconds = ddp.broadcast_floats([seconds], ctx)[0]
        lr = schedule.lr(epoch_fraction=epoch - 1 + step / steps, seconds=seconds)
        schedule.apply(optimizer, lr)
        image = batch["image"].to(ctx.device, non_blocking=True)
        label = batch["label"].to(ctx.device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev_type, dtype=torch.float16, enabled=amp):
            output = model(image)
        loss = loss_fn(output, label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
        value = float(loss.detach())  # waits for the step to finish, so the timing below is the step's
        stats["steps"] += 1
        stats["samples"] += image.shape[0]
        if math.isfinite(value):
            stats["loss_sum"] += value
            stats["finite"] += 1
        stats["lr"] = lr
        waiting = time.monotonic()
        stats["step_seconds"] += waiting - began
    return stats


def _save(folder: Path, *, epoch: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
          scaler: torch.amp.GradScaler, amp: bool, best: _Best, history: list[dict[str, Any]], train_seconds: float,
          generator: torch.Generator, resume_key: str, world_size: int) -> None:
    save_checkpoint({
        "epoch": epoch,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict() if amp else {},
        "best_metric": best.metric,
        "best_epoch": best.epoch,
        "best_dice": best.dice or {},
        "best_ema": best.best_ema,
        "val_ema": best.ema,
        "history": history,
        "train_seconds": train_seconds,
        "rng": rng_state(loader=generator),
        "resume_key": resume_key,
        "world_size": world_size,
    }, folder)
