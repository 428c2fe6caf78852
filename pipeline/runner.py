"""``medpipe run``: every stage in order over one run folder, skipping stages that are up to date."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, save_resolved
from pipeline.errors import ConfigError, StageError
from pipeline.fileio import read_json
from pipeline.layout import STAGES, RunLayout
from pipeline.manifest import load_manifest

log = logging.getLogger(__name__)


def _train_output(config: PipelineConfig, layout: RunLayout) -> Path:
    """The train folder whose split and model the run predicts with: 03_train, or 03_train/fold_k for one fold."""
    fold = config.train.fold
    return layout.train / f"fold_{fold}" if isinstance(fold, int) else layout.train


def _inference_studies(config: PipelineConfig, layout: RunLayout) -> list[str]:
    """The studies a run predicts: the validation split plus every ok study without a label.

    A cross-validation of every fold (``train.fold: all``) predicts only the unlabelled studies
    (with the fold ensemble); its validation figures are in 03_train/cv.json, each study
    predicted by the fold that held it out.
    """
    manifest = load_manifest(layout.ingest)
    unlabeled = {s.id for s in manifest.ok_studies() if s.label is None}
    if config.train.fold == "all":
        return sorted(unlabeled)
    split = read_json(_train_output(config, layout) / "split.json")
    return sorted(set(split.get("validation", [])) | unlabeled)


def run_stage(stage: str, config: PipelineConfig, layout: RunLayout, *, force: bool = False) -> dict[str, Any]:
    """Run one stage of a run folder (the CLI's per-stage commands call the same functions)."""
    if config.task == "classification":
        from pipeline.classification.run import run_classification_stage

        return run_classification_stage(stage, config, layout, force=force)
    if stage == "ingest":
        if config.data.root is None:
            raise ConfigError("data.root is not set: give the scan folder in the config or with --data PATH")
        from pipeline.stages.ingest import ingest

        return ingest(config.data.root, layout.ingest, config=config, force=force)
    if stage == "preprocess":
        from pipeline.stages.preprocess import preprocess

        return preprocess(layout.ingest, layout.preprocess, config=config, force=force)
    if stage == "train":
        from pipeline.stages.train import train

        return train(layout.preprocess, layout.train, config=config, force=force)
    if stage == "infer":
        from pipeline.stages.infer import infer

        return infer(_train_output(config, layout), layout.ingest, layout.infer, config=config, force=force,
                     studies=_inference_studies(config, layout))
    if stage == "evaluate":
        from pipeline.stages.evaluate import evaluate

        return evaluate(layout.infer, layout.ingest, layout.evaluate, config=config, force=force)
    if stage == "report":
        from pipeline.stages.report import report

        return report(layout.evaluate, layout.report, predictions=layout.infer, ingest=layout.ingest, config=config,
                      force=force, provenance=[_train_output(config, layout) if s == "train" else layout.stage_dir(s)
                                             for s in STAGES[:-1]])
    raise ConfigError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}")


def run_pipeline(
    config: PipelineConfig,
    out: str | Path,
    *,
    force: bool = False,
    stages: tuple[str, ...] = STAGES,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in order into ``out``; a stage whose outputs are complete and current is skipped.

    A stage that fails for every study stops the run (later stages would have nothing to
    work on); a partial stage lets the run go on with the studies that succeeded.
    """
    if config.execution.shard:
        from pipeline.sharding import SHARDABLE

        unsharded = [s for s in stages if s not in SHARDABLE]
        if unsharded:
            raise ConfigError(f"--shard runs only {', '.join(SHARDABLE)} (each writes STAGE/shard-i-of-n; "
                              f"'medpipe merge' joins them); run {', '.join(unsharded)} unsharded after merging")
    layout = RunLayout(Path(out))
    layout.root.mkdir(parents=True, exist_ok=True)
    save_resolved(config, layout.root)
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        if config.task == "classification" and stage == "preprocess":
            log.info("=== preprocess: not used by classification (volumes are resized when loaded) ===")
            continue
        if config.train.fold == "all" and stage in ("infer", "evaluate", "report") \
                and not _inference_studies(config, layout):
            log.info("=== %s: nothing to predict (every study is labelled); the cross-validation figures are in "
                     "%s ===", stage, layout.train / "cv.json")
            continue
        log.info("=== %s ===", stage)
        record = run_stage(stage, config, layout, force=force)
        records[stage] = record
        if record.get("status") == "failed":
            raise StageError(f"stage {stage} failed for every study; see {layout.stage_dir(stage) / 'record.json'}")
    return records
