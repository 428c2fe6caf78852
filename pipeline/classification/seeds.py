"""Seed ensembles: ``classify.seeds`` models trained on one split (seeds seed, seed + 1, ...) and their average.

Each member is its own stage folder OUT/seed_S (skipped when up to date, resumed from its
checkpoint when stopped), so raising ``seeds`` reuses the members already trained. OUT/split.json
is the shared split, OUT/model/model.json names the members (``medpipe infer`` averages their
calibrated probabilities) and OUT/validation_metrics.json scores that average on the validation
studies, as one model's validation_metrics.json does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classification.calibration import Calibration
from pipeline.classification.cv import (
    CV_JSON,
    MODEL_DIR,
    VALIDATION_METRICS,
    VALIDATION_PREDICTIONS,
    TrainOne,
    choose_split,
    ensemble_inputs,
    ensemble_json,
    labelled_studies,
    metric_options,
    read_validation_predictions,
    summary_metrics,
)
from pipeline.classification.metrics import probability_metrics, reliability_diagram, softmax
from pipeline.config import PipelineConfig, config_dict
from pipeline.errors import StageError
from pipeline.fileio import read_json, write_json_atomic
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage
from pipeline.training.split import write_split

log = logging.getLogger(__name__)


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def shared_split(input_dir: Path, config: PipelineConfig) -> dict[str, Any]:
    """The one split every member trains on, chosen as a single model's would be (with the base seed)."""
    ids, labels = labelled_studies(input_dir, config)
    return choose_split(config, Path(input_dir), ids, labels)


def ensemble_validation(out: Path, seeds: list[int], *, config: PipelineConfig) -> dict[str, Any]:
    """Validation metrics of the members' averaged probabilities: ``calibrated`` averages each member's
    calibrated probabilities (as ``medpipe infer`` does), ``uncalibrated`` their softmax; ``members``
    holds each member's own figures."""
    options = metric_options(config)
    runs = [read_validation_predictions(seed_dir(out, seed) / VALIDATION_PREDICTIONS) for seed in seeds]
    ids0, labels0, _ = runs[0]
    calibrated, raw, members = [], [], []
    for seed, (ids, _, logits) in zip(seeds, runs, strict=True):
        folder = seed_dir(out, seed)
        if ids != ids0:
            raise StageError(f"{folder / VALIDATION_PREDICTIONS} lists other validation studies than "
                             f"{seed_dir(out, seeds[0]) / VALIDATION_PREDICTIONS}; train again with --force",
                             code="fold_incomplete")
        model_json = folder / MODEL_DIR / "model.json"
        calibration = Calibration.from_json(read_json(model_json), where=str(model_json), num_classes=logits.shape[1])
        calibrated.append(calibration.probabilities(logits))
        raw.append(softmax(logits))
        own = read_json(folder / VALIDATION_METRICS)["calibrated"]  # written by the member's training
        members.append({"seed": seed, **calibration.as_json(), **summary_metrics(own)})
    return {"schema_version": 1, "seeds": seeds,
            "calibrated": probability_metrics(labels0, np.mean(calibrated, axis=0), **options),
            "uncalibrated": probability_metrics(labels0, np.mean(raw, axis=0), **options),
            "members": members,
            "definitions": {"calibrated": "the mean of the members' calibrated probabilities (as infer averages them)",
                            "uncalibrated": "the mean of the members' softmax probabilities",
                            "members": "each member's calibrated probabilities at its best epoch"}}


def train_seeds(input_dir: Path, out: Path, *, config: PipelineConfig, force: bool = False,
                train_one: TrainOne) -> dict[str, Any]:
    """Train ``classify.seeds`` models on one split into OUT/seed_S and write the ensemble model (see module doc)."""
    c = config.classify
    input_dir, out = Path(input_dir), Path(out)
    seeds = [config.seed + i for i in range(c.seeds)]
    split = shared_split(input_dir, config)
    inputs = ensemble_inputs(input_dir, config)
    call = {"task": config.task, "classify": config_dict(c), "evaluate": config_dict(config.evaluate),
            "split": split, "seeds": seeds}

    def work(record: StageRecord) -> list[Path]:
        outputs: list[Path] = []
        for i, seed in enumerate(seeds):
            log.info("train: seed %d (%d of %d; %d training, %d validation studies)", seed, i + 1, len(seeds),
                     len(split["train"]), len(split["validation"]))
            member = config.model_copy(update={"seed": seed})
            result = train_one(input_dir, seed_dir(out, seed), config=member, force=force, split=split)
            if result.get("status") != "complete":
                raise StageError(f"seed {seed} did not complete (status {result.get('status')}); see "
                                 f"{seed_dir(out, seed) / 'record.json'}")
            outputs += [seed_dir(out, seed) / name for name in (VALIDATION_PREDICTIONS, f"{MODEL_DIR}/model.json",
                                                                f"{MODEL_DIR}/model.pt")]
        for stale in (MODEL_DIR + "/model.pt", VALIDATION_PREDICTIONS, CV_JSON):  # left by a single or CV run
            (out / stale).unlink(missing_ok=True)
        outputs.append(write_split(split, out))
        write_json_atomic(out / MODEL_DIR / "model.json",
                          ensemble_json(out, [seed_dir(Path("."), s).name for s in seeds], seeds=seeds))
        evaluation = ensemble_validation(out, seeds, config=config)
        write_json_atomic(out / VALIDATION_METRICS, evaluation)
        reliability_diagram(evaluation["calibrated"]["reliability"], out / "reliability.png",
                            title=f"Validation, mean of {len(seeds)} seeds")
        outputs += [out / MODEL_DIR / "model.json", out / VALIDATION_METRICS, out / "reliability.png"]
        for split_name in ("train", "validation"):
            for sid in split[split_name]:
                record.add(StudyStatus(id=sid, status="ok", message=split_name))
        cal = evaluation["calibrated"]
        record.extra.update({"task": "classification", "seeds": seeds, "val_auc": cal.get("auc"),
                             "val_auc_ci": cal.get("auc_ci"), "val_accuracy": cal.get("accuracy"),
                             "member_auc": [m.get("auc") for m in evaluation["members"]]})
        log.info("train: validation AUC of the %d seeds' average %s (members %s)", len(seeds), cal.get("auc"),
                 ", ".join(f"{m.get('auc'):.3f}" for m in evaluation["members"] if m.get("auc") is not None))
        return outputs

    return execute_stage("train", out, config=config, inputs=inputs, work=work, force=force, extra_hash=call)
