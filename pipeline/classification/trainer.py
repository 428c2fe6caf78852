"""The classification train stage: CE training (balanced, smoothed, AMP), transfer learning, resume, calibration."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.classification.calibration import describe, fit_calibration
from pipeline.classification.cv import VALIDATION_METRICS, VALIDATION_PREDICTIONS, choose_split, train_folds
from pipeline.classification.data import LabelledSet, augment, load_labelled
from pipeline.classification.metrics import auc, classification_metrics, reliability_diagram, softmax
from pipeline.classification.networks import (
    build_classifier,
    check_input_size,
    load_partial,
    pretrained_parameters,
    set_frozen,
)
from pipeline.classification.pretrained_files import ENCODER_NETWORK, segmentation_spec, weights_path
from pipeline.classification.seeds import train_seeds
from pipeline.config import PipelineConfig, config_dict, config_hash
from pipeline.errors import StageError
from pipeline.fileio import atomic_path, sha256_file, write_json_atomic
from pipeline.manifest import Manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import device_description, resolve_device, seed_everything, set_threads
from pipeline.stages.common import execute_stage
from pipeline.training.checkpoints import (
    LAST,
    PREVIOUS,
    load_latest,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_weights,
)
from pipeline.training.optim import next_epoch_fits
from pipeline.training.split import SPLIT_NAME, check_split, write_split

log = logging.getLogger(__name__)

STAGE = "train"
BEST = "best.pt"
HISTORY = "history.csv"
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "frozen", "seconds")
_RUNTIME_ONLY = ("epochs", "max_minutes", "device", "amp", "threads", "gradcam_slices", "temperature_scaling",
                 "calibration_bias", "operating_point")
_FOLD_ONLY = ("fold", "num_folds", "seeds")  # ensemble choices; a member's own split and seed say what it trains


def _write_history(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, device: str, batch_size: int = 32) -> np.ndarray:
    model.eval()
    chunks = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy().astype(np.float64)


def _class_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k).clamp(min=1).double()
    return (counts.sum() / (k * counts)).float()


def _optimizer(model: nn.Module, config: PipelineConfig, matched: list[str]) -> torch.optim.Optimizer:
    c = config.classify
    pre, new = pretrained_parameters(model, matched)
    groups = [{"params": new, "lr": c.learning_rate}]
    if pre:
        groups.append({"params": pre, "lr": c.learning_rate * c.pretrained_lr_factor})
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.learning_rate, momentum=0.9, nesterov=True, weight_decay=c.weight_decay,
                               fused=True)
    cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=c.learning_rate, weight_decay=c.weight_decay, fused=True)  # one kernel, not a loop


def _order(train: LabelledSet, config: PipelineConfig, k: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's sample order: a permutation, or class-balanced draws with replacement."""
    n = len(train.ids)
    if config.classify.balance != "sampler":
        return torch.randperm(n, generator=generator)
    weights = _class_weights(train.labels, k)[train.labels].double()
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def run_epochs(*, model: nn.Module, train: LabelledSet, val: LabelledSet, config: PipelineConfig, out: Path,
               device: str, k: int, matched: list[str], resume: dict[str, Any] | None,
               resume_key: str) -> dict[str, Any]:
    """Train until ``epochs`` or ``max_minutes``; keep the best validation AUC (then lowest loss) weights."""
    c = config.classify
    checkpoints = out / "checkpoints"
    weight = _class_weights(train.labels, k).to(device) if c.balance == "weights" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=c.label_smoothing)
    optimizer = _optimizer(model, config, matched)
    use_amp = c.amp and device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs)
    start, history, best = 0, [], {"auc": -1.0, "loss": float("inf"), "epoch": 0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        restore_rng_state(resume.get("rng", {}))
        start, history, best = int(resume["epoch"]), list(resume["history"]), dict(resume["best"])
    began, stopped_by = time.monotonic(), "epochs"
    elapsed_before = float(resume.get("seconds", 0.0)) if resume else 0.0
    recent = [float(row["seconds"]) for row in history[-2:]]  # the last two epochs' lengths: the next one's guess
    for epoch in range(start + 1, c.epochs + 1):
        used = elapsed_before + time.monotonic() - began
        if c.max_minutes is not None and not next_epoch_fits(used, recent, c.max_minutes * 60):
            stopped_by = "max_minutes"
            break
        frozen = bool(matched) and epoch <= c.freeze_epochs
        set_frozen(model, matched, frozen)
        model.train()
        tick, total, seen = time.monotonic(), 0.0, 0
        order = _order(train, config, k, generator)
        for i in range(0, len(order), c.batch_size):
            rows = order[i:i + c.batch_size]
            if len(rows) < 2 and len(order) >= 2:
                continue  # batch norm needs two samples
            x, y = train.images[rows], train.labels[rows]
            if c.augment:
                x = augment(x, generator=generator)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
        scheduler.step()
        logits = predict_logits(model, val.images, device=device)
        labels = val.labels.numpy()
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), val.labels).item())
        val_auc = auc(labels, softmax(logits))
        val_acc = float((logits.argmax(1) == labels).mean())
        row = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 6), "val_loss": round(val_loss, 6),
               "val_auc": None if val_auc is None else round(val_auc, 6), "val_accuracy": round(val_acc, 6),
               "lr": optimizer.param_groups[0]["lr"], "frozen": int(frozen),
               "seconds": round(time.monotonic() - tick, 2)}
        history.append(row)
        score = -1.0 if val_auc is None else val_auc
        if score > best["auc"] or (score == best["auc"] and val_loss < best["loss"]):
            best = {"auc": score, "loss": val_loss, "epoch": epoch}
            save_weights(model.state_dict(), checkpoints / BEST)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUC %s, val acc %.3f (%.1f s)", epoch,
                 row["train_loss"], val_loss, row["val_auc"], val_acc, row["seconds"])
        save_checkpoint({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                         "rng": rng_state(), "history": history, "best": best, "resume_key": resume_key,
                         "seconds": elapsed_before + time.monotonic() - began}, checkpoints)
        _write_history(history, out / HISTORY)
        recent = [*recent[-1:], time.monotonic() - tick]
    return {"history": history, "best": best, "stopped_by": stopped_by, "resumed_from_epoch": start or None,
            "seconds": elapsed_before + time.monotonic() - began}


