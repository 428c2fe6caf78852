"""``medpipe run`` for ``task: classification``: which function runs each stage and on which studies."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, StageError
from pipeline.fileio import read_json
from pipeline.layout import RunLayout
from pipeline.manifest import load_manifest
from pipeline.training.split import SPLIT_NAME

log = logging.getLogger(__name__)

# preprocess is not used: the classifier resizes and normalises each volume when it loads it
STAGES: tuple[str, ...] = ("ingest", "train", "infer", "evaluate", "report")


def _validation(layout: RunLayout, config: PipelineConfig) -> list[str]:
    """The studies the trained model(s) did not train on: the validation split, or the folds' validation sets."""
    fold = config.classify.fold
    if fold is None:
        folders = [layout.train]
    elif fold == "all":
        meta = read_json(layout.model / "model.json")
        folders = [layout.train / f"fold_{k}" for k in meta.get("folds", [])]
    else:
        folders = [layout.train / f"fold_{fold}"]
    ids: set[str] = set()
    for folder in folders:
        if not (folder / SPLIT_NAME).is_file():
            raise StageError(f"{folder / SPLIT_NAME} is missing; run the train stage first", code="not_trained")
        ids |= {str(i) for i in read_json(folder / SPLIT_NAME).get("validation", [])}
    return sorted(ids)


def inference_studies(layout: RunLayout, config: PipelineConfig) -> list[str]:
    """What a classification run predicts: the studies held out for validation plus every unlabelled ok study."""
    manifest = load_manifest(layout.ingest)
    unlabelled = {s.id for s in manifest.ok_studies() if s.image and s.class_label is None}
    return sorted(set(_validation(layout, config)) | unlabelled)


def provenance_folders(layout: RunLayout) -> list[Path]:
    return [layout.stage_dir(s) for s in STAGES[:-1]]


def run_classification_stage(stage: str, config: PipelineConfig, layout: RunLayout, *,
                             force: bool = False) -> dict[str, Any]:
    """Run one stage of a classification run folder (ingest or MedMNIST import, train, infer, evaluate, report)."""
    if stage == "ingest":
        root = config.data.root
        if root is None:
            raise ConfigError("data.root is not set: give the scan folder (or a MedMNIST .npz file) in the config "
                              "or with --data PATH")
        from pipeline.classification.medmnist import import_medmnist_stage, is_medmnist_file

        if is_medmnist_file(root):
            return import_medmnist_stage(root, layout.ingest, config=config, force=force)
        from pipeline.stages.ingest import ingest

        return ingest(root, layout.ingest, config=config, force=force)
    if stage == "train":
        from pipeline.stages.train import train

        return train(layout.ingest, layout.train, config=config, force=force)
    if stage == "infer":
        from pipeline.classification.inference import infer_classifier

        return infer_classifier(layout.model, layout.ingest, layout.infer, config=config, force=force,
                                studies=inference_studies(layout, config),
                                out_of_fold=config.classify.fold is not None)
    if stage == "evaluate":
        from pipeline.stages.evaluate import evaluate

        return evaluate(layout.infer, layout.ingest, layout.evaluate, config=config, force=force)
    if stage == "report":
        from pipeline.stages.report import report

        return report(layout.evaluate, layout.report, predictions=layout.infer, ingest=layout.ingest, config=config,
                      force=force, provenance=provenance_folders(layout))
    if stage == "preprocess":
        raise ConfigError("classification has no preprocess stage (volumes are resized to classify.input_size "
                          "when loaded); run ingest, train, infer, evaluate, report")
    raise ConfigError(f"unknown stage '{stage}'; classification stages are {', '.join(STAGES)}")
