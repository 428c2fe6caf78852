"""Forked workers keep the parent's objects out of their garbage collections; the parent's collector is unchanged."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipeline.isolation import Isolation, run_isolated


def frozen_and_collected(_: int) -> tuple[int, int]:
    """In a worker: (objects the collector never walks, objects a full collection walks)."""
    gc.collect()
    return gc.get_freeze_count(), len(gc.get_objects())


def _reply(method: str) -> tuple[int, int]:
    [(index, reply)] = list(run_isolated([(frozen_and_collected, (0,))], workers=1,
                                         limits=Isolation(start_method=method), test_faults=False))  # type: ignore[arg-type]
    assert (index, reply[0]) == (0, "ok"), reply
    return reply[1]


def test_a_forked_worker_never_walks_the_parents_objects() -> None:
    before = gc.get_freeze_count()
    parent_objects = len(gc.get_objects())
    frozen, walked = _reply("fork")
    assert frozen >= 0.9 * parent_objects  # the parent's objects at the fork (a few freed since)
    assert walked < frozen // 10  # the child's collections walk only what it made itself
    assert gc.get_freeze_count() == before  # the parent's objects are collectable again


def test_garbage_alive_at_the_fork_is_still_collected_in_the_parent() -> None:
    class Cycle:
        pass

    node = Cycle()
    node.self = node  # type: ignore[attr-defined]  # freed only by a collection
    ref = weakref.ref(node)
    _reply("fork")  # node existed when the worker was forked
    del node
    gc.collect()
    assert ref() is None  # left frozen, the cycle would live as long as the process


@pytest.mark.parametrize("method", ["spawn"])
def test_other_start_methods_leave_the_collector_alone(method: str) -> None:
    before = gc.get_freeze_count()
    frozen, _ = _reply(method)
    assert frozen == 0  # a fresh interpreter froze nothing
    assert gc.get_freeze_count() == before