def _load(input_dir: Path, config: PipelineConfig) -> tuple[LabelledSet, Manifest]:
    """The labelled studies (unlabelled ones are for inference only)."""
    c = config.classify
    data, manifest = load_labelled(input_dir, input_size=tuple(c.input_size), normalization=c.normalization,
                                   require_labels=False, labelled_only=True)
    return data, manifest


def write_validation_predictions(ids: list[str], labels: np.ndarray, logits: np.ndarray, path: Path) -> Path:
    """``validation_predictions.csv``: study, label and the (uncalibrated) logits, for cross-validated metrics."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study", "label", *(f"logit_{i}" for i in range(logits.shape[1]))])
    for sid, label, row in zip(ids, labels, logits, strict=True):
        writer.writerow([sid, int(label), *(repr(float(v)) for v in row)])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def train_classifier(input_dir: Path, out: Path, *, config: PipelineConfig | None = None,
                     force: bool = False) -> dict[str, Any]:
    """Train ``config.classify.network`` on the labelled manifest in ``input_dir``; write ``out/model/``.

    ``classify.fold`` null: one split, ``data.split_file``, else ``input_dir/split.json``
    (MedMNIST import), else a seeded stratified hold-out of ``val_fraction``. Unlabelled
    studies are left out (inference only). ``k``/``all``: stratified cross-validation
    into ``out/fold_k`` (see ``pipeline.classification.cv``). ``classify.seeds`` > 1: that
    many models on the one split into ``out/seed_S`` (see ``pipeline.classification.seeds``).
    A stopped run resumes from ``checkpoints/last.pt``.
    """
    config = config or PipelineConfig()
    if config.classify.fold is not None:
        return train_folds(Path(input_dir), Path(out), config=config, force=force, train_one=train_split)
    if config.classify.seeds > 1:
        return train_seeds(Path(input_dir), Path(out), config=config, force=force, train_one=train_split)
    return train_split(Path(input_dir), Path(out), config=config, force=force)


def train_split(input_dir: Path, out: Path, *, config: PipelineConfig, force: bool = False,
                split: dict[str, Any] | None = None, fold: int | None = None) -> dict[str, Any]:
    """Train on one train/validation split (``split``, else as train_classifier chooses it) into ``out``."""
    c = config.classify
    input_dir, out = Path(input_dir), Path(out)
    inputs = {"manifest": input_dir / "manifest.json"}
    sources = [("pretrained", weights_path(c.pretrained) if c.pretrained is not None else None)]
    if split is None:
        sources += [("split", input_dir / SPLIT_NAME), ("split_file", config.data.split_file)]
    for name, path in sources:
        if path is not None and Path(path).is_file():
            inputs[name] = Path(path)
    settings = {k: v for k, v in config_dict(c).items() if split is None or k not in _FOLD_ONLY}
    call: dict[str, Any] = {"task": config.task, "classify": settings}
    if split is not None:
        call.update({"split": split, "fold": fold})

    def work(record: StageRecord) -> list[Path]:
        data, manifest = _load(input_dir, config)
        classes = manifest.classes or {str(v): f"class_{v}" for v in sorted(set(data.labels.tolist()))}
        k = max(len(classes), int(data.labels.max()) + 1)
        chosen = (choose_split(config, input_dir, data.ids, data.labels.tolist()) if split is None else
                  check_split(split, data.ids, source="the shared split" if fold is None else f"fold {fold}"))
        split_path = write_split({**chosen, **({"fold": fold} if fold is not None else {})}, out)
        if not chosen["validation"]:
            raise StageError(f"{input_dir}: the split has no validation studies; model selection and calibration "
                             "need some (give classify.val_fraction or a split file with a 'validation' list)")
        train_set, val_set = data.subset(chosen["train"]), data.subset(chosen["validation"])
        full = config_dict(config)
        key = config_hash({"seed": config.seed, "classify": {k2: v for k2, v in full["classify"].items()
                                                            if k2 not in _RUNTIME_ONLY + _FOLD_ONLY},
                           "split": chosen, "manifest": sha256_file(input_dir / "manifest.json")})
        checkpoints = out / "checkpoints"
        if force and checkpoints.exists():
            shutil.rmtree(checkpoints)
        latest, resume = load_latest(checkpoints), None
        if latest is not None and latest[0].get("resume_key") == key:
            resume = latest[0]
            log.info("train: resuming from %s (epoch %s)", latest[1], resume["epoch"])
        elif latest is not None:
            log.warning("train: %s was made with other settings or data; training starts from scratch", latest[1])
            for name in (LAST, PREVIOUS, BEST):
                (checkpoints / name).unlink(missing_ok=True)
        device = resolve_device(c.device)
        set_threads(c.threads)
        seed_everything(config.seed)
        record.device = device_description(device)
        kwargs = c.network_kwargs
        if c.network == ENCODER_NETWORK and "segmentation" not in kwargs:  # the architecture of the pretrained model
            kwargs = {**kwargs, "segmentation": segmentation_spec(c.pretrained)}
        in_channels = int(data.images.shape[1])  # the manifest's channels (MR sequences), else 1
        model = build_classifier(c.network, spatial_dims=len(c.input_size), in_channels=in_channels, num_classes=k,
                                 kwargs=kwargs)
        check_input_size(model, network=c.network, input_size=tuple(c.input_size), in_channels=in_channels)
        matched: list[str] = []
        if c.pretrained is not None:
            report = load_partial(model, weights_path(c.pretrained))
            matched = report.matched
            record.extra["pretrained"] = report.as_dict()
        model.to(device)
        log.info("train: %d training and %d validation studies, %d classes, %d channel(s), %s on %s",
                 len(train_set.ids), len(val_set.ids), k, in_channels, c.network, device)
        result = run_epochs(model=model, train=train_set, val=val_set, config=config, out=out, device=device, k=k,
                            matched=matched, resume=resume, resume_key=key)
        if not (checkpoints / BEST).is_file():
            raise StageError(f"training in {out} produced no model weights (no epoch finished); run it again")
        model.load_state_dict(load_weights(checkpoints / BEST))
        logits = predict_logits(model, val_set.images, device=device)
        labels = val_set.labels.numpy()
        calibration = fit_calibration(logits, labels, temperature=c.temperature_scaling, bias=c.calibration_bias)
        evaluation = {
            "uncalibrated": classification_metrics(labels, logits, operating_point=c.operating_point,
                                                   seed=config.seed),
            "calibrated": classification_metrics(labels, logits, calibration=calibration,
                                                 operating_point=c.operating_point, seed=config.seed),
        }
        write_json_atomic(out / VALIDATION_METRICS, evaluation)
        reliability_diagram(evaluation["calibrated"]["reliability"], out / "reliability.png",
                            title=f"Validation, {describe(calibration)}")
        model_dir = out / "model"
        save_weights(model.state_dict(), model_dir / "model.pt")
        write_json_atomic(model_dir / "model.json", {
            "schema_version": 1, "task": "classification", "network": c.network,
            "network_kwargs": kwargs, "in_channels": in_channels, "channels": manifest.channels, "num_classes": k,
            "classes": classes,
            "input_size": list(c.input_size), "normalization": c.normalization, **calibration.as_json(),
            "operating_point": c.operating_point, "gradcam_slices": c.gradcam_slices,
            "config_hash": config_hash(config), "seed": config.seed, "fold": fold,
            "sha256": sha256_file(model_dir / "model.pt"),
        })
        write_validation_predictions(val_set.ids, labels, logits, out / VALIDATION_PREDICTIONS)
        for split_name, ids in (("train", chosen["train"]), ("validation", chosen["validation"])):
            for study_id in ids:
                record.add(StudyStatus(id=study_id, status="ok", message=split_name))
        cal = evaluation["calibrated"]
        record.timings["train"] = result["seconds"]
        record.extra.update({"task": "classification", "best_epoch": result["best"]["epoch"],
                             "best_val_auc": result["best"]["auc"], "val_accuracy": cal["accuracy"],
                             "val_auc_ci": cal.get("auc_ci"), **calibration.as_json(),
                             "epochs_run": len(result["history"]), "stopped_by": result["stopped_by"],
                             "resumed_from_epoch": result["resumed_from_epoch"],
                             "train_minutes": round(result["seconds"] / 60, 3)})
        return [split_path, out / HISTORY, out / VALIDATION_METRICS, out / "reliability.png",
                out / VALIDATION_PREDICTIONS, model_dir / "model.pt", model_dir / "model.json"]

    return execute_stage(STAGE, out, config=config, inputs=inputs, work=work, force=force, extra_hash=call)
