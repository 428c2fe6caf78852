"""Atomic writes, checksums and canonical JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.fileio import atomic_path, canonical_json, remove_partials, sha256_file, write_json_atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces_previous_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise OSError(28, "No space left on device")
    assert target.read_text() == canonical_json({"v": 1})


def test_canonical_json_is_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_sha256_and_partials(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / ".f.x1.partial.nii.gz").write_bytes(b"junk")
    assert remove_partials(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
