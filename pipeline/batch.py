"""The one batch loop: per-study work with continue-on-error, isolated worker processes or Ray, progress."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pipeline.errors import PipelineError
from pipeline.isolation import FORKSERVER_EXIT, Isolation, Reply, prestart_forkserver, run_isolated

if TYPE_CHECKING:
    from pipeline.config import ExecutionConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["STATS_ENV", "Isolation", "Loaded", "Outcome", "cpu_count", "outcome_summary", "prestart_workers",
           "run_batch", "set_worker_threads", "worker_threads"]

# Benchmark hook: a file that every run_batch appends one JSON line of timings to (see _Clock).
STATS_ENV = "MEDPIPE_BATCH_STATS"


@dataclass
class Outcome(Generic[T, R]):
    """The result of one item: ``result`` on success, ``code``/``message`` on failure."""

    item: T
    key: str
    result: R | None = None
    code: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


# ---- one core per worker ---------------------------------------------------------------------


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask: a container's, SLURM's or taskset's allotment)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(execution: ExecutionConfig | None, *, workers: int) -> int:
    """torch intra-op threads of each worker: ``execution.threads_per_worker`` when set, else the CPUs
    shared out, ``floor(cpus / workers)`` and at least 1 (on Ray: the ``num_cpus_per_task`` a task holds).

    One worker therefore uses every CPU and two workers on two CPUs one each: the workers never
    oversubscribe the cores, and ``threads_per_worker: 1`` makes every worker exactly one core.
    """
    explicit = getattr(execution, "threads_per_worker", None)
    if explicit:
        return max(1, int(explicit))
    if execution is not None and execution.backend == "ray":
        return max(1, int(execution.num_cpus_per_task))
    return max(1, cpu_count() // max(1, workers))


_THREADS: int | None = None  # the thread count of the worker running in this process (None: leave torch alone)
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch reads when it is imported
_SAVED_ENV: dict[str, str | None] | None = None


def set_worker_threads(threads: int | None) -> None:
    """This process is a worker with ``threads`` torch threads (``None``: no longer a worker).

    Applied at once if torch is loaded; otherwise through ``OMP_NUM_THREADS``, which torch reads
    when something imports it later (never imported here: ingest workers do not use torch);
    and again by :class:`Loaded` after its ``load()``, since loaders may set their own.
    """
    global _THREADS, _SAVED_ENV
    if threads and "torch" not in sys.modules:
        if _SAVED_ENV is None:
            _SAVED_ENV = {name: os.environ.get(name) for name in _THREAD_ENV}
        os.environ.update({name: str(threads) for name in _THREAD_ENV})
    elif not threads and _SAVED_ENV is not None:
        for name, value in _SAVED_ENV.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _SAVED_ENV = None
    _THREADS = threads
    _apply_threads()


def _apply_threads() -> None:
    if _THREADS and "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != _THREADS:
            torch.set_num_threads(_THREADS)


@dataclass(frozen=True)
class _Threaded(Generic[T, R]):
    """``fn`` run with this worker's torch thread count, in whichever process runs it."""

    fn: Callable[[T], R]
    threads: int | None

    def __call__(self, item: T) -> R:
        set_worker_threads(self.threads)
        return self.fn(item)


