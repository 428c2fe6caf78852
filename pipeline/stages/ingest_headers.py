"""Reading every DICOM header of a scan folder, split over ingest's worker processes when there are many.

A scan folder's header walk is pure Python (about 0.5 ms a file), so with ``ingest.workers``
above 1 and enough files the files are read in chunks by isolated worker processes, under
ingest's memory and time limits, while this process waits. A chunk whose worker fails is read
again one file per job, so a file that crashes or exhausts a reader is set apart alone with
the reason and the rest of the scan goes on. A file that cannot be read (permissions, a failing
disk) is set apart too, as ``file_unreadable``: it may be a slice of a series. Headers come back
in file order, so the series found are the same whichever way they were read.

A deflated file is screened before pydicom reads it (every DICOM reader inflates the whole data
set in memory): one that would inflate past ``inflate_limit`` bytes is refused unread, a
decompression bomb or a data set too large for the workers. Screening here, where the header is
read anyway, costs nothing for the other files (a separate pass opened every file of the scan
again in the main process: 0.34 s for 24,000 files).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pipeline.errors import FileUnreadable, PackedFile
from pipeline.io.dicom_deflate import deflated_size_over
from pipeline.io.dicom_header import DicomHeader, read_header
from pipeline.isolation import Isolation, Reply, run_isolated, start_method
from pipeline.stages.ingest_listing import relative

log = logging.getLogger(__name__)

CHUNK_FILES = 64  # files per job: ~30 ms of reading, against ~1 ms to send a job and its headers back
MIN_PARALLEL_FILES = 2 * CHUNK_FILES  # below this, starting workers costs more than it saves

Broken = dict[Path, tuple[str, str]]


class Refused(Exception):  # noqa: N818 - a verdict on a file, returned in place of its header
    """A file set apart unread: its (code, message), returned in place of its header."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


def _screen(path: Path, rel: str, *, limit: int) -> None:
    """Refuse a deflated file that inflates past ``limit`` bytes (read_header's guard before pydicom)."""
    try:
        size = deflated_size_over(path, limit)
    except OSError:  # unreadable since read_header opened it: pydicom's read fails too, and records it
        return
    if size is not None:
        raise Refused("too_large", f"{rel}: a deflated DICOM file that inflates to more than {limit >> 20} MB (a "
                                   "decompression bomb, or a huge data set); not read. If it is genuine, raise "
                                   "ingest.memory_limit_mb")


def _read(path: Path, root: Path, guard: Callable[[Path, str], None]) -> DicomHeader | Refused | None:
    try:
        return read_header(path, root=root, rel=relative(root, path), guard=guard)
    except Refused as refused:
        return refused
    except FileUnreadable as exc:  # its message names no file: the name may be PHI no header revealed
        return Refused(exc.code, f"the file cannot be read ({exc.reason}); it was left out. If it belongs to a "
                                 "series, that series may be missing slices: fix the file's permissions or the "
                                 "storage and run ingest again (`find SCAN_DIR ! -readable` lists such files)")
    except PackedFile as exc:  # as unread as the above: its name is withheld too
        return Refused(exc.code, f"a {exc.kind} file: ingest does not look inside archives or compressed files, "
                                 "and it may hold scans. Unpack it into the scan folder and run ingest again, or "
                                 "remove it if it holds none")


def read_chunk(root: str, paths: Sequence[str], inflate_limit: int) -> list[DicomHeader | Refused | None]:
    """Headers of ``paths`` (None for files that are not DICOM objects of a series); a worker job."""
    base, guard = Path(root), functools.partial(_screen, limit=inflate_limit)
    return [_read(Path(path), base, guard) for path in paths]


