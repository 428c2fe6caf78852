"""The header prefetch: a helper forked at the start of `medpipe ingest` reads what the workers would, no more."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.isolation import Isolation
from pipeline.limits import INGEST_MEMORY_LIMIT_MB, inflate_limit
from pipeline.stages import ingest_headers, ingest_prefetch
from pipeline.stages.ingest_headers import read_headers
from pipeline.stages.ingest_prefetch import CHUNK_FILES, HeaderPrefetch, start_prefetch
from tests.fixtures.dicom_writer import write_series

LIMITS = Isolation(memory_limit_mb=INGEST_MEMORY_LIMIT_MB, start_method="fork", timeout_s=60)
INFLATE = inflate_limit(INGEST_MEMORY_LIMIT_MB)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the prefetch forks")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two series (past two chunks of the helper) and two files that are not DICOM."""
    root = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_series(root / name, rng.integers(0, 500, size=(4, 3, 40)).astype(np.int16), series_tag=name)
    (root / "notes.txt").write_text("not a DICOM file")
    (root / "b" / "README").write_bytes(b"\0" * 300)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) > 2 * CHUNK_FILES
    return root, files


def _finished(prefetch: HeaderPrefetch | None) -> HeaderPrefetch:
    """The helper, waited for until it has read everything (take() would stop it where it is)."""
    assert prefetch is not None, "the prefetch did not start (one CPU, threads running, or no fork)"
    _, status = os.waitpid(prefetch.pid, 0)
    prefetch.pid = 0  # reaped here
    assert os.WIFEXITED(status), status
    return prefetch


def _take(prefetch: HeaderPrefetch, root: Path, *, memory_limit_mb: int | None = INGEST_MEMORY_LIMIT_MB) -> dict:
    return prefetch.take(root, memory_limit_mb=memory_limit_mb)


def test_prefetched_headers_are_those_ingest_reads(scan: tuple[Path, list[Path]]) -> None:
    root, files = scan
    prefetch = _finished(start_prefetch(root, out=None, method="fork"))
    found = _take(prefetch, root)
    assert sorted(found) == [str(p) for p in files]  # every file, the non-DICOM ones too (their verdict: None)
    assert sum(v is None for v in found.values()) == 2
    expected = read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE)
    assert repr(read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE, prefetched=found)) \
        == repr(expected)
    assert prefetch.fd == -1 and prefetch.pid == 0  # nothing left open or running


def test_only_files_not_prefetched_are_read_again(scan: tuple[Path, list[Path]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, files = scan
    prefetch = _finished(start_prefetch(root, out=None, method="fork"))
    found = _take(prefetch, root)
    partial = {path: found[path] for path in list(found)[:CHUNK_FILES]}  # a helper stopped after one chunk
    read: list[str] = []
    original = ingest_headers._read

    def counted(path: Path, base: Path, guard):  # type: ignore[no-untyped-def]
        read.append(str(path))
        return original(path, base, guard)

    monkeypatch.setattr(ingest_headers, "_read", counted)
    expected = repr(read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE))
    read.clear()
    assert repr(read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE,
                             prefetched=partial)) == expected
    assert read == [str(p) for p in files if str(p) not in partial]


def test_a_cut_short_chunk_is_left_out() -> None:
    records = [logging.LogRecord("pipeline.io.dicom_header", logging.DEBUG, __file__, 1, "m", None, None)]
    first = ingest_prefetch._frame(["a", "b"], [None, None], records)
    second = ingest_prefetch._frame(["c"], [None], [])
    replayed: list[logging.LogRecord] = []
    assert ingest_prefetch._chunks(first + second[:-1], replay=replayed.append) == {"a": None, "b": None}
    assert [r.getMessage() for r in replayed] == ["m"]
    assert ingest_prefetch._chunks(first + second, replay=replayed.append) == {"a": None, "b": None, "c": None}


@pytest.mark.parametrize("change", ["root", "memory"])
def test_results_read_under_other_settings_are_dropped(scan: tuple[Path, list[Path]], change: str) -> None:
    root, _ = scan
    prefetch = _finished(start_prefetch(root, out=None, method="fork"))
    if change == "root":
        assert _take(prefetch, root / "a") == {}
    else:
        assert _take(prefetch, root, memory_limit_mb=2 * INGEST_MEMORY_LIMIT_MB) == {}
    assert prefetch.fd == -1


def test_a_helper_that_fails_on_a_file_delivers_the_chunks_before_it(scan: tuple[Path, list[Path]],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root, files = scan
    victim = files[CHUNK_FILES + 3]
    original = ingest_headers._read

    def broken(path: Path, base: Path, guard):  # type: ignore[no-untyped-def]
        if path == victim:
            raise RuntimeError("a reader bug")
        return original(path, base, guard)

    monkeypatch.setattr(ingest_headers, "_read", broken)  # forked with it: the helper's reader
    prefetch = start_prefetch(root, out=None, method="fork")
    monkeypatch.setattr(ingest_headers, "_read", original)
    found = _take(_finished(prefetch), root)
    assert sorted(found) == [str(p) for p in files[:CHUNK_FILES]]
    assert repr(read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE, prefetched=found)) \
        == repr(read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE))


def test_take_stops_a_running_helper(scan: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = scan
    original = ingest_headers._read

    def slow(path: Path, base: Path, guard):  # type: ignore[no-untyped-def]
        if path.name == "IM0005.dcm":
            os.kill(os.getpid(), signal.SIGSTOP)  # the helper hangs on this file until killed
        return original(path, base, guard)

    monkeypatch.setattr(ingest_headers, "_read", slow)
    prefetch = start_prefetch(root, out=None, method="fork")
    monkeypatch.setattr(ingest_headers, "_read", original)
    assert prefetch is not None
    pid = prefetch.pid
    assert _take(prefetch, root) == {}  # stopped in its first chunk: nothing finished
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # killed and reaped


def test_replayed_log_records_reach_this_process(scan: tuple[Path, list[Path]],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    root, _ = scan
    with caplog.at_level(logging.DEBUG, logger="pipeline.io.dicom_header"):
        prefetch = _finished(start_prefetch(root, out=None, method="fork"))
        caplog.clear()
        _take(prefetch, root)
    assert sorted(r.getMessage() for r in caplog.records if r.name == "pipeline.io.dicom_header") == [
        "b/README: not a DICOM file; ignored", "notes.txt: not a DICOM file; ignored"]


def test_the_command_line_reads_headers_while_it_imports(scan: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """`medpipe ingest` (and its --dry-run) forks the helper before importing numpy or pydantic, and uses what
    it read."""
    root, files = scan
    code = ("import sys; import pipeline.cli, pipeline.stages.ingest_prefetch, pipeline.io.dicom_header, "
            "pipeline.stages.ingest_headers, pipeline.io.dicom_mosaic; "  # a mosaic's header: no numpy either
            "print(sorted(m for m in ('numpy', 'pydantic', 'nibabel', 'yaml', 'pydicom') if m in sys.modules))")
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "[]"  # what the command and the helper import before the fork
    done = subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(root), "--out", str(tmp_path / "out"),
                           "--workers", "2", "-vv"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    taken = re.search(r"header prefetch: (\d+) file\(s\) read while the command started", done.stderr)
    assert taken is not None and int(taken.group(1)) <= len(files)  # all of them, unless this machine is loaded
    assert "ingest: complete (2 ok" in done.stdout
    listed = subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(root), "--dry-run", "-vv"],
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "header prefetch:" in listed.stderr and "to convert: 2 (2 dicom" in listed.stdout  # --dry-run too
