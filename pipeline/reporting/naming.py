"""How report pages name studies: safe file names from ids, and messages scrubbed of source paths."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.fileio import sha256_bytes
from pipeline.io.nifti import nifti_stem
from pipeline.manifest import Manifest, Study

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")


def safe_name(study_id: str) -> str:
    """A file name for a study: its id when that is plain ASCII, else a hash of it."""
    if _SAFE_NAME.fullmatch(study_id) and ".." not in study_id:
        return study_id
    return f"study_{sha256_bytes(study_id.encode())[:12]}"


def scrub_source(message: str, study: Study | None) -> str:
    """Remove the study's source path and file name from a message: pages name studies only by id."""
    if study is None:
        return message
    source = study.source
    for piece in sorted({source, Path(source).name, nifti_stem(Path(source)), *Path(source).parts},
                        key=len, reverse=True):
        if len(piece) >= 3:
            message = message.replace(piece, "<source>")
    return message


def study_problems(study: Study | None) -> list[dict[str, str]]:
    """The manifest's problems of a study for its report page, each message scrubbed of source paths."""
    if study is None:
        return []
    return [{"code": p.code, "message": scrub_source(p.message, study)} for p in study.problems]


def unconverted(manifest: Manifest) -> list[dict[str, str]]:
    """The studies ingest found but did not convert (failed or skipped): id, status, code and the reason,
    scrubbed of source paths, so that a cohort report accounts for every study found."""
    rows = []
    for study in (s for s in manifest.studies if s.status != "ok"):
        problem = study.error or (study.problems[0] if study.problems else None)
        rows.append({"id": study.id, "status": study.status, "code": problem.code if problem else "",
                     "message": scrub_source(problem.message, study) if problem else ""})
    return rows
