"""The provenance block of the cohort page: configs and hashes, code and package versions, seeds, devices, timings,
data checksums. Paths and the pseudonym key are redacted: reports name studies only by pseudonymous id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PipelineConfig, config_dict, config_hash
from pipeline.errors import ManifestError
from pipeline.provenance import RECORD_NAME, load_record
from pipeline.reporting import html
from pipeline.reporting.pages import Section
from pipeline.runtime import code_version, package_versions

REDACTED = "<redacted>"
_SECRET_KEYS = {"root", "split_file", "labels_csv", "plans_file", "cache_dir", "pseudonym_key"}
_KEEP = ("stage", "status", "config_hash", "config", "code_version", "packages", "seed", "started", "finished",
         "duration_s", "timings", "counts")


def redact(value: Any, key: str = "") -> Any:
    """A copy with host paths and secrets replaced by ``<redacted>`` (keys in _SECRET_KEYS, strings with slashes)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if value is not None and (key in _SECRET_KEYS or (isinstance(value, str) and ("/" in value or "\\" in value))):
        return REDACTED
    return value


def stage_records(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Selected, redacted record.json fields of stage folders (or record files) and the record files as inputs."""
    records, inputs = [], {}
    for i, path in enumerate(paths):
        folder = Path(path).parent if Path(path).name == RECORD_NAME else Path(path)
        record = load_record(folder)
        if record is None:
            raise ManifestError(f"{folder / RECORD_NAME}: no readable stage record for the provenance block; "
                                "run that stage first or leave it out")
        picked = redact({k: record.get(k) for k in _KEEP})
        device = record.get("device") or {}
        picked["device"] = " / ".join(str(device[k]) for k in ("type", "gpu", "cpu") if device.get(k)) or html.DASH
        records.append(picked)
        inputs[f"provenance:{i}:{record.get('stage')}"] = folder / RECORD_NAME
    return records, inputs


def data_digest(rows: Sequence[Sequence[str | None]]) -> str:
    """One SHA-256 over the (study, image, label, prediction) checksum rows, for comparing data sets at a glance."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\t".join(v or "" for v in row) + "\n").encode("utf-8"))
    return digest.hexdigest()


def provenance_section(records: Sequence[dict[str, Any]], *, config: PipelineConfig,
                       checksums: Sequence[Sequence[str | None]]) -> Section:
    """The whole provenance block; ``checksums`` rows are (study id, image, label, prediction) SHA-256s."""
    full = redact(config_dict(config))
    parts = [html.paragraph(f"Report config hash {config_hash(config)} (medpipe config; paths and keys redacted "
                            f"below); code version {code_version()}; seed {config.seed}; bootstrap seed "
                            f"{config.evaluate.bootstrap_seed}."),
             html.details("report config (resolved)", html.preformatted(yaml.safe_dump(full, sort_keys=True)))]
    if records:
        parts.append(html.table(
            ["stage", "status", "config hash", "code version", "seed", "device", "started (UTC)", "duration (s)"],
            [[r.get("stage"), r.get("status"), r.get("config_hash"), r.get("code_version"), r.get("seed"),
              r.get("device"), r.get("started"), html.num(r.get("duration_s"), digits=1)] for r in records]))
        for r in records:
            timings = r.get("timings") or {}
            if timings:
                parts.append(html.paragraph(f"{r.get('stage')} timings (s): "
                                            + ", ".join(f"{k} {v}" for k, v in sorted(timings.items()))))
        parts.append(html.details("stage configs", "\n".join(
            html.heading(f"{r.get('stage')} (hash {r.get('config_hash')})", 3)
            + html.preformatted(yaml.safe_dump(r.get("config") or {}, sort_keys=True)) for r in records)))
    else:
        parts.append(html.paragraph("no stage records given", css_class="muted"))
    packages = dict(package_versions())
    for r in records:
        packages.update(r.get("packages") or {})
    parts.append(html.details("package versions", html.table(["package", "version"], sorted(packages.items()))))
    parts.append(html.paragraph(f"Data checksum (SHA-256 over the {len(checksums)} studies' image, label and "
                                f"prediction checksums): {data_digest(checksums)}"))
    parts.append(html.details("data checksums per study (SHA-256, first 16 hex digits)", html.table(
        ["study", "image", "reference label", "prediction"],
        [[row[0], *((v or html.DASH)[:16] for v in row[1:])] for row in checksums])))
    return Section("Provenance", "\n".join(parts))
