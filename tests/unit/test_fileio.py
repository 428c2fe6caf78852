"""Atomic writes, checksums and canonical JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.fileio import (
    atomic_path,
    canonical_json,
    remove_partials,
    sha256_file,
    writable,
    write_json_atomic,
    write_text_atomic,
)


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


@pytest.mark.parametrize(("name", "shown"), [
    ("M\udcfcller", "M\\xfcller"),  # os.fsdecode(b"M\xfcller")
    ("Müller", "Müller"),  # a UTF-8 name stays as it is
    ("x\ud800y", "x\\ud800y"),  # a lone surrogate no file name gives (a JSON escape)
    ("a\nWARNING forged", "a\\x0aWARNING forged"),  # a newline would forge a log line
    ("x\x1b[2J.nii.gz", "x\\x1b[2J.nii.gz"),  # a terminal escape would clear the screen that shows it
    ("zero\u200bwidth", "zero\\u200bwidth"),  # invisible: shown, so that two names never look alike
])
def test_writable_escapes_only_what_utf8_cannot_hold(name: str, shown: str) -> None:
    assert writable(name) == shown
    shown.encode("utf-8")


def test_json_and_text_holding_a_name_that_is_not_utf8_are_written_escaped(tmp_path: Path) -> None:
    name = "sc\udce4n/M\udcfcller"  # os.fsdecode(b"sc\xe4n/M\xfcller")
    write_json_atomic(tmp_path / "a.json", {name: [name, {"source": name}], "plain": "Müller"})
    text = (tmp_path / "a.json").read_bytes().decode("utf-8")  # strict
    assert json.loads(text) == {"sc\\xe4n/M\\xfcller": ["sc\\xe4n/M\\xfcller", {"source": "sc\\xe4n/M\\xfcller"}],
                                "plain": "Müller"}
    write_text_atomic(tmp_path / "a.csv", f"source\n{name}\n")
    assert (tmp_path / "a.csv").read_bytes().decode("utf-8") == "source\nsc\\xe4n/M\\xfcller\n"
