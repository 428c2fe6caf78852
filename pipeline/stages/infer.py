"""The infer stage: one trained model over a folder of NIfTI images or an ingest output, labels on each input's grid."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import os

from pipeline.batch import Loaded, run_batch
from pipeline.config import InferConfig, PipelineConfig
from pipeline.errors import CheckpointError, StageError
from pipeline.fileio import sha256_file, write_json_atomic
from pipeline.inference.predictor import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    PREDICTIONS_DIR,
    PREDICTIONS_JSON,
    Predictor,
    resolve_model_dir,
)
from pipeline.io.nifti import is_nifti, nifti_stem, save_nifti
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import device_description
from pipeline.sharding import shard_out, study_selector
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class InferItem:
    """One image to segment: its id, where it is, how it is named in outputs."""

    id: str
    path: Path
    image: str  # relative to the input folder (or the ingest folder)
    name: str  # output file name, "<name>.nii.gz"
    error: str | None = None

    @property
    def prediction(self) -> str:
        return f"{PREDICTIONS_DIR}/{self.name}"


def _folder_items(folder: Path, exclude: Path) -> list[InferItem]:
    """Every NIfTI under ``folder`` (any depth, hidden files skipped), named after its file."""
    exclude = exclude.resolve()
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and is_nifti(p) and exclude not in p.resolve().parents
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    by_name: dict[str, list[Path]] = {}
    for path in files:
        by_name.setdefault(f"{nifti_stem(path)}.nii.gz", []).append(path)
    items = []
    for path in files:
        name = f"{nifti_stem(path)}.nii.gz"
        rel = path.relative_to(folder).as_posix()
        clash = None
        if len(by_name[name]) > 1:
            others = ", ".join(p.relative_to(folder).as_posix() for p in by_name[name] if p != path)
            clash = f"{rel}: its prediction would be named {name} like {others}; rename one of the inputs"
        items.append(InferItem(id=rel if clash else nifti_stem(path), path=path, image=rel, name=name, error=clash))
    return items


def _manifest_items(folder: Path, studies: list[str] | None) -> tuple[list[InferItem], dict[str, str] | None]:
    manifest = load_manifest(folder)
    ok = [s for s in manifest.ok_studies() if s.image]
    if studies is not None:
        known = {s.id for s in ok}
        unknown = sorted(set(studies) - known)
        if unknown:
            raise StageError(f"{folder / MANIFEST_NAME}: no ok study with id(s) {', '.join(unknown)}; "
                             "check the ids in the manifest", code="unknown_study")
        wanted = set(studies)
        ok = [s for s in ok if s.id in wanted]
    items = [InferItem(id=s.id, path=folder / str(s.image), image=str(s.image), name=f"{s.id}.nii.gz")
             for s in sorted(ok, key=lambda s: s.id)]
    return items, manifest.labels


def collect_items(input: Path, out: Path, *, studies: list[str] | None = None) -> tuple[str, list[InferItem]]:
    """``("manifest"|"folder"|"file", items)`` for an ingest folder, a folder of NIfTIs or one NIfTI file."""
    input = Path(input)
    if input.is_dir() and (input / MANIFEST_NAME).is_file():
        return "manifest", _manifest_items(input, studies)[0]
    if studies is not None:
        raise StageError(f"{input}: --studies needs an ingest folder holding {MANIFEST_NAME}", code="bad_arguments")
    if input.is_file() and is_nifti(input):
        return "file", [InferItem(id=nifti_stem(input), path=input, image=input.name,
                                  name=f"{nifti_stem(input)}.nii.gz")]
    if not input.is_dir():
        raise StageError(f"{input}: not a folder of NIfTI images, an ingest folder or a NIfTI file",
                         code="input_missing")
    items = _folder_items(input, out)
    if not items:
        raise StageError(f"{input}: no NIfTI images (.nii/.nii.gz) found", code="no_inputs")
    return "folder", items


@dataclass(frozen=True)
class PredictRecipe(Loaded[InferItem, str]):
    """What a worker process or Ray actor needs to load the model once and predict studies into ``out``."""

    model_dir: Path
    settings: InferConfig
    weights_sha256: str  # a retrained model at the same path is a different recipe
    out: Path
    threads: int | None = None

    def load(self) -> Any:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        predictor, _ = Predictor.from_folder(self.model_dir, config=self.settings)

        def predict_one(item: InferItem) -> str:
            save_nifti(predictor.predict_file(item.path), self.out / item.prediction, dtype=np.uint8)
            return item.prediction

        return predict_one


def _worker_threads(config: PipelineConfig) -> int | None:
    """Torch threads per worker: the cores shared out, so that workers do not oversubscribe them."""
    if config.execution.backend == "ray":
        return max(1, int(config.execution.num_cpus_per_task))
    if config.execution.workers > 1:
        return max(1, (os.cpu_count() or 1) // config.execution.workers)
    return None


def _remove_stale(pred_dir: Path, keep: set[str]) -> None:
    if not pred_dir.is_dir():
        return
    for path in sorted(pred_dir.iterdir()):
        if path.is_file() and path.name not in keep:
            log.info("infer: removing stale prediction %s", path.name)
            path.unlink()


def infer(
    model_dir: Path,
    input: Path,
    out: Path,
    *,
    config: PipelineConfig | None = None,
    force: bool = False,
    studies: list[str] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input`` with the model in ``model_dir``; write ``out/predictions/`` and predictions.json.

    The model is loaded once for the whole batch. Each prediction is a uint8 label image with
    exactly its input's shape and affine. A study that fails is recorded and the batch goes on.
    """
    config = config or PipelineConfig()
    from pipeline.classification.inference import infer_classifier, is_classification_model

    if is_classification_model(model_dir):
        return infer_classifier(Path(model_dir), Path(input), Path(out), config=config, force=force)
    out = Path(out)
    folder = resolve_model_dir(model_dir)
    for name in (MODEL_JSON, MODEL_WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing; retrain or restore the model folder",
                                  code="model_missing")
    kind, items = collect_items(Path(input), out, studies=studies)
    inputs: dict[str, Path] = {"model.json": folder / MODEL_JSON, "model.pt": folder / MODEL_WEIGHTS}
    if kind == "manifest":
        inputs["manifest"] = Path(input) / MANIFEST_NAME
    else:
        inputs.update({f"image:{item.image}": item.path for item in items})
    out = shard_out(out, config)
    owns = study_selector(config)
    items = [item for item in items if owns(item.id)]  # every item when unsharded; inputs stay the whole set
    extra = {"input_kind": kind, "studies": sorted(studies) if studies is not None else None}

    def work(record: StageRecord) -> list[Path]:
        predictor, bundle = Predictor.from_folder(folder, config=config.infer)
        record.device = device_description(predictor.device.type)
        model_info = {"config_hash": bundle.meta.get("config_hash"), "sha256": bundle.sha256,
                      "labels": bundle.labels, "num_classes": bundle.num_classes}
        record.extra["model"] = model_info
        pred_dir = out / PREDICTIONS_DIR
        runnable = [item for item in items if item.error is None]

        def predict_one(item: InferItem) -> str:
            labels = predictor.predict_file(item.path)
            save_nifti(labels, out / item.prediction, dtype=np.uint8)
            return item.prediction

        execution = config.execution
        fn: Any = predict_one
        if execution.backend == "ray" or execution.workers > 1:  # each worker process / actor loads the model once
            fn = PredictRecipe(folder, config.infer, sha256_file(folder / MODEL_WEIGHTS), out, _worker_threads(config))
        outcomes = {o.key: o for o in run_batch(runnable, fn, key=lambda it: it.id, desc="infer",
                                                workers=execution.workers, execution=execution)}
        predictions, failed = [], []
        for item in items:
            outcome = outcomes.get(item.id)
            if item.error is None and outcome is not None and outcome.ok:
                predictions.append({"id": item.id, "image": item.image, "prediction": item.prediction})
                record.add(StudyStatus(id=item.id, status="ok"))
                continue
            code = "duplicate_name" if item.error else (outcome.code if outcome else "not_run")
            message = item.error or (outcome.message if outcome else "not run")
            log.warning("infer: %s failed: %s", item.id, message)
            failed.append({"id": item.id, "image": item.image, "code": code, "message": message})
            record.add(StudyStatus(id=item.id, status="failed", code=code, message=message))
        _remove_stale(pred_dir, {Path(p["prediction"]).name for p in predictions})
        write_json_atomic(out / PREDICTIONS_JSON, {
            "schema_version": SCHEMA_VERSION,
            "input_kind": kind,
            "model": model_info,
            "predictions": predictions,
            "failed": failed,
        })
        return [out / PREDICTIONS_JSON, *(out / p["prediction"] for p in predictions)]

    return execute_stage("infer", out, config=config, inputs=inputs, work=work, force=force, extra_hash=extra)

