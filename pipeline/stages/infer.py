"""The infer stage: a model or fold ensemble over NIfTI images or an ingest output, labels on each input's grid."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.batch import Loaded, run_batch
from pipeline.config import InferConfig, PipelineConfig
from pipeline.errors import CheckpointError, StageError
from pipeline.fileio import sha256_bytes, write_json_atomic
from pipeline.inference import PREDICTOR_IMPORTS
from pipeline.inference.folder_inputs import folder_images, image_inputs, no_images
from pipeline.inference.model_files import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    ModelFiles,
    common_flip_axes,
    is_classification_model,
    read_model_files,
    read_model_json,
    resolve_model_dirs,
)
from pipeline.inference.postprocess import VALIDATION_JSON, postprocess_plan
from pipeline.io.channels import channel_count
from pipeline.io.nifti import is_nifti, nifti_stem, save_nifti
from pipeline.layout import PREDICTIONS_DIR, PREDICTIONS_JSON, PROBABILITIES_DIR
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.sharding import shard_out, study_selector
from pipeline.stages.common import execute_stage

if TYPE_CHECKING:
    from pipeline.inference.predictor import Predictor

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class InferItem:
    """One image to segment: its id, where it is, how it is named in outputs."""

    id: str
    path: Path
    image: str  # relative to the input folder (or the ingest folder)
    name: str  # output file name, "<name>.nii.gz"
    error: str | None = None  # why it is refused unread, with ``code``
    code: str | None = None
    channel_paths: tuple[Path, ...] | None = None  # a case of one file per channel (nnU-Net v2), in order

    @property
    def prediction(self) -> str:
        return f"{PREDICTIONS_DIR}/{self.name}"

    @property
    def probabilities(self) -> str:
        return f"{PROBABILITIES_DIR}/{self.name}"


def _folder_items(folder: Path, exclude: Path, channels: int) -> list[InferItem]:
    """Every NIfTI under ``folder`` (:func:`folder_images`), named after its file (or its case)."""
    return [InferItem(id=image.id, path=image.path, image=image.rel, name=f"{image.id}.nii.gz",
                      error=image.error[1] if image.error else None, code=image.error[0] if image.error else None,
                      channel_paths=image.channel_paths)
            for image in folder_images(folder, exclude=exclude, channels=channels)]


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


def collect_items(input: Path, out: Path, *, studies: list[str] | None = None,
                  channels: int = 1) -> tuple[str, list[InferItem]]:
    """``("manifest"|"folder"|"file", items)`` for an ingest folder, a folder of NIfTIs or one NIfTI file. With
    several ``channels`` (the model's), a folder's one-file-per-channel cases (nnU-Net v2) are an item each."""
    input = Path(input)
    if input.is_dir() and (input / MANIFEST_NAME).is_file():
        return "manifest", _manifest_items(input, studies)[0]
    if studies is not None:
        raise StageError(f"{input}: --studies needs an ingest folder holding {MANIFEST_NAME}", code="bad_arguments")
    if input.is_file() and is_nifti(input):
        return "file", [InferItem(id=nifti_stem(input), path=input, image=input.name,
                                  name=f"{nifti_stem(input)}.nii.gz")]
    items = _folder_items(input, out, channels) if input.is_dir() else []
    if not items:
        raise no_images(input, exclude=out)
    return "folder", items


@dataclass(frozen=True)
class PredictRecipe(Loaded[InferItem, str]):
    """What a worker process or Ray actor needs to load the model(s) once and predict studies into ``out``."""

    model_dir: Path
    settings: InferConfig
    weights_sha256: tuple[str, ...]  # a retrained model at the same path is a different recipe
    out: Path
    threads: int | None = None
    postprocess: tuple[int, ...] = ()
    imports: ClassVar[tuple[str, ...]] = PREDICTOR_IMPORTS

    def load(self) -> Any:
        import torch

        from pipeline.inference.predictor import Predictor

        if self.threads:
            torch.set_num_threads(self.threads)
        predictor, _ = Predictor.from_models(self.model_dir, config=self.settings, postprocess=self.postprocess)
        return functools.partial(predict_item, predictor, out=self.out,
                                 probabilities=self.settings.save_probabilities)


def predict_item(predictor: Predictor, item: InferItem, *, out: Path, probabilities: bool) -> str:
    """Predict one input; write its labels (and probability map) into ``out``; return the labels' path."""
    from pipeline.inference.predictor import save_probability_map

    prediction = predictor.predict(predictor.load(item.channel_paths or item.path), probabilities=probabilities)
    save_nifti(prediction.labels, out / item.prediction, dtype=np.uint8)
    if prediction.probabilities is not None:
        save_probability_map(prediction.probabilities, out / item.probabilities)
    return item.prediction


def _worker_threads(config: PipelineConfig) -> int | None:
    """Torch threads per worker: the cores shared out, so that workers do not oversubscribe them
    (``execution.threads_per_worker``, or the batch loop's rule)."""
    from pipeline.batch import worker_threads

    return worker_threads(config.execution, workers=config.execution.workers)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in keep:
            log.info("infer: removing stale file %s/%s", folder.name, path.name)
            path.unlink()


def _member_name(folder: Path, many: bool) -> str:
    return f"{folder.parent.name}/" if many else ""


def model_inputs(folders: list[Path], *, postprocess: str) -> tuple[dict[str, Path], list[Path], list[str]]:
    """The model files an infer run depends on, and the validation.json files (present, missing) for ``auto``."""
    many = len(folders) > 1
    inputs: dict[str, Path] = {}
    validation, missing = [], []
    for folder in folders:
        for name in (MODEL_JSON, MODEL_WEIGHTS):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name} is missing; retrain or restore the model folder",
                                      code="model_missing")
            inputs[_member_name(folder, many) + name] = folder / name
        path = folder.parent / VALIDATION_JSON
        if postprocess == "auto":
            if path.is_file():
                validation.append(path)
                inputs[f"{_member_name(folder, True)}{VALIDATION_JSON}"] = path
            else:
                missing.append(folder.parent.name)
    return inputs, validation, missing