def prestart_workers(modules: Sequence[str]) -> None:
    """Start the forkserver that this command's worker processes will fork from, importing ``modules`` in it, now.

    For a batch whose study function imports torch and MONAI (seconds): called first thing in
    the command, the server's imports run while this process parses, discovers and plans,
    and the batch's workers then fork from the ready server instead of each importing them
    after the batch started. Without a batch, the server idles until the command exits.
    """
    prestart_forkserver([*modules, FORKSERVER_EXIT])


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a MemoryError (decoders wrap them in their own errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class Loaded(Generic[T, R]):
    """A per-study function with costly state (a model) built once per worker process or Ray actor.

    Subclass it as a picklable recipe (a dataclass of paths and settings whose ``repr`` names
    them) and implement ``load()``, which builds the state and returns the per-study function.
    Jobs carry only the recipe; each process keeps what ``load()`` built, keyed by the recipe.
    ``imports``: the slow modules ``load()`` needs (torch, MONAI); the forkserver that local workers
    fork from imports them once, and a Ray actor when it is created, instead of every worker on
    its first study.
    """

    imports: ClassVar[tuple[str, ...]] = ()

    def load(self) -> Callable[[T], R]:
        raise NotImplementedError

    def __call__(self, item: T) -> R:
        cache_key = f"{type(self).__module__}.{type(self).__qualname__}:{self!r}"
        loaded = _LOADED.get(cache_key)
        if loaded is None:
            _LOADED.clear()  # one recipe per process at a time: a new model replaces the old one
            loaded = _LOADED[cache_key] = self.load()
            _apply_threads()  # the batch's per-worker thread count wins over what load() set
        return loaded(item)


_LOADED: dict[str, Callable[[Any], Any]] = {}


def _call(fn: Callable[[T], R], item: T, key: str) -> Outcome[T, R]:
    try:
        return Outcome(item=item, key=key, result=fn(item))
    except PipelineError as exc:
        code = "out_of_memory" if _out_of_memory(exc) else exc.code
        return Outcome(item=item, key=key, code=code, message=str(exc))
    except MemoryError as exc:
        return Outcome(item=item, key=key, code="out_of_memory", message=f"ran out of memory ({exc or 'MemoryError'})")
    except RecursionError as exc:
        return Outcome(item=item, key=key, code="resource_error", message=f"RecursionError: {exc}")
    except Exception as exc:  # noqa: BLE001 - one study's unexpected failure must not stop the batch
        log.debug("unexpected error on %s:\n%s", key, traceback.format_exc())
        return Outcome(item=item, key=key, code="unexpected_error", message=f"{type(exc).__name__}: {exc}")


def _call_in_worker(fn: Callable[[T], R], item: T, key: str) -> Outcome[T, R]:
    """:func:`_call` in a worker process: the outcome goes back without the item, which the parent holds (and
    puts back). An ingest task holds every header of its series: echoing them cost the parent, for 24,000 files
    in 600 series, 24,000 headers unpickled a second time and the collections that walked them."""
    outcome = _call(fn, item, key)
    outcome.item = None  # type: ignore[assignment]
    return outcome


def _from_reply(reply: Reply, item: T, key: str, limits: Isolation) -> Outcome[T, R]:
    if reply[0] == "ok":
        outcome: Outcome[T, R] = reply[1]
        outcome.item = item
        if outcome.code == "out_of_memory" and limits.memory_limit_mb:
            outcome.message = (f"{outcome.message}; the worker's memory limit is {limits.memory_limit_mb} MB "
                               f"({limits.memory_setting})")
        return outcome
    _, code, message = reply
    if code in ("fatal_error", "decoder_panic"):  # an exception that escaped the study's own handling
        message = f"{message} (raised in its worker outside the study's own error handling; the study was abandoned)"
    return Outcome(item=item, key=key, code=code, message=message)


# ---- timings ---------------------------------------------------------------------------------


class _Clock:
    """When the items of one batch finished: total time, time to the first result (worker start-up,
    model loading and one study) and the steady rate, between the 10th and the 90th percentile of
    the finish times (no start-up, no tail). Logged and, where ``MEDPIPE_BATCH_STATS`` names a
    file, appended to it as one JSON line (what benchmarks/batch.py reads)."""

    def __init__(self, desc: str, **facts: Any) -> None:
        self.desc, self.facts = desc, facts
        self.start = time.perf_counter()
        self.times: list[float] = []

    def tick(self, count: int = 1) -> None:
        self.times.extend([time.perf_counter()] * count)

    def steady(self) -> float | None:
        n = len(self.times)
        low, high = (n // 10, n - 1 - n // 10) if n >= 10 else (0, n - 1)
        span = self.times[high] - self.times[low]
        return (high - low) / span if high > low and span > 0 else None

    def report(self) -> None:
        if not self.times:
            return
        total, first, steady = self.times[-1] - self.start, self.times[0] - self.start, self.steady()
        stats = {"desc": self.desc, **self.facts, "items": len(self.times), "seconds": round(total, 4),
                 "first_s": round(first, 4), "steady_per_s": round(steady, 3) if steady else None}
        log.info("%s: %d item(s) in %.2f s (first result after %.2f s%s)", self.desc, len(self.times), total,
                 first, f"; {steady:.1f}/s in between" if steady else "")
        path = os.environ.get(STATS_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(stats) + "\n")


class _NoBar:
    """What _bar gives where tqdm would draw nothing."""

    def update(self, n: int = 1) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to close."""


def _terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # None, a wrapper without isatty, a closed stream
        return False


def _bar(total: int, desc: str, initial: int = 0) -> Any:
    """A tqdm bar on a terminal or in a notebook; elsewhere (logs to a file, batch jobs) tqdm would hide its bar
    (``disable=None``), so it is not even imported: tqdm.auto costs a command 0.02-0.05 s (asyncio, IPython)."""
    if "IPython" not in sys.modules and not _terminal(sys.stderr):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="study", disable=None, leave=False, initial=initial)


# ---- the loop --------------------------------------------------------------------------------


def run_batch(
    items: Sequence[T],
    fn: Callable[[T], R],
    *,
    key: Callable[[T], str],
    workers: int = 1,
    desc: str = "studies",
    isolation: Isolation | None = None,
    execution: ExecutionConfig | None = None,
) -> Iterator[Outcome[T, R]]:
    """Apply ``fn`` to every item, yielding outcomes in input order; failures never stop the batch.

    With ``isolation`` (or ``workers > 1``) every item runs in a worker process (``fn`` and the
    items must pickle), under the isolation's memory and time limits: a worker that crashes,
    hangs or runs out of memory fails only its item, with a code saying which. Without
    either, items run in this process (``fn`` may then be a closure).

    ``execution.backend == "ray"`` runs the items as Ray tasks instead (a :class:`Loaded`
    ``fn`` on actors that load once), several studies per task, with the execution section's
    resources and retries; see :mod:`pipeline.ray_backend`. Outcomes and codes are the same
    whichever backend runs them. Each worker (process, task or actor) runs torch with
    :func:`worker_threads` threads; in this process only an explicit ``threads_per_worker`` applies.
    """
    keys = [key(item) for item in items]
    if execution is not None and execution.backend == "ray":
        from pipeline.ray_backend import run_on_ray

        threads = worker_threads(execution, workers=1)
        clock = _Clock(desc, backend="ray", threads=threads)
        bar = _bar(len(items), desc)
        try:
            outcomes = run_on_ray(items, fn, keys, execution=execution, call=_call_in_worker, threads=threads,
                                  arrived=clock.tick)
            for item, outcome in zip(items, outcomes, strict=True):  # in input order
                outcome.item = item
                bar.update()
                yield outcome
        finally:
            bar.close()
        clock.report()
        return
    if isolation is None and workers <= 1:
        yield from _in_process(items, fn, keys, desc=desc, threads=getattr(execution, "threads_per_worker", None))
        return
    yield from _in_workers(items, fn, keys, desc=desc, workers=workers, limits=isolation or Isolation(),
                           threads=worker_threads(execution, workers=workers))


def _in_process(items: Sequence[T], fn: Callable[[T], R], keys: list[str], *, desc: str,
                threads: int | None) -> Iterator[Outcome[T, R]]:
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    clock = _Clock(desc, backend="in-process", workers=1, threads=threads or before)
    bar = _bar(len(items), desc)
    try:
        set_worker_threads(threads)
        for item, item_key in zip(items, keys, strict=True):
            _apply_threads()  # again for every item: fn may import torch on its first one
            outcome = _call(fn, item, item_key)
            clock.tick()
            bar.update()
            yield outcome
    finally:
        bar.close()
        set_worker_threads(None)
        if threads and before and torch is not None:
            torch.set_num_threads(before)
        if isinstance(fn, Loaded):
            _LOADED.clear()  # in this process: do not keep a model alive after its batch
    clock.report()


def _in_workers(items: Sequence[T], fn: Callable[[T], R], keys: list[str], *, desc: str, workers: int,
                limits: Isolation, threads: int) -> Iterator[Outcome[T, R]]:
    clock = _Clock(desc, backend="local", workers=workers, threads=threads)
    wrapped = _Threaded(fn, threads)
    jobs = [(_call_in_worker, (wrapped, item, item_key)) for item, item_key in zip(items, keys, strict=True)]
    results: dict[int, Outcome[T, R]] = {}
    module = type(fn).__module__ if isinstance(fn, Loaded) else getattr(fn, "__module__", None)
    imports = fn.imports if isinstance(fn, Loaded) else ()
    preload = tuple(name for name in (module, *imports, __name__) if name)
    replies = run_isolated(jobs, workers=workers, limits=limits, preload=preload)
    bar = None
    try:
        for index, reply in replies:
            if bar is None:  # after the workers started: tqdm's monitor thread must not exist at fork
                bar = _bar(len(items), desc, initial=len(results))
            results[index] = _from_reply(reply, items[index], keys[index], limits)
            clock.tick()
            bar.update()
    finally:
        replies.close()
        if bar is not None:
            bar.close()
    clock.report()
    for i in range(len(items)):
        yield results[i]


def outcome_summary(outcomes: Sequence[Outcome[Any, Any]]) -> str:
    failed = [o for o in outcomes if not o.ok]
    return f"{len(outcomes) - len(failed)} ok, {len(failed)} failed"
