"""What every stage shares: the up-to-date check, the stage record, and the resume hint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, config_hash, save_resolved, stage_config
from pipeline.fileio import remove_partials
from pipeline.provenance import StageRecord, hash_inputs, is_up_to_date, load_record

log = logging.getLogger(__name__)


def execute_stage(
    stage: str,
    out: Path,
    *,
    config: PipelineConfig,
    inputs: dict[str, Path],
    work: Callable[[StageRecord], list[Path]],
    force: bool = False,
    extra_hash: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``work`` into ``out`` unless the folder is already complete for this config and inputs.

    ``work`` fills the record's per-study statuses and returns the output files to checksum.
    ``extra_hash`` adds call arguments (e.g. the model folder) to the config hash.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    section = stage_config(config, stage)
    if extra_hash:
        section = {**section, "call": extra_hash}
    digest = config_hash(section)
    input_hashes = hash_inputs(inputs)
    if not force:
        fresh, why = is_up_to_date(out, config_hash=digest, inputs=input_hashes)
        if fresh:
            log.info("%s: outputs in %s are complete and up to date; skipping", stage, out)
            record = load_record(out)
            return {**(record or {}), "skipped": True}
        log.info("%s: running (%s)", stage, why)
    removed = remove_partials(out)
    if removed:
        log.warning("%s: removed %d partial file(s) left by an interrupted run", stage, removed)
    save_resolved(config, out)
    record = StageRecord(stage=stage, stage_dir=out, config=section, config_hash=digest, seed=config.seed,
                         inputs=input_hashes)
    outputs = work(record)
    outputs = [*outputs, out / "config.yaml"]
    return record.finish(outputs=outputs)
