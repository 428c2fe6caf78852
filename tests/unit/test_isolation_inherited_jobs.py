"""Forked workers take their jobs from the batch they inherited: only indices cross the pipe, nothing is pickled."""

from __future__ import annotations

import threading

from pipeline.isolation import Isolation, run_isolated


class Counted:
    """Counts how often an instance is pickled in this process."""

    pickled = 0

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[type, tuple[int]]:
        Counted.pickled += 1
        return Counted, (self.value,)


def doubled(item: Counted) -> int:
    return 2 * item.value


def locked(lock: threading.Lock, value: int) -> int:  # a lock never pickles
    with lock:
        return value + 1


def _run(jobs: list, method: str) -> dict[int, tuple]:
    return dict(run_isolated(jobs, workers=2, limits=Isolation(start_method=method), test_faults=False))


def test_forked_workers_are_sent_indices_not_pickled_jobs() -> None:
    Counted.pickled = 0
    replies = _run([(doubled, (Counted(v),)) for v in range(5)], "fork")
    assert replies == {i: ("ok", 2 * i) for i in range(5)}
    assert Counted.pickled == 0  # the old protocol pickled every job: 5


def test_a_job_that_cannot_pickle_runs_in_a_forked_worker() -> None:
    lock = threading.Lock()
    assert _run([(locked, (lock, 1))], "fork") == {0: ("ok", 2)}


def test_the_forkserver_still_pickles_and_reports_what_cannot_be() -> None:
    Counted.pickled = 0
    replies = _run([(doubled, (Counted(3),)), (locked, (threading.Lock(), 1))], "forkserver")
    assert replies[0] == ("ok", 6) and Counted.pickled == 1
    assert replies[1][:2] == ("failed", "unpicklable_task")
