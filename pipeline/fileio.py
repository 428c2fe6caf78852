"""Atomic file writing, checksums and canonical JSON: the only way medpipe puts bytes on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utf8(text: str) -> str:
    """``text`` as UTF-8 can hold it: a file name's bytes that are not UTF-8 (a Latin-1 name from an old export),
    which come from the system as lone surrogates, as ``\\xNN``."""
    try:
        text.encode()
    except UnicodeEncodeError:
        try:
            return text.encode(errors="surrogateescape").decode(errors="backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no file name gives (a JSON escape): as \\udNNN
            return text.encode(errors="backslashreplace").decode()
    return text


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def writable(name: str) -> str:
    """``name`` (a file name, or a message naming files) as one line of UTF-8, as ``ls -b`` shows names: bytes
    that are not UTF-8 and characters that do not print (a newline, a terminal's escape) as ``\\xNN``, so that
    no name breaks a JSON file, forges a log line or drives the terminal that shows it."""
    if name.isprintable():  # the usual case, in one pass of C
        return name
    return "".join(char if char.isprintable() else _escaped(char) for char in _utf8(name))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators, so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only on success.

    The temporary name keeps the final suffix (``.nii.gz`` writers look at it) and starts
    with a dot, so a crash leaves no file under the final name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".partial{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _writable_json(obj: Any) -> Any:
    """``obj`` (JSON data) with every string, keys included, as UTF-8 can hold it (:func:`_utf8`)."""
    if isinstance(obj, str):
        return _utf8(obj)
    if isinstance(obj, dict):
        return {_utf8(k) if isinstance(k, str) else k: _writable_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_writable_json(v) for v in obj]
    return obj


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``text`` as UTF-8; a file name in it whose bytes are not UTF-8 is written as ``\\xNN`` (:func:`_utf8`)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = _utf8(text).encode("utf-8")
    write_bytes_atomic(path, data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`canonical_json` of ``obj`` as UTF-8; strings UTF-8 cannot hold are escaped first (:func:`_utf8`;
    escaping the text afterwards would break JSON's own escapes)."""
    text = canonical_json(obj)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = canonical_json(_writable_json(obj)).encode("utf-8")
    write_bytes_atomic(path, data)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def remove_partials(folder: str | os.PathLike[str]) -> int:
    """Delete leftovers of interrupted atomic writes under ``folder``; return how many."""
    count = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for leftover in root.rglob(".*.partial*"):
        if leftover.is_file():
            leftover.unlink()
            count += 1
    return count