def infer(
    model_dir: Path,
    input: Path,
    out: Path,
    *,
    config: PipelineConfig | None = None,
    force: bool = False,
    studies: list[str] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input`` with the model(s) in ``model_dir``; write out/predictions/, predictions.json.

    ``model_dir`` is a model folder, a train folder, or a cross-validation train folder whose
    ``fold_k/model`` folders are ensembled (``infer.folds`` picks them). The models are loaded
    once for the whole batch. Each prediction is a uint8 label image with exactly its input's
    shape and affine, postprocessed per ``infer.postprocess``; with ``infer.save_probabilities``
    the class probabilities go to ``out/probabilities/`` (see pipeline.inference.predictor).
    A study that fails is recorded and the batch goes on.
    """
    config = config or PipelineConfig()
    if is_classification_model(model_dir):
        from pipeline.classification.inference import infer_classifier  # torch: only for classifiers

        return infer_classifier(Path(model_dir), Path(input), Path(out), config=config, force=force, studies=studies)
    out = Path(out)
    settings = config.infer
    folders = resolve_model_dirs(model_dir, folds=settings.folds)
    model_files, validation_files, missing = model_inputs(folders, postprocess=settings.postprocess)
    channels = channel_count(read_model_json(folders[0])["plans"])  # a folder of cases: grouped by channel
    kind, items = collect_items(Path(input), out, studies=studies, channels=channels)
    inputs: dict[str, Path] = dict(model_files)
    if kind == "manifest":
        inputs["manifest"] = Path(input) / MANIFEST_NAME
    else:
        inputs.update(image_inputs((item.image, item.path, item.channel_paths) for item in items))
    out = shard_out(out, config)
    owns = study_selector(config)
    items = [item for item in items if owns(item.id)]  # every item when unsharded; inputs stay the whole set
    extra = {"input_kind": kind, "studies": sorted(studies) if studies is not None else None}

    def work(record: StageRecord) -> list[Path]:
        models = read_model_files(model_dir, folds=settings.folds)  # model.json and checked weights: no torch yet
        plan = postprocess_plan(settings.postprocess, num_classes=models[0].num_classes,
                                validation_files=validation_files, missing=missing)
        flip_axes = common_flip_axes(models)
        model_info = _model_info(models, flip_axes, tta=settings.tta)
        record.extra.update({"model": model_info, "postprocess": plan})
        runnable = [item for item in items if item.error is None]
        execution = config.execution
        if execution.backend == "ray" or execution.workers > 1:  # each worker process / actor loads the model once;
            fn: Any = PredictRecipe(Path(model_dir), settings, tuple(m.sha256 for m in models), out,  # this process
                                    _worker_threads(config), tuple(plan["classes"]))  # never imports torch
            record.device = {"type": settings.device, "on": "Ray actors" if execution.backend == "ray" else
                             f"{execution.workers} local worker processes"}
        else:
            fn = _in_process_predictor(model_dir, settings, flip_axes, plan["classes"], out, record)
        outcomes = {o.key: o for o in run_batch(runnable, fn, key=lambda it: it.id, desc="infer",
                                                workers=execution.workers, execution=execution)}
        predictions, failed = [], []
        for item in items:
            outcome = outcomes.get(item.id)
            if item.error is None and outcome is not None and outcome.ok:
                entry = {"id": item.id, "image": item.image, "prediction": item.prediction}
                if settings.save_probabilities:
                    entry["probabilities"] = item.probabilities
                predictions.append(entry)
                record.add(StudyStatus(id=item.id, status="ok"))
                continue
            code = item.code if item.error else (outcome.code if outcome else "not_run")
            message = item.error or (outcome.message if outcome else "not run")
            log.warning("infer: %s failed: %s", item.id, message)
            failed.append({"id": item.id, "image": item.image, "code": code, "message": message})
            record.add(StudyStatus(id=item.id, status="failed", code=code, message=message))
        _remove_stale(out / PREDICTIONS_DIR, {Path(p["prediction"]).name for p in predictions})
        _remove_stale(out / PROBABILITIES_DIR, {Path(p["probabilities"]).name for p in predictions
                                                if "probabilities" in p})
        write_json_atomic(out / PREDICTIONS_JSON, {
            "schema_version": SCHEMA_VERSION,
            "input_kind": kind,
            "model": model_info,
            "postprocess": plan,
            "predictions": predictions,
            "failed": failed,
        })
        files = [out / PREDICTIONS_JSON, *(out / p["prediction"] for p in predictions)]
        return files + [out / p["probabilities"] for p in predictions if "probabilities" in p]

    return execute_stage("infer", out, config=config, inputs=inputs, work=work, force=force, extra_hash=extra)


def _in_process_predictor(model_dir: Path, settings: InferConfig, flip_axes: tuple[int, ...],
                          postprocess: list[int], out: Path, record: StageRecord) -> Any:
    """predict_item bound to a Predictor of the model(s) loaded here, for a batch run in this process."""
    from pipeline.inference.model_loading import load_models
    from pipeline.inference.predictor import Predictor
    from pipeline.runtime import device_description

    bundles = load_models(model_dir, folds=settings.folds)
    predictor = Predictor([b.network for b in bundles], bundles[0].plans, config=settings, flip_axes=flip_axes,
                          postprocess=postprocess)
    record.device = device_description(predictor.device.type)
    return functools.partial(predict_item, predictor, out=out, probabilities=settings.save_probabilities)


def _model_info(models: list[ModelFiles], flip_axes: tuple[int, ...], *, tta: bool) -> dict[str, Any]:
    """predictions.json's "model": the member models, their checksums, and the TTA actually used."""
    members = [{"fold": m.fold, "sha256": m.sha256, "config_hash": m.meta.get("config_hash")} for m in models]
    single = len(models) == 1
    ensemble_sha = sha256_bytes("\n".join(m.sha256 for m in models).encode())
    return {
        "config_hash": models[0].meta.get("config_hash") if single else None,
        "sha256": models[0].sha256 if single else ensemble_sha,
        "labels": models[0].labels,
        "num_classes": models[0].num_classes,
        "folds": [m.fold for m in models],
        "members": members,
        "tta_flip_axes": list(flip_axes) if tta else [],
        # each model, unmirrored and mirrored over every non-empty subset of the axes (ensemble.mirror_dims)
        "forward_passes_per_window": len(models) * (2 ** len(flip_axes) if tta else 1),
    }
