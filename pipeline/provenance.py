"""Stage records: what produced a stage folder (config hash, inputs, versions, timings, per-study status)."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.layout import RECORD_NAME
from pipeline.runtime import code_version, package_versions

log = logging.getLogger(__name__)

StageStatus = Literal["complete", "partial", "failed"]


@dataclass
class StudyStatus:
    id: str
    status: Literal["ok", "failed", "skipped"]
    code: str | None = None
    message: str | None = None
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.code:
            out["code"] = self.code
        if self.message:
            out["message"] = self.message
        if self.reused:
            out["reused"] = True
        return out


@dataclass
class StageRecord:
    """Filled in while a stage runs, then written as ``record.json`` in the stage folder."""

    stage: str
    stage_dir: Path
    config: dict[str, Any]
    config_hash: str
    seed: int | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    studies: list[StudyStatus] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    digests: dict[Path, str] = field(default_factory=dict)  # output -> sha256 known already (hashed by a worker)

    def add(self, status: StudyStatus) -> None:
        self.studies.append(status)

    @property
    def status(self) -> StageStatus:
        states = [s.status for s in self.studies]
        if states and all(s == "failed" for s in states):
            return "failed"
        if "failed" in states:
            return "partial"
        return "complete"

    def finish(self, *, outputs: list[Path] | None = None) -> dict[str, Any]:
        """Hash the outputs (those in ``digests`` were hashed where they were written) and write the record
        atomically; return it."""
        ended = time.time()
        out_hashes = {str(p.relative_to(self.stage_dir)): self.digests.get(p) or sha256_file(p)
                      for p in sorted(outputs or []) if p.is_file()}
        counts = {k: sum(1 for s in self.studies if s.status == k) for k in ("ok", "failed", "skipped")}
        record = {
            "stage": self.stage,
            "status": self.status,
            "config_hash": self.config_hash,
            "config": self.config,
            "seed": self.seed,
            "inputs": dict(sorted(self.inputs.items())),
            "outputs": out_hashes,
            "code_version": code_version(),
            "packages": package_versions(),
            "host": {"platform": platform.platform(), "python": platform.python_version()},
            "device": self.device,
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "finished": datetime.fromtimestamp(ended, UTC).isoformat(timespec="seconds"),
            "duration_s": round(ended - self.started, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "counts": counts,
            "studies": [s.as_dict() for s in self.studies],
            **self.extra,
        }
        write_json_atomic(self.stage_dir / RECORD_NAME, record)
        log.info("%s: %s (%d ok, %d failed, %d skipped) in %.1f s", self.stage, record["status"],
                 counts["ok"], counts["failed"], counts["skipped"], ended - self.started)
        return record


def load_record(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ValueError:
        log.warning("%s is not valid JSON; the stage will run again", path)
        return None
    return record if isinstance(record, dict) else None


def is_up_to_date(stage_dir: str | Path, *, config_hash: str, inputs: dict[str, str]) -> tuple[bool, str]:
    """Whether a stage folder is complete for this config and these inputs, and why not."""
    stage_dir = Path(stage_dir)
    record = load_record(stage_dir)
    if record is None:
        return False, "no record"
    if record.get("status") != "complete":
        return False, f"last run was {record.get('status')}"
    if record.get("config_hash") != config_hash:
        return False, "config changed"
    if record.get("inputs") != dict(sorted(inputs.items())):
        return False, "inputs changed"
    for rel, digest in record.get("outputs", {}).items():
        path = stage_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False, f"output {rel} missing or changed"
    return True, "up to date"


def hash_inputs(paths: dict[str, Path]) -> dict[str, str]:
    """``{name: sha256}`` for named input files (a stage's upstream manifests and records)."""
    return {name: sha256_file(p) for name, p in paths.items() if p.is_file()}
