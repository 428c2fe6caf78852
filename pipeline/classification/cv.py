"""Classifier cross-validation: stratified folds, training fold k into OUT/fold_k, the ensemble model and cv.json."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classification.calibration import Calibration
from pipeline.classification.metrics import classification_metrics, probability_metrics
from pipeline.classification.pretrained_files import weights_path
from pipeline.config import PipelineConfig, config_dict
from pipeline.errors import ManifestError, StageError
from pipeline.fileio import read_json, write_json_atomic
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage
from pipeline.training.split import SPLIT_NAME, make_split, read_split

log = logging.getLogger(__name__)

CV_JSON = "cv.json"
MODEL_DIR = "model"
VALIDATION_PREDICTIONS = "validation_predictions.csv"  # written by the trainer in each fold folder
VALIDATION_METRICS = "validation_metrics.json"  # a model's (or an ensemble's) validation figures
_SUMMARY_METRICS = ("auc", "auc_ci", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci", "f1",
                    "sensitivity", "specificity", "ece", "n")

TrainOne = Callable[..., dict[str, Any]]


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / f"fold_{fold}"


def held_out_ids(input_dir: Path, config: PipelineConfig) -> set[str]:
    """Ids a split file sets aside as ``test`` (MedMNIST's official test split): never in a fold."""
    held: set[str] = set()
    for path in (Path(input_dir) / SPLIT_NAME, config.data.split_file):
        if path is not None and Path(path).is_file():
            data = read_json(Path(path))
            if isinstance(data, dict) and isinstance(data.get("test"), list):
                held |= {str(i) for i in data["test"]}
    return held


def labelled_studies(input_dir: Path, config: PipelineConfig) -> tuple[list[str], list[int]]:
    """Sorted ids and class labels of the ok, labelled studies that cross-validation splits."""
    manifest = load_manifest(input_dir)
    held = held_out_ids(input_dir, config)
    pairs = sorted((s.id, int(s.class_label)) for s in manifest.ok_studies()
                   if s.image and s.class_label is not None and s.id not in held)
    if not pairs:
        raise ManifestError(f"{Path(input_dir) / MANIFEST_NAME}: no ok study has a class_label to cross-validate; "
                            "set data.labels_csv and run ingest again")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stratified_folds(ids: Sequence[str], labels: Sequence[int], *, num_folds: int, seed: int) -> list[dict[str, Any]]:
    """Stratified k-fold (scikit-learn, shuffled with ``seed``) over the ids sorted: fold k validates on part k.

    The validation sets are disjoint, cover every id and keep each class's share; the same ids,
    labels and seed always give the same folds.
    """
    from sklearn.model_selection import StratifiedKFold

    pairs = sorted(zip(ids, labels, strict=True))
    if len({p[0] for p in pairs}) != len(pairs):
        raise StageError("study ids are not unique; the manifest lists a study twice")
    counts = Counter(int(p[1]) for p in pairs)
    if len(counts) < 2:
        raise StageError(f"all {len(pairs)} labelled studies are class {next(iter(counts), '?')}; a classifier "
                         "needs studies of at least two classes")
    small = {c: n for c, n in sorted(counts.items()) if n < num_folds}
    if small:
        raise StageError(f"stratified {num_folds}-fold cross-validation needs at least {num_folds} studies of each "
                         f"class; class(es) {', '.join(f'{c} ({n})' for c, n in small.items())} have fewer. Lower "
                         "classify.num_folds or label more studies")
    order = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=int(seed) % (1 << 32))
    folds = []
    for k, (train, validation) in enumerate(splitter.split(np.zeros(len(y)), y)):
        folds.append({"seed": int(seed), "fold": k, "num_folds": num_folds,
                      "train": sorted(str(i) for i in order[train]),
                      "validation": sorted(str(i) for i in order[validation])})
    return folds


def stratified_split(ids: Sequence[str], labels: Sequence[int], *, val_fraction: float,
                     seed: int) -> dict[str, Any]:
    """One seeded hold-out of ``round(n * val_fraction)`` studies keeping each class's share (scikit-learn);
    a plain random hold-out when the classes are too small to stratify."""
    from sklearn.model_selection import train_test_split

    pairs = sorted(zip(ids, labels, strict=True))
    n_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
    try:
        train, validation = train_test_split([p[0] for p in pairs], test_size=n_val, shuffle=True,
                                             stratify=[p[1] for p in pairs], random_state=int(seed) % (1 << 32))
    except ValueError as exc:
        log.info("train: a stratified split is not possible (%s); holding out studies at random", exc)
        return make_split(ids, val_fraction=val_fraction, seed=seed)
    return {"seed": int(seed), "train": sorted(train), "validation": sorted(validation)}


