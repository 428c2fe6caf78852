"""Keeping Python's cyclic garbage collector off a stage's large, long-lived, acyclic objects.

A collection of the oldest generation walks every tracked object, and it runs again each time
the objects made since the last one reach a quarter of those it kept. Reading the headers of
24,000 files, the main process builds (or unpickles from the workers) some 120,000 objects:
headers, frames, geometries and their tuples, none of them in a reference cycle. The collections
that this triggered found nothing to free and walked the growing heap again and again, and once
they were built, every later collection of the oldest generation walked them again while the
studies converted: 0.37-0.43 s of the main process's time. With the collector paused while they
are built and the result kept out of later collections: 0.05-0.06 s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside (only for code whose objects form no cycles); as before afterwards.

    A process forked inside inherits the paused collector: worker processes enable their own
    (pipeline.isolation does).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


_FROZEN = [0]  # how many frozen() blocks are open in this process


@contextmanager
def frozen() -> Iterator[None]:
    """The objects alive on entry left out of every collection until the outermost ``frozen()`` block ends
    (``gc.freeze``; ``gc.unfreeze`` when the last one closes, which also returns objects frozen by others).

    Objects that die meanwhile are freed as usual (by reference counting) unless they are in a
    reference cycle: those wait for the end of the outermost block.
    """
    gc.freeze()
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1
        if not _FROZEN[0]:
            gc.unfreeze()


@contextmanager
def long_lived(build: Callable[[], T]) -> Iterator[T]:
    """``build()``'s result, built with the collector paused and then, with everything else alive, kept out of
    the collections inside the block (:func:`frozen`). For objects that live to the end of the block and form
    no cycles worth collecting: a stage's headers and tasks; a command's config and the modules it imports
    (``medpipe ingest``: 0.02-0.03 s of young and full collections walking them, benchmarks/RESULTS.md)."""
    with ExitStack() as stack:
        with collector_paused():
            value = build()
            stack.enter_context(frozen())  # before the collector resumes: not even one young collection walks them
        yield value
