"""Listing a scan folder: every regular file under it in a fixed order, and a digest of the listing.

Scan folders can hold tens of thousands of files, and everything here runs in the main process
before any worker starts. So folders are read with ``os.scandir``, whose entries carry their
type (a regular file costs no system call of its own, where ``Path.is_symlink`` and ``is_file``
cost two), and relative paths are cut from path strings (``Path.relative_to`` costs about 10 us a
call, as much as listing the file). 24,000 files: 0.34 -> 0.14 s to list, 0.21 -> 0.15 s to digest
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.fileio import sha256_bytes

log = logging.getLogger(__name__)


def relative(root: Path, path: Path) -> str:
    """``path.relative_to(root).as_posix()`` for a ``path`` made by joining names to ``root``."""
    text, base = str(path), str(root)
    if base == "." and not text.startswith("/"):  # Path(".") / "a" is "a"
        return text
    if text.startswith(base) and text[len(base):len(base) + 1] == "/":
        return text[len(base) + 1:]
    return path.relative_to(root).as_posix()


def outside(path: Path, real_root: Path) -> bool:
    """Whether ``path``, links resolved, lies outside ``real_root`` (a resolved folder), or nowhere."""
    try:
        return not path.resolve(strict=True).is_relative_to(real_root)
    except (OSError, RuntimeError):  # a dangling link or a link loop
        return True


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk does
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()  # follows links: a link to a file inside the folder counts
    except OSError:
        return False


def _entries(root: Path, here: Path, real_root: Path) -> list[tuple[Path, bool]]:
    """(path, is a folder to enter) for what ``here`` holds, by name: regular files (links to files inside
    the root included) and folders that are not links; links leaving the root are reported and left out."""
    try:
        with os.scandir(here) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        log.warning("%s: this folder cannot be read (%s); its files are not ingested", relative(root, here),
                    exc.strerror)
        return []
    found = []
    for entry in entries:
        path = here / entry.name
        link = entry.is_symlink()
        if link and outside(path, real_root):
            log.warning("%s: a link pointing outside the scan folder (or nowhere); ignored", relative(root, path))
        elif _is_dir(entry):
            if not link:  # never followed into a linked folder
                found.append((path, True))
        elif _is_file(entry):
            found.append((path, False))
    return found


def list_scan_files(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """Every regular file under ``root``, sorted (``sorted(paths)``'s order: each folder's entries by name,
    a subfolder's files in its place among them).

    Links are never followed into folders; a link pointing outside ``root`` (or nowhere) is left
    out with a warning; ``exclude`` (a resolved folder, such as an output folder inside the scan
    folder) is not listed. A folder that cannot be read is reported and its files left out.
    """
    real_root = root.resolve()
    if exclude is not None and real_root.is_relative_to(exclude):
        return []
    files: list[Path] = []
    pending = [iter(_entries(root, root, real_root))]  # a stack, not recursion: folders may nest deeply
    while pending:
        step = next(pending[-1], None)
        if step is None:
            pending.pop()
            continue
        path, folder = step
        if not folder:
            files.append(path)
        elif exclude is None or not path.resolve().is_relative_to(exclude):
            pending.append(iter(_entries(root, path, real_root)))
    return files


def listing_digest(root: Path, files: list[Path]) -> str:
    """Names, sizes and change times: a file replaced at the same path changes its ctime even when it keeps
    its size and mtime (``cp -p``, ``touch -r``), so the stage runs again and rechecks contents by checksum."""
    lines = [str(root.resolve())]
    for path in files:
        st = os.stat(path)
        lines.append(f"{relative(root, path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}")
    return sha256_bytes("\n".join(lines).encode())
