"""The train stage: split the preprocessed studies, train a 3D U-Net (resumable), write the best model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import NetworkConfig, PipelineConfig, config_dict, config_hash
from pipeline.errors import StageError
from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import device_description, resolve_device, seed_everything, set_threads
from pipeline.stages.common import execute_stage
from pipeline.training.checkpoints import LAST, PREVIOUS, load_latest, load_weights, save_weights
from pipeline.training.data import read_preprocessed, study_items
from pipeline.training.loop import BEST_WEIGHTS, run_training
from pipeline.training.split import make_split, read_split, write_split

log = logging.getLogger(__name__)

STAGE = "train"
MODEL_DIR = "model"
MODEL_SCHEMA_VERSION = 1
# settings that may change between a run and its resumption without invalidating the checkpoint
_RUNTIME_ONLY = ("epochs", "max_minutes", "val_every", "num_workers", "device", "amp", "threads")


def resume_key(config: PipelineConfig, plans: dict[str, Any], split: dict[str, Any], data: Any) -> str:
    """Hash of everything a checkpoint's weights depend on (not the epoch count or runtime settings)."""
    full = config_dict(config)
    train = {k: v for k, v in full["train"].items() if k not in _RUNTIME_ONLY}
    return config_hash({"seed": full["seed"], "train": train, "preprocess": full["preprocess"], "plans": plans,
                        "split": split, "data": data})


def _data_digest(preprocess_dir: Path, entries: list[dict[str, str]]) -> Any:
    """The preprocess record's output checksums (or the dataset entries when there is no record)."""
    record_path = preprocess_dir / "record.json"
    if record_path.is_file():
        try:
            record = read_json(record_path)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("outputs"), dict):
            return {k: v for k, v in record["outputs"].items() if k != "config.yaml"}
    return entries


def model_metadata(config: PipelineConfig, plans: dict[str, Any]) -> dict[str, Any]:
    """model/model.json: everything inference needs to rebuild the network and its preprocessing."""
    network: NetworkConfig = config.train.network
    return {
        "schema_version": MODEL_SCHEMA_VERSION,
        "task": "segmentation",
        "network": network.model_dump(mode="json"),
        "in_channels": 1,
        "out_channels": int(plans["num_classes"]),
        "plans": plans,
        "labels": plans.get("labels", {}),
        "patch_size": [int(v) for v in plans["patch_size"]],
        "config_hash": config_hash(config),
        "seed": config.seed,
    }


def train(preprocess_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False) -> dict:
    """Train on preprocess_dir into out; a killed run resumes from checkpoints/last.pt when called again.

    ``force`` retrains from scratch (checkpoints are discarded).
    """
    config = config or PipelineConfig()
    if config.task == "classification":  # input: a labelled ingest/import folder (manifest with class_label)
        from pipeline.classification.trainer import train_classifier

        return train_classifier(Path(preprocess_dir), Path(out), config=config, force=force)
    preprocess_dir, out = Path(preprocess_dir), Path(out)
    inputs = {"plans": preprocess_dir / "plans.json", "dataset": preprocess_dir / "dataset.json",
              "preprocess_record": preprocess_dir / "record.json"}
    if config.data.split_file is not None:
        inputs["split_file"] = Path(config.data.split_file)

    def work(record: StageRecord) -> list[Path]:
        plans, entries = read_preprocessed(preprocess_dir)
        patch_size = [int(v) for v in config.preprocess.patch_size]
        if plans["patch_size"] != patch_size:
            log.info("train: patch size %s from the config replaces %s of plans.json", patch_size,
                     plans["patch_size"])
            plans = {**plans, "patch_size": patch_size}
        ids = [e["id"] for e in entries]
        if config.data.split_file is not None:
            split = read_split(config.data.split_file, ids)
        else:
            split = make_split(ids, val_fraction=config.train.val_fraction, seed=config.seed)
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
        log.info("train: %d training and %d validation studies on %s", len(train_items), len(val_items), device)
        result = run_training(config=config, plans=plans, train_items=train_items, val_items=val_items, out=out,
                              device=device, resume=resume, resume_key=key)
        if not result.best_weights.is_file():
            raise StageError(f"training in {out} produced no model weights (no epoch finished); run it again")

        model_dir = out / MODEL_DIR
        save_weights(load_weights(result.best_weights), model_dir / "model.pt")
        write_json_atomic(model_dir / "model.json", {**model_metadata(config, plans),
                                                     "sha256": sha256_file(model_dir / "model.pt")})
        for study_id in split["train"]:
            record.add(StudyStatus(id=study_id, status="ok", message="train"))
        for study_id in split["validation"]:
            record.add(StudyStatus(id=study_id, status="ok", message="validation"))
        labels = plans.get("labels", {})
        record.timings["train"] = result.train_seconds
        record.extra.update({
            "best_epoch": result.best_epoch,
            "best_mean_dice": result.best_metric,
            "val_dice": {labels.get(c, c): d for c, d in result.best_dice.items()},
            "epochs_run": result.epochs_run,
            "stopped_by": result.stopped_by,
            "resumed_from_epoch": result.resumed_from_epoch,
            "train_minutes": round(result.train_seconds / 60, 3),
            "device_type": device,
            "model_sha256": sha256_file(model_dir / "model.pt"),
        })
        return [split_path, out / "history.csv", model_dir / "model.pt", model_dir / "model.json"]

    return execute_stage(STAGE, out, config=config, inputs=inputs, work=work, force=force)
