"""Giving memory that Python has freed back to the operating system, where the C library allows it.

glibc keeps freed blocks below its (adaptive) mmap threshold in the process heap, resident: a
worker that frees a few hundred DICOM files of 0.5 MB each, one by one, would keep them all
in its resident size until it exits. ``malloc_trim`` returns such free pages. Elsewhere (musl,
macOS) ``trim_heap`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library to load, or one without malloc_trim
        return None


def trim_heap() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); True when anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
