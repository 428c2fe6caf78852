"""Sharding for cluster array jobs: which studies a shard owns, its folder, and merging shard folders into one."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, ManifestError
from pipeline.fileio import atomic_path, read_json, write_json_atomic
from pipeline.provenance import StageRecord, StudyStatus, load_record

log = logging.getLogger(__name__)

__all__ = ["Shard", "merge_shards", "shard_of", "shard_out", "study_selector"]

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
SHARDABLE = ("ingest", "preprocess", "infer")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, _, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            raise ConfigError(f"--shard {text}: write i/n, e.g. 0/4") from None
        if not 0 <= shard.index < shard.count:
            raise ConfigError(f"--shard {text}: the index must satisfy 0 <= i < n")
        return shard

    @property
    def folder(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, study_id: str) -> bool:
        return shard_of(study_id, self.count) == self.index


def shard_of(study_id: str, count: int) -> int:
    """The shard owning ``study_id``: a hash of the id alone, so adding studies never moves the others."""
    return int.from_bytes(hashlib.sha256(study_id.encode("utf-8")).digest()[:8], "big") % count


def config_shard(config: PipelineConfig) -> Shard | None:
    return Shard.parse(config.execution.shard) if config.execution.shard else None


def shard_out(out: Path, config: PipelineConfig) -> Path:
    """The folder a stage writes: ``out`` itself, or ``out/shard-i-of-n`` when the config names a shard."""
    shard = config_shard(config)
    return Path(out) / shard.folder if shard else Path(out)


def study_selector(config: PipelineConfig) -> Any:
    """``owns(study_id) -> bool`` for the config's shard (everything when unsharded)."""
    shard = config_shard(config)
    return shard.owns if shard else (lambda _study_id: True)


# ---- merging -------------------------------------------------------------------------------


def _shard_folders(out: Path) -> list[tuple[Shard, Path]]:
    found = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        match = SHARD_DIR.match(path.name)
        if match and path.is_dir():
            found.append((Shard(int(match.group(1)), int(match.group(2))), path))
    if not found:
        raise ManifestError(f"{out}: no shard-i-of-n folders to merge; run the stage with --shard i/n first")
    counts = {s.count for s, _ in found}
    if len(counts) > 1:
        raise ManifestError(f"{out}: shards of different splits ({', '.join(f'of {c}' for c in sorted(counts))}); "
                            "remove the folders of the old split")
    count = counts.pop()
    missing = sorted(set(range(count)) - {s.index for s, _ in found})
    if missing:
        raise ManifestError(f"{out}: shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; run them "
                            "(or rerun the array job) before merging")
    return sorted(found, key=lambda pair: pair[0].index)


def _records(shards: list[tuple[Shard, Path]]) -> list[dict[str, Any]]:
    records = []
    for shard, folder in shards:
        record = load_record(folder)
        if record is None:
            raise ManifestError(f"{folder}: no record.json, so this shard did not finish; rerun shard "
                                f"{shard.index}/{shard.count}")
        if record.get("status") == "failed" and record.get("counts", {}).get("ok", 0) == 0 and record.get("studies"):
            log.warning("%s: every study of this shard failed", folder)
        records.append(record)
    stages = {r.get("stage") for r in records}
    hashes = {r.get("config_hash") for r in records}
    inputs = {repr(sorted((r.get("inputs") or {}).items())) for r in records}
    if len(stages) > 1:
        raise ManifestError(f"shards of different stages ({', '.join(sorted(map(str, stages)))}) cannot be merged")
    if len(hashes) > 1 or len(inputs) > 1:
        what = "configs" if len(hashes) > 1 else "inputs"
        raise ManifestError(f"the shards were made with different {what} (config hashes "
                            f"{', '.join(sorted(map(str, hashes)))}); rerun every shard with one config")
    if stages.pop() not in SHARDABLE:
        raise ManifestError(f"only {', '.join(SHARDABLE)} folders are sharded and merged")
    return records


def _check_owner(shard: Shard, study_id: str, seen: dict[str, int]) -> None:
    if study_id in seen:
        raise ManifestError(f"study {study_id} is in shards {seen[study_id]} and {shard.index}: the shards overlap")
    if not shard.owns(study_id):
        raise ManifestError(f"study {study_id} is in shard {shard.index}/{shard.count} but belongs to shard "
                            f"{shard_of(study_id, shard.count)}; that shard folder is stale, rerun it")
    seen[study_id] = shard.index


