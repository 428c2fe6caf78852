"""Ingest's default worker limits as plain numbers, importable before anything else: the config's defaults,
and what the header prefetch (``pipeline.stages.ingest_prefetch``) runs under before the config is read."""

from __future__ import annotations

INGEST_MEMORY_LIMIT_MB = 4096  # address space a worker may add to what it maps at start (ingest.memory_limit_mb)


def inflate_limit(memory_limit_mb: int | None) -> int:
    """Deflated DICOM files that would inflate past this many bytes (a quarter of a worker's memory limit) are
    refused unread: every DICOM reader, pydicom too (in this process, reading headers), inflates the whole set."""
    return (memory_limit_mb or INGEST_MEMORY_LIMIT_MB) * (1 << 20) // 4