def _read_in_process(root: Path, files: Sequence[Path],
                     inflate_limit: int) -> tuple[list[DicomHeader | Refused | None], Broken]:
    """Each header in this process; a file the reader fails on (a reader bug) is set apart, not fatal."""
    headers: list[DicomHeader | Refused | None] = []
    broken: Broken = {}
    guard = functools.partial(_screen, limit=inflate_limit)
    for path in files:
        try:
            headers.append(_read(path, root, guard))
        except Exception as exc:  # noqa: BLE001 - defence in depth against header-reader bugs on hostile files
            headers.append(None)
            message = (f"{relative(root, path)}: the DICOM header reader failed on this file ({type(exc).__name__}: "
                       f"{exc}); the file was left out and the rest converted. Please report it")
            broken[path] = ("dicom_reader_error", message)
    return headers, broken


def _read_in_workers(root: Path, chunks: list[list[Path]], *, workers: int, limits: Isolation,
                     inflate_limit: int) -> tuple[dict[int, list[DicomHeader | Refused | None]], dict[int, Reply]]:
    """Each chunk read by a worker: (headers by chunk index, failure replies by chunk index)."""
    jobs = [(read_chunk, (str(root), [str(p) for p in chunk], inflate_limit)) for chunk in chunks]
    done: dict[int, list[DicomHeader | Refused | None]] = {}
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
    return code, (f"{relative(root, path)}: reading its DICOM header failed in a worker process "
                  f"({message}); the file was left out and the rest converted")


def _set_apart(files: Sequence[Path], read: list[DicomHeader | Refused | None],
               broken: Broken) -> tuple[list[DicomHeader | None], Broken]:
    """Refused files moved from the headers to ``broken``."""
    headers: list[DicomHeader | None] = []
    for path, header in zip(files, read, strict=True):
        if isinstance(header, Refused):
            broken[path] = (header.code, header.message)
            header = None
        headers.append(header)
    return headers, broken


def _read_any(root: Path, files: list[Path], *, workers: int, limits: Isolation,
              inflate_limit: int) -> tuple[list[DicomHeader | Refused | None], Broken]:
    if workers <= 1 or len(files) < MIN_PARALLEL_FILES or start_method(limits.start_method) != "fork":
        return _read_in_process(root, files, inflate_limit)
    chunks = [files[i:i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)]
    done, failed = _read_in_workers(root, chunks, workers=workers, limits=limits, inflate_limit=inflate_limit)
    broken: Broken = {}
    if failed:
        suspects = [path for index in sorted(failed) for path in chunks[index]]
        log.warning("reading DICOM headers failed in %d worker job(s) of up to %d files; reading those %d files "
                    "one per job", len(failed), CHUNK_FILES, len(suspects))
        singles = [[path] for path in suspects]
        alone, still = _read_in_workers(root, singles, workers=workers, limits=limits, inflate_limit=inflate_limit)
        broken = {singles[index][0]: _broken(root, singles[index][0], reply) for index, reply in still.items()}
        by_path = {singles[index][0]: headers[0] for index, headers in alone.items()}
        for index in failed:
            done[index] = [by_path.get(path) for path in chunks[index]]
    return [header for index in range(len(chunks)) for header in done[index]], broken


def read_headers(root: Path, files: Sequence[Path], *, workers: int, limits: Isolation, inflate_limit: int,
                 prefetched: Mapping[str, DicomHeader | Refused | None] | None = None,
                 ) -> tuple[list[DicomHeader | None], Broken]:
    """The header of each of ``files``, in their order (None: not a DICOM object of a series, or broken),
    and the files set apart as broken or refused, each with (code, message).

    Worker processes read them only where they fork cheaply (``fork`` start method): under the
    forkserver each worker would import the readers again, which costs more than it saves.
    ``prefetched``: what :mod:`pipeline.stages.ingest_prefetch` read already, by path (``str``), under
    the same limits; only the other files are read here.
    """
    files = list(files)
    known = prefetched or {}
    rest = [path for path in files if str(path) not in known] if known else files
    read, broken = _read_any(root, rest, workers=workers, limits=limits, inflate_limit=inflate_limit)
    if known:
        fresh = iter(read)
        read = [known[text] if (text := str(path)) in known else next(fresh) for path in files]
    return _set_apart(files, read, broken)
