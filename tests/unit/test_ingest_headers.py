"""Header reading over worker processes: same headers as in-process, and a file that breaks a worker fails alone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.dicom import group_series
from pipeline.isolation import Isolation
from pipeline.stages import ingest_headers
from pipeline.stages.ingest_headers import CHUNK_FILES, MIN_PARALLEL_FILES, read_headers
from tests.fixtures.bad_inputs import write_deflate_bomb
from tests.fixtures.dicom_writer import write_series

LIMITS = Isolation(start_method="fork", timeout_s=60)
INFLATE = 1 << 30


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Three series of 50 slices each (files past two chunks) plus two files that are not DICOM."""
    root = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_series(root / name, rng.integers(0, 500, size=(4, 3, 50)).astype(np.int16), series_tag=name)
    (root / "notes.txt").write_text("not a DICOM file")
    (root / "b" / "README").write_bytes(b"\0" * 300)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) >= MIN_PARALLEL_FILES
    return root, files


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = ingest_headers.run_isolated

    def counted(jobs, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(jobs))
        return original(jobs, **kwargs)

    monkeypatch.setattr(ingest_headers, "run_isolated", counted)
    return calls


def test_workers_read_the_same_headers_in_the_same_order(scan: tuple[Path, list[Path]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, files = scan
    calls = _spy(monkeypatch)
    serial, serial_broken = read_headers(root, files, workers=1, limits=LIMITS, inflate_limit=INFLATE)
    assert calls == []
    parallel, parallel_broken = read_headers(root, files, workers=2, limits=LIMITS, inflate_limit=INFLATE)
    assert calls == [-(-len(files) // CHUNK_FILES)]  # one job per chunk
    assert serial_broken == parallel_broken == {}
    assert repr(serial) == repr(parallel)
    assert sum(h is None for h in parallel) == 2
    scan_serial, scan_parallel = group_series(serial), group_series(parallel)
    assert [(s.folder, len(s.headers)) for s in scan_parallel.series] == [("a", 50), ("b", 50), ("c", 50)]
    assert repr(scan_serial) == repr(scan_parallel)


def test_few_files_are_read_in_this_process(scan: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, files = scan
    calls = _spy(monkeypatch)
    headers, _ = read_headers(root, files[:MIN_PARALLEL_FILES - 1], workers=2, limits=LIMITS, inflate_limit=INFLATE)
    assert calls == [] and len(headers) == MIN_PARALLEL_FILES - 1
    read_headers(root, files, workers=2, limits=Isolation(start_method="forkserver"), inflate_limit=INFLATE)
    assert calls == []  # workers that import the readers again would cost more than they save


@pytest.mark.parametrize(("how", "code"), [("crash", "worker_crashed"), ("raise", "dicom_reader_error")])
def test_a_file_that_breaks_the_reader_is_set_apart_alone(scan: tuple[Path, list[Path]],
                                                          monkeypatch: pytest.MonkeyPatch, how: str,
                                                          code: str) -> None:
    root, files = scan
    victim = root / "b" / "IM0007.dcm"
    assert victim in files
    original = ingest_headers.read_header

    def fragile(path: Path, *, root: Path, **options):  # type: ignore[no-untyped-def]
        if path == victim:
            if how == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            raise ValueError("a reader bug")
        return original(path, root=root, **options)

    monkeypatch.setattr(ingest_headers, "read_header", fragile)  # inherited by the forked workers
    headers, broken = read_headers(root, files, workers=2, limits=LIMITS, inflate_limit=INFLATE)
    assert list(broken) == [victim]
    assert broken[victim][0] == code and broken[victim][1].startswith("b/IM0007.dcm: ")
    if how == "crash":
        assert "SIGSEGV" in broken[victim][1]
    else:
        assert "(ValueError: a reader bug); the file was left out" in broken[victim][1]
    expected, _ = read_headers(root, [p for p in files if p != victim], workers=1, limits=LIMITS, inflate_limit=INFLATE)
    assert repr([h for p, h in zip(files, headers, strict=True) if p != victim]) == repr(expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_deflate_bomb_is_refused_where_its_header_is_read(tmp_path: Path, workers: int) -> None:
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        write_series(tmp_path / name, rng.integers(0, 500, size=(4, 3, 45)).astype(np.int16), series_tag=name)
    bomb = tmp_path / "b" / "bomb.dcm"
    write_deflate_bomb(bomb, inflated_mib=8, rows=64, columns=64)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) >= MIN_PARALLEL_FILES  # with 2 workers, read by the workers
    headers, broken = read_headers(tmp_path, files, workers=workers, limits=LIMITS, inflate_limit=4 << 20)
    assert list(broken) == [bomb] and broken[bomb] == (
        "too_large", "b/bomb.dcm: a deflated DICOM file that inflates to more than 4 MB (a decompression bomb, or "
                     "a huge data set); not read. If it is genuine, raise ingest.memory_limit_mb")
    assert headers[files.index(bomb)] is None and sum(h is not None for h in headers) == 135
    headers, broken = read_headers(tmp_path, files, workers=workers, limits=LIMITS, inflate_limit=16 << 20)
    assert broken == {} and headers[files.index(bomb)] is not None  # under the limit: read as usual


def test_ingest_with_header_reading_workers_writes_the_same_outputs(scan: tuple[Path, list[Path]], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import validate
    from pipeline.stages.ingest import ingest

    root, files = scan
    calls = _spy(monkeypatch)
    monkeypatch.setattr(ingest_headers, "start_method", lambda requested: "fork")  # even if torch is loaded
    for workers in (1, 2):
        record = ingest(root, tmp_path / f"w{workers}", config=validate({"ingest": {"workers": workers}}))
        assert record["status"] == "complete" and record["counts"]["ok"] == 3
    for name in ("manifest.json", *sorted(p.relative_to(tmp_path / "w1").as_posix()
                                          for p in (tmp_path / "w1" / "images").iterdir())):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert calls == [-(-len(files) // CHUNK_FILES)]  # the 2-worker run read the headers in workers
