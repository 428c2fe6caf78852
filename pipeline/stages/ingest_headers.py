"""Reading every DICOM header of a scan folder, split over ingest's worker processes when there are many.

A scan folder's header walk is pure Python (about 0.5 ms a file), so with ``ingest.workers``
above 1 and enough files the files are read in chunks by isolated worker processes, under
ingest's memory and time limits, while this process waits. A chunk whose worker fails is read
again one file per job, so a file that crashes or exhausts a reader is set apart alone with
the reason and the rest of the scan goes on. Headers come back in file order, so the series
found are the same whichever way they were read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.io.dicom import DicomHeader, read_header
from pipeline.isolation import Isolation, Reply, run_isolated, start_method

log = logging.getLogger(__name__)

CHUNK_FILES = 64  # files per job: ~30 ms of reading, against ~1 ms to send a job and its headers back
MIN_PARALLEL_FILES = 2 * CHUNK_FILES  # below this, starting workers costs more than it saves

Broken = dict[Path, tuple[str, str]]


def read_chunk(root: str, paths: Sequence[str]) -> list[DicomHeader | None]:
    """Headers of ``paths`` (None for files that are not DICOM objects of a series); a worker job."""
    base = Path(root)
    return [read_header(Path(path), root=base) for path in paths]


def _read_in_process(root: Path, files: Sequence[Path]) -> tuple[list[DicomHeader | None], Broken]:
    """Each header in this process; a file the reader fails on (a reader bug) is set apart, not fatal."""
    headers: list[DicomHeader | None] = []
    broken: Broken = {}
    for path in files:
        try:
            headers.append(read_header(path, root=root))
        except Exception as exc:  # noqa: BLE001 - defence in depth against header-reader bugs on hostile files
            headers.append(None)
            rel = path.relative_to(root).as_posix()
            message = (f"{rel}: the DICOM header reader failed on this file ({type(exc).__name__}: {exc}); the "
                       "file was left out and the rest converted. Please report it")
            broken[path] = ("dicom_reader_error", message)
    return headers, broken


def _read_in_workers(root: Path, chunks: list[list[Path]], *, workers: int,
                     limits: Isolation) -> tuple[dict[int, list[DicomHeader | None]], dict[int, Reply]]:
    """Each chunk read by a worker: (headers by chunk index, failure replies by chunk index)."""
    jobs = [(read_chunk, (str(root), [str(p) for p in chunk])) for chunk in chunks]
    done: dict[int, list[DicomHeader | None]] = {}
    failed: dict[int, Reply] = {}
    for index, reply in run_isolated(jobs, workers=workers, limits=limits, preload=(__name__,), test_faults=False):
        if reply[0] == "ok":
            done[index] = reply[1]
        else:
            failed[index] = reply
    return done, failed


def _broken(root: Path, path: Path, reply: Reply) -> tuple[str, str]:
    _, code, message = reply
    code = "dicom_reader_error" if code == "fatal_error" else code  # an exception inside the reader
    return code, (f"{path.relative_to(root).as_posix()}: reading its DICOM header failed in a worker process "
                  f"({message}); the file was left out and the rest converted")


def read_headers(root: Path, files: Sequence[Path], *, workers: int,
                 limits: Isolation) -> tuple[list[DicomHeader | None], Broken]:
    """The header of each of ``files``, in their order (None: not a DICOM object of a series, or broken),
    and the files set apart as broken, each with (code, message).

    Worker processes read them only where they fork cheaply (``fork`` start method): under the
    forkserver each worker would import the readers again, which costs more than it saves.
    """
    files = list(files)
    if workers <= 1 or len(files) < MIN_PARALLEL_FILES or start_method(limits.start_method) != "fork":
        return _read_in_process(root, files)
    chunks = [files[i:i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)]
    done, failed = _read_in_workers(root, chunks, workers=workers, limits=limits)
    broken: Broken = {}
    if failed:
        suspects = [path for index in sorted(failed) for path in chunks[index]]
        log.warning("reading DICOM headers failed in %d worker job(s) of up to %d files; reading those %d files "
                    "one per job", len(failed), CHUNK_FILES, len(suspects))
        singles = [[path] for path in suspects]
        alone, still = _read_in_workers(root, singles, workers=workers, limits=limits)
        broken = {singles[index][0]: _broken(root, singles[index][0], reply) for index, reply in still.items()}
        by_path = {singles[index][0]: headers[0] for index, headers in alone.items()}
        for index in failed:
            done[index] = [by_path.get(path) for path in chunks[index]]
    return [header for index in range(len(chunks)) for header in done[index]], broken
