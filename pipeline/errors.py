"""The exception hierarchy: every error medpipe raises on purpose derives from PipelineError."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class; the message names the file or study and, where there is one, the fix."""

    code: str = "pipeline_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(PipelineError):
    """A configuration file or override is invalid."""

    code = "config_error"


class ManifestError(PipelineError):
    """A manifest or stage record is missing, malformed or inconsistent."""

    code = "manifest_error"


class IngestError(PipelineError):
    """An input study cannot be converted; ``code`` says why in one word."""

    code = "ingest_error"


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc`` ("Permission denied"), never a path; its type when it has none."""
    return exc.strerror or type(exc).__name__


class FileUnreadable(IngestError):
    """A file of the scan folder could not be opened or read (permissions, a failing disk, a file removed)."""

    code = "file_unreadable"

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # the operating system's words ("Permission denied"), never a path


class PackedFile(IngestError):
    """A file of the scan folder is an archive or a compressed file (zip, tar, gzip ...): it may hold scans,
    which ingest does not unpack."""

    code = "archive_not_unpacked"

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # "zip", "gzip", ...


class GeometryError(IngestError):
    """Image geometry is missing, inconsistent or would have to be guessed."""

    code = "geometry_error"


class StageError(PipelineError):
    """A stage failed, for one study (``study_id``) or as a whole."""

    code = "stage_error"

    def __init__(self, message: str, *, study_id: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.study_id = study_id


class CheckpointError(PipelineError):
    """A checkpoint is missing, truncated or not a plain weights file."""

    code = "checkpoint_error"