def _place(source: Path, target: Path) -> Path:
    """Hard-link ``source`` at ``target`` (a copy across file systems), atomically."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target


def merge_shards(out: str | Path) -> dict[str, Any]:
    """Assemble ``out/shard-*-of-n`` into ``out`` as if the stage had run unsharded; return the record.

    Refuses shards made with different configs or inputs, missing or overlapping shards and
    studies in the wrong shard. The merged files are those an unsharded run writes.
    """
    out = Path(out)
    shards = _shard_folders(out)
    records = _records(shards)
    stage = records[0]["stage"]
    record = StageRecord(stage=stage, stage_dir=out, config=records[0]["config"],
                         config_hash=records[0]["config_hash"], seed=records[0].get("seed"),
                         inputs=records[0].get("inputs") or {})
    seen: dict[str, int] = {}
    for (shard, _), shard_record in zip(shards, records, strict=True):
        for study in shard_record.get("studies", []):
            _check_owner(shard, study["id"], seen)
            record.add(StudyStatus(id=study["id"], status=study["status"], code=study.get("code"),
                                   message=study.get("message"), reused=bool(study.get("reused"))))
    merge = {"ingest": _merge_ingest, "preprocess": _merge_preprocess, "infer": _merge_infer}[stage]
    outputs = merge(out, shards)
    config_file = shards[0][1] / "config.yaml"
    if config_file.is_file():
        outputs.append(_place(config_file, out / "config.yaml"))
    record.extra["merged_shards"] = len(shards)
    return record.finish(outputs=outputs)


def _merge_ingest(out: Path, shards: list[tuple[Shard, Path]]) -> list[Path]:
    from pipeline.manifest import Manifest, load_manifest, manifest_order, save_manifest

    manifests = [load_manifest(folder) for _, folder in shards]
    headers = {(m.dataset, repr(m.labels), repr(m.channels)) for m in manifests}
    if len(headers) > 1:
        raise ManifestError("the shards' manifests name different datasets, labels or channels; rerun them on one "
                            "scan folder")
    studies, outputs = [], []
    for (_, folder), manifest in zip(shards, manifests, strict=True):
        for study in manifest.studies:
            studies.append(study)
            for rel in (study.image, study.label):
                if rel and study.status == "ok":
                    outputs.append(_place(folder / rel, out / rel))
    studies.sort(key=manifest_order)
    merged = Manifest(dataset=manifests[0].dataset, labels=manifests[0].labels, channels=manifests[0].channels,
                      classes=manifests[0].classes, studies=studies)
    return [save_manifest(merged, out), *outputs]


def _merge_preprocess(out: Path, shards: list[tuple[Shard, Path]]) -> list[Path]:
    plans = {(folder / "plans.json").read_bytes() for _, folder in shards}
    if len(plans) > 1:
        raise ManifestError("the shards planned differently (plans.json differ); rerun them on one ingest folder")
    outputs = [_place(shards[0][1] / "plans.json", out / "plans.json")]
    entries = []
    for _, folder in shards:
        for entry in read_json(folder / "dataset.json")["studies"]:
            entries.append(entry)
            for rel in (entry["image"], entry["label"], f"data/{entry['id']}.json"):
                outputs.append(_place(folder / rel, out / rel))
    write_json_atomic(out / "dataset.json", {"studies": sorted(entries, key=lambda e: e["id"])})
    return [out / "dataset.json", *outputs]


def _merge_infer(out: Path, shards: list[tuple[Shard, Path]]) -> list[Path]:
    indexes = [read_json(folder / "predictions.json") for _, folder in shards]
    heads = {repr({k: v for k, v in index.items() if k not in ("predictions", "failed")}) for index in indexes}
    if len(heads) > 1:
        raise ManifestError("the shards used different models or inputs (predictions.json headers differ)")
    predictions, failed, outputs = [], [], []
    for (_, folder), index in zip(shards, indexes, strict=True):
        for entry in index["predictions"]:
            predictions.append(entry)
            outputs.append(_place(folder / entry["prediction"], out / entry["prediction"]))
        failed.extend(index.get("failed", []))
    order = (lambda e: e["id"]) if indexes[0].get("input_kind") == "manifest" else (lambda e: Path(e["image"]))
    merged = {k: v for k, v in indexes[0].items() if k not in ("predictions", "failed")}
    merged.update(predictions=sorted(predictions, key=order), failed=sorted(failed, key=order))
    write_json_atomic(out / "predictions.json", merged)
    return [out / "predictions.json", *outputs]