def choose_split(config: PipelineConfig, folder: Path, ids: list[str], labels: list[int]) -> dict[str, Any]:
    """``data.split_file``, else ``folder/split.json`` (MedMNIST import), else a seeded stratified hold-out."""
    if config.data.split_file is not None:
        return read_split(config.data.split_file, ids)
    if (folder / SPLIT_NAME).is_file():
        log.info("train: using the split of %s", folder / SPLIT_NAME)
        return read_split(folder / SPLIT_NAME, ids)
    return stratified_split(ids, labels, val_fraction=config.classify.val_fraction, seed=config.seed)


def read_validation_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels, logits) of a fold's validation_predictions.csv."""
    if not path.is_file():
        raise StageError(f"{path} is missing; train the fold again (--force)", code="fold_incomplete")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = sorted((c for c in (rows[0] if rows else {}) if c.startswith("logit_")), key=lambda c: int(c[6:]))
    ids = [r["study"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    logits = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64)
    return ids, labels, logits


def metric_options(config: PipelineConfig) -> dict[str, Any]:
    """Operating point and bootstrap settings of the metrics a run reports."""
    ev = config.evaluate
    return {"operating_point": config.classify.operating_point, "bootstrap": ev.bootstrap,
            "confidence": ev.confidence, "seed": ev.bootstrap_seed}


def summary_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in _SUMMARY_METRICS if k in metrics}


def cross_validation_summary(out: Path, folds: Sequence[int], *, config: PipelineConfig) -> dict[str, Any]:
    """Per-fold validation metrics and pooled out-of-fold metrics (each study predicted by the fold that held it out).

    ``pooled``: the uncalibrated out-of-fold logits; ``pooled_calibrated``: each fold's
    probabilities after its own calibration (fitted on that fold's validation studies).
    """
    ev, c = config.evaluate, config.classify
    options = metric_options(config)
    per_fold, all_ids, all_labels, all_logits, all_probs = [], [], [], [], []
    for k in folds:
        ids, labels, logits = read_validation_predictions(fold_dir(out, k) / VALIDATION_PREDICTIONS)
        model_json = fold_dir(out, k) / MODEL_DIR / "model.json"
        calibration = Calibration.from_json(read_json(model_json), where=str(model_json), num_classes=logits.shape[1])
        metrics = classification_metrics(labels, logits, calibration=calibration, **options)
        per_fold.append({"fold": k, **calibration.as_json(), **summary_metrics(metrics)})
        all_ids += ids
        all_labels.append(labels)
        all_logits.append(logits)
        all_probs.append(calibration.probabilities(logits))
    labels, logits, probs = np.concatenate(all_labels), np.concatenate(all_logits), np.concatenate(all_probs)
    pooled = classification_metrics(labels, logits, **options)
    calibrated = probability_metrics(labels, probs, **options)

    def spread(name: str) -> dict[str, float | None]:
        values = [f[name] for f in per_fold if f.get(name) is not None]
        return {"mean": float(np.mean(values)) if values else None, "std": float(np.std(values)) if values else None}

    return {
        "schema_version": 1, "task": "classification", "num_folds": c.num_folds, "seed": config.seed,
        "folds": per_fold,
        "across_folds": {name: spread(name) for name in ("auc", "accuracy", "balanced_accuracy")},
        "pooled": {**summary_metrics(pooled), "confusion_matrix": pooled["confusion_matrix"]},
        "pooled_calibrated": {**summary_metrics(calibrated), "confusion_matrix": calibrated["confusion_matrix"]},
        "studies": len(all_ids),
        "definitions": {"folds": "stratified k-fold (scikit-learn StratifiedKFold, shuffled, random_state = seed)",
                        "pooled": "metrics over the out-of-fold predictions of every fold together",
                        "ci": f"percentile bootstrap over studies, {ev.bootstrap} resamples, seed {ev.bootstrap_seed}",
                        "confidence": ev.confidence},
    }


def ensemble_json(out: Path, members: Sequence[str], **extra: Any) -> dict[str, Any]:
    """OUT/model/model.json of an ensemble whose members are OUT/<member>/model (fold or seed models)."""
    first = read_json(Path(out) / members[0] / MODEL_DIR / "model.json")
    shared = {k: first[k] for k in ("num_classes", "classes", "input_size", "in_channels", "channels",
                                    "normalization", "operating_point", "gradcam_slices", "network", "seed")
              if k in first}
    return {"schema_version": 1, "task": "classification", **shared,
            "ensemble": [f"../{member}/{MODEL_DIR}" for member in members], **extra}


