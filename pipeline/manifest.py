"""The ingest manifest: one entry per study found, with geometry, checksums and problems."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.errors import ManifestError
from pipeline.fileio import read_json, writable, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Text = Annotated[str, AfterValidator(writable)]
"""Text that names files (sources, messages): what a file name holds that UTF-8 cannot, or that does not print,
as ``\\xNN`` (:func:`pipeline.fileio.writable`)."""


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    message: Text


class Study(BaseModel):
    """One study (a NIfTI image, or one DICOM series) and what ingest made of it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: Text
    format: Literal["nifti", "dicom", "unknown"]  # unknown: a folder that could not be read
    status: Literal["ok", "failed", "skipped"]
    image: str | None = None
    label: str | None = None
    label_source: Text | None = None
    modality: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    orientation: str | None = None
    affine: list[list[float]] | None = None
    sha256: dict[str, str] = {}
    problems: list[Problem] = []
    error: Problem | None = None
    class_label: int | None = None
    volume: int | None = None  # ingest.split_4d: this study is volume ``volume`` (from 1) of its source's ``volumes``
    volumes: int | None = None  # a 4D source: its volume count (kept whole as time last, or split per volume)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    dataset: str | None = None
    labels: dict[str, str] | None = None
    channels: list[str] | None = None  # several image channels (4D images, channel last): their names, in order
    studies: list[Study] = []
    classes: dict[str, str] | None = None

    @model_validator(mode="after")
    def _ids_unique(self) -> Manifest:
        shared = sorted(i for i, n in Counter(s.id for s in self.studies).items() if n > 1)
        if shared:  # outputs are named by id, outcomes keyed by it: a shared id loses a study
            raise ValueError(f"study ids must be unique; {', '.join(shared[:5])} given to several studies")
        return self

    def ok_studies(self) -> list[Study]:
        return [s for s in self.studies if s.status == "ok"]

    def by_id(self) -> dict[str, Study]:
        return {s.id: s for s in self.studies}


def manifest_order(study: Study) -> tuple[str, int, str]:
    """Where a study is listed in a manifest: by source, then (the volumes of one 4D source) by volume, then id."""
    return study.source, study.volume or 0, study.id


def pseudonym(source: str, *, key: str, prefix: str = "case") -> str:
    """Stable pseudonymous id: a keyed hash (HMAC-SHA256) of the study's relative source path."""
    digest = hmac.new(key.encode(), source.encode(), hashlib.sha256).hexdigest()
    return f"{prefix}_{digest[:12]}"


def save_manifest(manifest: Manifest, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest.model_dump(mode="json"))
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Load ``path`` (a manifest file or a folder holding ``manifest.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}; run 'medpipe ingest SCAN_DIR --out DIR' first")
    try:
        return Manifest.model_validate(read_json(path))
    except (ValueError, ValidationError) as exc:
        raise ManifestError(f"{path}: not a valid medpipe manifest ({exc})") from None
