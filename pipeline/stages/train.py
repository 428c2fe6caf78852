"""The train stage: one split or cross-validation folds of the preprocessed studies, trained (resumable), validated.

``train.fold: null`` trains one split into OUT (split.json, checkpoints/, history.csv,
model/, validation.json). ``train.fold: k`` trains fold k into OUT/fold_k with the same files
and its own record.json. ``train.fold: all`` trains every fold in turn, each as its own
up-to-date-checked stage (a finished fold is skipped on a rerun), then writes OUT/cv.json: the
validation Dice of every fold (with and without largest-component postprocessing), their
means, and the postprocessing that inference's ``auto`` would choose.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import NetworkConfig, PipelineConfig, config_dict, config_hash, stage_config
from pipeline.errors import ConfigError, StageError
from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.inference.postprocess import VALIDATION_JSON, decide_postprocessing, mean_over, read_validation
from pipeline.io.channels import channel_count, channel_names
from pipeline.manifest import load_manifest
from pipeline.provenance import RECORD_NAME, StageRecord, StudyStatus, hash_inputs, is_up_to_date
from pipeline.runtime import device_description, resolve_device, seed_everything, set_threads
from pipeline.stages.common import execute_stage
from pipeline.training import distributed as ddp
from pipeline.training.checkpoints import LAST, PREVIOUS, load_latest, load_weights, save_weights
from pipeline.training.data import read_preprocessed, study_items
from pipeline.training.loop import BEST_WEIGHTS, run_training
from pipeline.training.split import resolve_folds, resolve_split, write_split
from pipeline.training.validation import validate_model

log = logging.getLogger(__name__)

STAGE = "train"
MODEL_DIR = "model"
CV_JSON = "cv.json"
MODEL_SCHEMA_VERSION = 1
# settings that may change between a run and its resumption without invalidating the checkpoint
_RUNTIME_ONLY = ("epochs", "max_minutes", "val_every", "num_workers", "device", "amp", "threads", "tensorboard",
                 "channels_last", "compile")


def resume_key(config: PipelineConfig, plans: dict[str, Any], split: dict[str, Any], data: Any) -> str:
    """Hash of everything a checkpoint's weights depend on (not the epoch count or runtime settings)."""
    full = config_dict(config)
    train = {k: v for k, v in full["train"].items() if k not in _RUNTIME_ONLY}
    return config_hash({"seed": full["seed"], "train": train, "preprocess": full["preprocess"], "plans": plans,
                        "split": split, "data": data})


def _data_digest(preprocess_dir: Path, entries: list[dict[str, str]]) -> Any:
    """The preprocess record's output checksums (or the dataset entries when there is no record)."""
    record_path = preprocess_dir / RECORD_NAME
    if record_path.is_file():
        try:
            record = read_json(record_path)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("outputs"), dict):
            return {k: v for k, v in record["outputs"].items() if k != "config.yaml"}
    return entries


def flip_axes(config: PipelineConfig) -> list[int]:
    """The axes mirrored in training (mirroring TTA uses them); [] when mirroring is off."""
    aug = config.preprocess.augmentation
    return [int(a) for a in aug.flip_axes] if aug.enabled and aug.flip_prob > 0 else []


def model_metadata(config: PipelineConfig, plans: dict[str, Any], *, fold: int | None = None) -> dict[str, Any]:
    """model/model.json: everything inference needs to rebuild the network and its preprocessing."""
    network: NetworkConfig = config.train.network
    return {
        "schema_version": MODEL_SCHEMA_VERSION,
        "task": "segmentation",
        "network": network.model_dump(mode="json"),
        "in_channels": channel_count(plans),
        "channels": channel_names(plans),
        "out_channels": int(plans["num_classes"]),
        "plans": plans,
        "labels": plans.get("labels", {}),
        "patch_size": [int(v) for v in plans["patch_size"]],
        "flip_axes": flip_axes(config),
        "fold": fold,
        "config_hash": config_hash(config),
        "seed": config.seed,
    }