def ensemble_metadata(out: Path, folds: Sequence[int]) -> dict[str, Any]:
    """OUT/model/model.json of a cross-validated run: the fold models, for inference (ensemble or out-of-fold)."""
    return ensemble_json(out, [fold_dir(Path("."), k).name for k in folds], folds=list(folds))


def ensemble_inputs(input_dir: Path, config: PipelineConfig) -> dict[str, Path]:
    """The files an ensemble's training depends on: the manifest, the split files and the pretrained weights."""
    c = config.classify
    inputs = {"manifest": Path(input_dir) / MANIFEST_NAME}
    for name, path in (("split", Path(input_dir) / SPLIT_NAME), ("split_file", config.data.split_file),
                       ("pretrained", weights_path(c.pretrained) if c.pretrained is not None else None)):
        if path is not None and Path(path).is_file():
            inputs[name] = Path(path)
    return inputs


def train_folds(input_dir: Path, out: Path, *, config: PipelineConfig, force: bool = False,
                train_one: TrainOne) -> dict[str, Any]:
    """Train ``classify.fold`` (k, or every fold for ``all``) of a stratified k-fold split of the labelled studies.

    Each fold is its own stage folder OUT/fold_k (skipped when up to date, resumed from its
    checkpoint when stopped). OUT/model/model.json names the fold models; ``all`` also writes
    OUT/cv.json with per-fold and pooled out-of-fold metrics.
    """
    c = config.classify
    input_dir, out = Path(input_dir), Path(out)
    ids, labels = labelled_studies(input_dir, config)
    folds = stratified_folds(ids, labels, num_folds=c.num_folds, seed=config.seed)
    wanted = list(range(c.num_folds)) if c.fold == "all" else [int(c.fold)]  # type: ignore[arg-type]
    inputs = ensemble_inputs(input_dir, config)
    call = {"task": config.task, "classify": config_dict(c), "evaluate": config_dict(config.evaluate),
            "folds": [folds[k] for k in wanted]}

    def work(record: StageRecord) -> list[Path]:
        outputs: list[Path] = []
        for k in wanted:
            log.info("train: fold %d of %d (%d training, %d validation studies)", k, c.num_folds,
                     len(folds[k]["train"]), len(folds[k]["validation"]))
            result = train_one(input_dir, fold_dir(out, k), config=config, force=force, split=folds[k], fold=k)
            if result.get("status") != "complete":
                raise StageError(f"fold {k} did not complete (status {result.get('status')}); see "
                                 f"{fold_dir(out, k) / 'record.json'}")
            outputs += [fold_dir(out, k) / name for name in (SPLIT_NAME, VALIDATION_PREDICTIONS,
                                                             f"{MODEL_DIR}/model.json", f"{MODEL_DIR}/model.pt")]
            for sid in folds[k]["validation"]:
                record.add(StudyStatus(id=sid, status="ok", message=f"fold {k} validation"))
            if len(wanted) == 1:
                for sid in folds[k]["train"]:
                    record.add(StudyStatus(id=sid, status="ok", message=f"fold {k} train"))
        (out / MODEL_DIR / "model.pt").unlink(missing_ok=True)  # left by a single-split run: not this model
        write_json_atomic(out / MODEL_DIR / "model.json", ensemble_metadata(out, wanted))
        outputs.append(out / MODEL_DIR / "model.json")
        record.extra.update({"task": "classification", "folds": wanted, "num_folds": c.num_folds})
        if c.fold == "all":
            summary = cross_validation_summary(out, wanted, config=config)
            write_json_atomic(out / CV_JSON, summary)
            outputs.append(out / CV_JSON)
            pooled = summary["pooled"]
            record.extra["cv"] = {"pooled_auc": pooled.get("auc"), "pooled_auc_ci": pooled.get("auc_ci"),
                                  "pooled_accuracy": pooled.get("accuracy"),
                                  "fold_auc": [f.get("auc") for f in summary["folds"]]}
            log.info("train: cross-validated AUC %s (pooled out-of-fold), accuracy %.3f", pooled.get("auc"),
                     pooled["accuracy"])
        else:
            (out / CV_JSON).unlink(missing_ok=True)
        return outputs

    return execute_stage("train", out, config=config, inputs=inputs, work=work, force=force, extra_hash=call)
