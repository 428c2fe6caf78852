"""Reading a scan folder's DICOM headers while ``medpipe ingest`` is still starting up.

Before ingest reads its first header, the command imports numpy, pydantic, nibabel and medpipe's
stages and validates its config: about 0.3 s on one core, while the machine's other cores wait.
So the command line starts a helper process right after parsing its arguments, before those
imports (:func:`start_prefetch`). The helper imports only the header readers (no numpy, nibabel
or pydantic), lists the scan folder as ingest does and reads each file's header in ingest's
order, exactly as a worker job does (:func:`pipeline.stages.ingest_headers.read_chunk`), in
chunks, under ingest's default memory limit. It appends each finished chunk to an anonymous
in-memory file, with the log records its reading emitted.

When ingest reaches its header phase, :meth:`HeaderPrefetch.take` stops the helper (a chunk it
was still writing is incomplete and ignored) and returns what it finished: each file's header,
or its verdict (not DICOM, refused, unreadable, an archive), with the log records replayed in
this process, where ingest's PHI filters see them. The files the helper did not reach are read
as before, by worker jobs under the configured limits. A helper that crashed on a file (a reader
bug, a hostile file) has only delivered fewer chunks: that file and the ones after it are read
again by the isolated workers, which set the culprit apart with the reason.

The results are used only where they are what ingest itself would read: the same scan folder
(each file by its path) and the same memory and inflate limits (else all are dropped). A file
changed between the helper's read and its conversion is caught by the header digest that
conversion checks, as for any file changed after discovery. Headers hold patient data: the
helper's file lives in memory (``memfd``), never in a folder, and is gone with the processes.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.isolation import StartMethod, limit_memory, replay, send_logs_to, start_method
from pipeline.limits import INGEST_MEMORY_LIMIT_MB, inflate_limit

log = logging.getLogger(__name__)

CHUNK_FILES = 32  # files per appended chunk: ~15 ms of reading, what a stopped helper may lose
_LENGTH = struct.Struct("<Q")


class _Records(list[logging.LogRecord]):
    """Where the helper's log records wait for their chunk (:func:`pipeline.isolation.send_logs_to`)."""

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.append(record)


def _anonymous_file() -> int:
    """A file descriptor of an unnamed file in memory (Linux), else of an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("medpipe-headers", os.MFD_CLOEXEC)
    handle = tempfile.TemporaryFile()  # noqa: SIM115 - its descriptor outlives the object: duplicated
    try:
        return os.dup(handle.fileno())
    finally:
        handle.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _helper(fd: int, root: Path, out: Path | None, memory_limit_mb: int | None, parent: int) -> None:
    """The helper's work; the process exits after it (see :func:`start_prefetch`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle; it stops the helper
    gc.disable()  # headers hold no cycles, and the helper lives for seconds at most
    from pipeline.stages.ingest_headers import read_chunk
    from pipeline.stages.ingest_listing import scan_listing

    records = _Records()
    send_logs_to(records)  # the command writes them, after replaying them
    limit_memory(memory_limit_mb)
    files = [str(path) for path in scan_listing(root, exclude=None if out is None else out.resolve()).files]
    limit = inflate_limit(memory_limit_mb)
    for start in range(0, len(files), CHUNK_FILES):
        if os.getppid() != parent:  # the command is gone
            return
        chunk = files[start:start + CHUNK_FILES]
        read = read_chunk(str(root), chunk, limit)
        _write_all(fd, _frame(chunk, read, records[:]))
        records.clear()


def _frame(paths: list[str], read: list[Any], records: list[logging.LogRecord]) -> bytes:
    """One chunk as the helper appends it: its length, then (paths, results, log records) pickled."""
    payload = pickle.dumps((paths, read, records), protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


class HeaderPrefetch:
    """A running helper (see the module's text); :meth:`take` its results once, :meth:`close` it in any case."""

    def __init__(self, *, root: Path, pid: int, fd: int, memory_limit_mb: int | None) -> None:
        self.root, self.pid, self.fd, self.memory_limit_mb = root, pid, fd, memory_limit_mb

    def close(self) -> None:
        """Stop the helper (if it still runs) and free its file; idempotent."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # exited and reaped by someone else: nothing to stop
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def take(self, root: Path, *, memory_limit_mb: int | None) -> dict[str, Any]:
        """What the helper read, by file path (``str``): each result as ``read_chunk`` returns it; empty when
        the helper read another folder or under another memory limit than ``memory_limit_mb`` (the config's;
        the inflate limit follows from it, :func:`pipeline.limits.inflate_limit`), or read nothing. Stops the
        helper."""
        fd = self.fd
        self.fd = -1  # read below, closed here
        self.close()
        if fd < 0:
            return {}
        try:
            if str(root) != str(self.root) or memory_limit_mb != self.memory_limit_mb:
                log.debug("header prefetch dropped: another folder or other limits than the config's")
                return {}
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
        finally:
            os.close(fd)
        found = _chunks(data, replay=replay)
        log.debug("header prefetch: %d file(s) read while the command started", len(found))
        return found


def _chunks(data: bytes, *, replay: Callable[[logging.LogRecord], None]) -> dict[str, Any]:
    """The complete chunks in ``data``, by path (a last chunk cut short by the helper's stop is left out)."""
    found: dict[str, Any] = {}
    view, offset = memoryview(data), 0
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + length
        if end > len(data):
            break
        paths, read, records = pickle.loads(view[offset + _LENGTH.size:end])
        found.update(zip(paths, read, strict=True))
        for record in records:
            replay(record)
        offset = end
    return found


def start_prefetch(scan_dir: Path, *, out: Path | None, memory_limit_mb: int | None = INGEST_MEMORY_LIMIT_MB,
                   method: StartMethod = "auto") -> HeaderPrefetch | None:
    """Fork the helper that reads ``scan_dir``'s headers (``out``: the output folder, left out of its listing,
    as ingest leaves it out). None where it cannot help or is not safe: a single CPU, a folder that is not
    one (ingest says why), or where ingest's workers would not fork either (no ``fork``, other threads
    running, torch loaded: :func:`pipeline.isolation.start_method`; ``method`` "fork" overrides that, as it
    does for ingest's workers). Call it before the heavy imports: that is the time it uses."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not hasattr(os, "fork") or cpus < 2 or start_method(method) != "fork" or not scan_dir.is_dir():
        return None
    fd = _anonymous_file()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the helper: whatever happens, it ends here, without the command's exit handlers
        code = 0
        try:
            _helper(fd, scan_dir, out, memory_limit_mb, parent)
        except BaseException:  # noqa: BLE001 - a reader bug stops the helper; ingest reads the rest in its workers
            code = 1
        os._exit(code)
    return HeaderPrefetch(root=scan_dir, pid=pid, fd=fd, memory_limit_mb=memory_limit_mb)