def resolve_plans(config: PipelineConfig, plans: dict[str, Any]) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config with ``train.batch_size`` resolved (config, else plans) and the plans with the patch size used."""
    if config.preprocess.patch_size is not None:
        patch = [int(v) for v in config.preprocess.patch_size]
        if list(plans["patch_size"]) != patch:
            log.info("train: patch size %s from the config replaces %s of plans.json", patch, plans["patch_size"])
            plans = {**plans, "patch_size": patch}
    batch = config.train.batch_size or plans.get("batch_size")
    if not batch:
        raise StageError("plans.json has no batch_size and train.batch_size is not set; rerun preprocess with "
                         "this version or set train.batch_size", code="plans_incomplete")
    if config.train.batch_size is None:
        config = config.model_copy(update={"train": config.train.model_copy(update={"batch_size": int(batch)})})
    return config, plans


def _with_fold(config: PipelineConfig, fold: int) -> PipelineConfig:
    return config.model_copy(update={"train": config.train.model_copy(update={"fold": fold})})


def _inputs(preprocess_dir: Path, config: PipelineConfig) -> dict[str, Path]:
    inputs = {"plans": preprocess_dir / "plans.json", "dataset": preprocess_dir / "dataset.json",
              "preprocess_record": preprocess_dir / RECORD_NAME}
    if config.data.split_file is not None:
        inputs["split_file"] = Path(config.data.split_file)
    return inputs


def _fold_split(config: PipelineConfig, entries: list[dict[str, str]], fold: int) -> dict[str, Any]:
    folds = resolve_folds(entries, split_file=config.data.split_file, num_folds=config.train.num_folds,
                          seed=config.seed)
    if fold >= len(folds):
        where = config.data.split_file or f"train.num_folds {config.train.num_folds}"
        raise ConfigError(f"fold {fold} does not exist: {where} gives {len(folds)} folds (0..{len(folds) - 1})")
    return folds[fold]


def _agreed_skip(out: Path, *, config: PipelineConfig, inputs: dict[str, Path], force: bool) -> bool:
    """Under torchrun: whether rank 0 finds ``out`` up to date (every rank gets rank 0's answer); else False.

    Rank 0 decides with the same check as execute_stage, so the other ranks skip exactly the
    folds that rank 0 skips and join the same collective calls."""
    if ddp.torchrun_env() is None:
        return False
    fresh = False
    if ddp.is_main_process() and not force:
        fresh, _ = is_up_to_date(out, config_hash=config_hash(stage_config(config, STAGE)),
                                 inputs=hash_inputs(inputs))
    return bool(ddp.from_main_process(fresh, device=resolve_device(config.train.device)))


def _prepare(preprocess_dir: Path, *, config: PipelineConfig,
             fold: int | None) -> tuple[PipelineConfig, dict[str, Any], list[dict[str, str]], dict[str, Any]]:
    """(config with the batch size resolved, plans, dataset entries, split) of one training run."""
    plans, entries = read_preprocessed(preprocess_dir)
    run_config, plans = resolve_plans(config, plans)
    if fold is None:
        split = resolve_split(entries, split_file=config.data.split_file, val_fraction=config.train.val_fraction,
                              seed=config.seed)
    else:
        split = _fold_split(config, entries, fold)
    return run_config, plans, entries, split


def _follow_split(preprocess_dir: Path, out: Path, *, config: PipelineConfig, fold: int | None) -> dict[str, Any]:
    """A rank other than 0: train alongside rank 0 (same plans, split and items) and write nothing.

    The loop broadcasts rank 0's checkpoint, validates and writes on rank 0 only."""
    run_config, plans, entries, split = _prepare(preprocess_dir, config=config, fold=fold)
    device = resolve_device(config.train.device)
    set_threads(config.train.threads)
    seed_everything(config.seed)
    result = run_training(config=run_config, plans=plans, out=out, device=device,
                          train_items=study_items(preprocess_dir, entries, split["train"]),
                          val_items=study_items(preprocess_dir, entries, split["validation"]))
    return {"status": "complete", "follower": True, "epochs_run": result.epochs_run,
            "world_size": result.world_size}


def _train_split(preprocess_dir: Path, out: Path, *, config: PipelineConfig, force: bool,
                 fold: int | None) -> dict[str, Any]:
    """Train one split (``fold`` None: the hold-out split; k: fold k) into ``out``, as its own stage record."""

    def work(record: StageRecord) -> list[Path]:
        run_config, plans, entries, split = _prepare(preprocess_dir, config=config, fold=fold)
        split_path = write_split(split, out)
        key = resume_key(config, plans, split, _data_digest(preprocess_dir, entries))

        checkpoints = out / "checkpoints"
        if force and checkpoints.exists():
            log.info("train: --force given; discarding checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints)
        latest = load_latest(checkpoints)
        resume = None
        if latest is not None:
            state, path = latest
            if state.get("resume_key") == key:
                resume = state
                log.info("train: resuming from %s (epoch %s)", path, state["epoch"])
            else:
                log.warning("train: %s was made with other settings or data; training starts from scratch", path)
                for name in (LAST, PREVIOUS, BEST_WEIGHTS):
                    (checkpoints / name).unlink(missing_ok=True)

        device = resolve_device(config.train.device)
        set_threads(config.train.threads)
        seed_everything(config.seed)
        record.device = device_description(device)
        train_items = study_items(preprocess_dir, entries, split["train"])
        val_items = study_items(preprocess_dir, entries, split["validation"])
        log.info("train%s: %d training and %d validation studies on %s", "" if fold is None else f" fold {fold}",
                 len(train_items), len(val_items), device)
        result = run_training(config=run_config, plans=plans, train_items=train_items, val_items=val_items, out=out,
                              device=device, resume=resume, resume_key=key)
        if not result.best_weights.is_file():
            raise StageError(f"training in {out} produced no model weights (no epoch finished); run it again")

        model_dir = out / MODEL_DIR
        save_weights(load_weights(result.best_weights), model_dir / "model.pt")
        write_json_atomic(model_dir / "model.json", {**model_metadata(config, plans, fold=fold),
                                                     "sha256": sha256_file(model_dir / "model.pt")})
        outputs = [split_path, out / "history.csv", model_dir / "model.pt", model_dir / "model.json"]
        validation: dict[str, Any] | None = None
        if val_items:
            outputs.append(validate_model(model_dir, val_items, out, config=config, device=device, fold=fold))
            validation = read_validation(out / VALIDATION_JSON)["mean"]
        for study_id in split["train"]:
            record.add(StudyStatus(id=study_id, status="ok", message="train"))
        for study_id in split["validation"]:
            record.add(StudyStatus(id=study_id, status="ok", message="validation"))
        labels = plans.get("labels", {})
        record.timings["train"] = result.train_seconds
        record.extra.update({
            "fold": fold,
            "batch_size": run_config.train.batch_size,
            "patch_size": list(plans["patch_size"]),
            "best_epoch": result.best_epoch,
            "best_mean_dice": result.best_metric,
            "val_dice": {labels.get(c, c): d for c, d in result.best_dice.items()},
            "validation": validation,
            "epochs_run": result.epochs_run,
            "stopped_by": result.stopped_by,
            "resumed_from_epoch": result.resumed_from_epoch,
            "train_minutes": round(result.train_seconds / 60, 3),
            "device_type": device,
            "world_size": result.world_size,
            "model_sha256": sha256_file(model_dir / "model.pt"),
        })
        return outputs

    if _agreed_skip(out, config=config, inputs=_inputs(preprocess_dir, config), force=force) \
            and not ddp.is_main_process():
        return {"status": "complete", "skipped": True}
    if not ddp.is_main_process():
        return _follow_split(preprocess_dir, out, config=config, fold=fold)
    return execute_stage(STAGE, out, config=config, inputs=_inputs(preprocess_dir, config), work=work, force=force)


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / f"fold_{fold}"


def cv_summary(out: Path, num_folds: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """cv.json: per-fold validation Dice (means over the fold's studies), the mean over folds, the pooled mean
    over every validation study, and the postprocessing ``auto`` would pick."""
    folds, rows, files = [], [], []
    for k in range(num_folds):
        path = fold_dir(out, k) / VALIDATION_JSON
        if not path.is_file():
            folds.append({"fold": k, "validation": None})
            continue
        data = read_validation(path)
        files.append(path)
        rows.extend(data["studies"])
        folds.append({"fold": k, "studies": len(data["studies"]), **data["mean"]})
    classes = sorted({c for row in rows for c in row.get("dice", {})}, key=int)
    done = [f for f in folds if "dice" in f]
    mean = {key: mean_over(done, key, classes) for key in ("dice", "dice_lcc")}
    pooled = {key: mean_over(rows, key, classes) for key in ("dice", "dice_lcc")}
    return {
        "schema_version": 1,
        "num_folds": num_folds,
        "labels": labels,
        "folds": folds,
        "mean_over_folds": mean,
        "pooled": {**pooled, "studies": len(rows)},
        "postprocess": decide_postprocessing(files) if files else None,
    }


def _train_all(preprocess_dir: Path, out: Path, *, config: PipelineConfig, force: bool) -> dict[str, Any]:
    def work(record: StageRecord) -> list[Path]:
        plans, entries = read_preprocessed(preprocess_dir)
        folds = resolve_folds(entries, split_file=config.data.split_file, num_folds=config.train.num_folds,
                              seed=config.seed)
        outputs: list[Path] = []
        per_fold = []
        for k, split in enumerate(folds):
            log.info("train: fold %d of %d", k, len(folds))
            sub = fold_dir(out, k)
            fold_record = _train_split(preprocess_dir, sub, config=_with_fold(config, k), force=force, fold=k)
            per_fold.append({"fold": k, "status": fold_record.get("status"),
                             "skipped": bool(fold_record.get("skipped")), "best_epoch": fold_record.get("best_epoch"),
                             "train_minutes": fold_record.get("train_minutes")})
            for study_id in split["validation"]:
                record.add(StudyStatus(id=study_id, status="ok", message=f"validation fold {k}"))
            outputs += [sub / RECORD_NAME, sub / MODEL_DIR / "model.pt", sub / MODEL_DIR / "model.json",
                        sub / VALIDATION_JSON]
        summary = cv_summary(out, len(folds), plans.get("labels"))
        write_json_atomic(out / CV_JSON, summary)
        record.extra.update({"fold": "all", "num_folds": len(folds), "folds": per_fold,
                             "cv_mean_over_folds": summary["mean_over_folds"], "cv_pooled": summary["pooled"]})
        return [out / CV_JSON, *outputs]

    if _agreed_skip(out, config=config, inputs=_inputs(preprocess_dir, config), force=force) \
            and not ddp.is_main_process():
        return {"status": "complete", "skipped": True}
    if not ddp.is_main_process():  # follow rank 0 through the folds; each fold agrees on skipping again
        _, entries = read_preprocessed(preprocess_dir)
        folds = resolve_folds(entries, split_file=config.data.split_file, num_folds=config.train.num_folds,
                              seed=config.seed)
        for k in range(len(folds)):
            _train_split(preprocess_dir, fold_dir(out, k), config=_with_fold(config, k), force=force, fold=k)
        return {"status": "complete", "follower": True}
    return execute_stage(STAGE, out, config=config, inputs=_inputs(preprocess_dir, config), work=work, force=force)


def train(preprocess_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False) -> dict:
    """Train on preprocess_dir into out (one split, fold k into out/fold_k, or every fold; see the module docstring).

    A killed run resumes from its checkpoints/last.pt when called again; ``force`` retrains
    from scratch (checkpoints are discarded).
    """
    config = config or PipelineConfig()
    preprocess_dir, out = Path(preprocess_dir), Path(out)
    if config.task == "classification":  # input: a labelled ingest/import folder (manifest with class_label)
        from pipeline.classification.trainer import train_classifier

        load_manifest(preprocess_dir)  # a wrong folder fails here, before anything is written into out
        return train_classifier(preprocess_dir, out, config=config, force=force)
    read_preprocessed(preprocess_dir)  # a wrong folder fails here too, before anything is written into out
    fold = config.train.fold
    if fold is None:
        return _train_split(preprocess_dir, out, config=config, force=force, fold=None)
    if fold == "all":
        return _train_all(preprocess_dir, out, config=config, force=force)
    return _train_split(preprocess_dir, fold_dir(out, int(fold)), config=config, force=force, fold=int(fold))
