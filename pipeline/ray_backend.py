"""The Ray backend of run_batch: studies in chunks on Ray tasks (or model-holding actors), retried per study.

Why chunks: a Ray task costs about a millisecond of scheduling and (object store, worker
wake-up) latency, and a small study converts in about ten; one study per task spends a
tenth of the cluster on overhead. A chunk of studies per task (``execution.chunk_size``,
or sized automatically so that a task takes about ``CHUNK_SECONDS``) makes that negligible,
and every worker slot keeps ``IN_FLIGHT`` chunks queued so that it never waits for the
driver between them. Failures stay per study: a study's own error comes back as its failed
outcome inside the chunk; a chunk whose worker is lost is split and each of its studies
runs alone, so only a study that kills its worker again and again is given up on.
"""

from __future__ import annotations

import importlib
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, StageError

if TYPE_CHECKING:
    from pipeline.batch import Outcome
    from pipeline.config import ExecutionConfig

log = logging.getLogger(__name__)

__all__ = ["CHUNK_SECONDS", "ensure_ray", "prestart", "run_on_ray"]

LOST = "worker_lost"
CHUNK_SECONDS = 0.2  # automatic chunks hold about this much work
IN_FLIGHT = 2  # chunks queued per worker slot (task slot or actor)
_SAMPLES = 64  # study durations the automatic chunk size is taken from (the latest)


def ensure_ray(execution: ExecutionConfig) -> Any:
    """The ``ray`` module, connected to ``execution.address`` (else ``$RAY_ADDRESS``, else a local Ray started now).

    A local Ray is a new one: an unrelated cluster that happens to run on this machine
    (``ray start`` without ``--address``) is never joined by accident.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("execution.backend is 'ray' but Ray is not installed; pip install 'medpipe[ray]' "
                          "or use --backend local") from None
    if not ray.is_initialized():
        address = execution.address or os.environ.get("RAY_ADDRESS") or "local"
        where = "a new local Ray" if address == "local" else address
        log.info("connecting to %s", where)
        started = time.perf_counter()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {where} ({exc}); start it with "
                              "'ray start --head' or give the right --address") from None
        log.info("connected to %s in %.1f s", where, time.perf_counter() - started)
    return ray


def _options(execution: ExecutionConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": execution.num_cpus_per_task, "num_gpus": execution.num_gpus_per_task}
    if execution.memory_mb_per_task:
        options["memory"] = execution.memory_mb_per_task * 1024 * 1024
    return options


def _slots(ray: Any, execution: ExecutionConfig, count: int) -> int:
    """How many tasks or actors fit the cluster at once (by CPUs, and GPUs when asked for), at most ``count``."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 1) / execution.num_cpus_per_task] if execution.num_cpus_per_task else []
    if execution.num_gpus_per_task:
        fits.append(total.get("GPU", 0) / execution.num_gpus_per_task)
    return max(1, min(count, int(min(fits)) if fits else count))


_WARM: dict[str, Any] = {}  # what prestart() started: "key" (the options they fit), "actors", "tasks"


def _options_key(execution: ExecutionConfig) -> str:
    return repr(sorted(_options(execution).items()))


def prestart(execution: ExecutionConfig, *, modules: Sequence[str], actors: bool) -> None:
    """Connect to Ray and start this command's workers now, importing ``modules`` in them.

    Called first thing in a command (before the driver's own slow imports and discovery), so
    that the workers' start-up, seconds for torch and MONAI, runs alongside the driver's work
    instead of after it; the Ray counterpart of ``batch.prestart_workers``. ``actors``: create
    the batch's actors (one per slot), which :func:`run_on_ray` then uses; otherwise run one
    import task per slot, which leaves that many warm worker processes for the batch's tasks.
    A command that ends up with nothing to run leaves them to be stopped with the driver.
    """
    ray = ensure_ray(execution)
    slots = _slots(ray, execution, 1 << 30)
    names = tuple(modules)
    _WARM.clear()
    _WARM["key"] = _options_key(execution)
    if actors:
        actor_class = ray.remote(_StudyActor).options(**_options(execution), max_restarts=0, max_task_retries=0)
        _WARM["actors"] = [actor_class.remote(names) for _ in range(slots)]
    else:
        warm = ray.remote(_import).options(**_options(execution), max_retries=0)
        _WARM["tasks"] = [warm.remote(names) for _ in range(slots)]  # refs kept: done when they are


def _prestarted_actors(execution: ExecutionConfig, slots: int) -> list[Any]:
    """Up to ``slots`` actors that prestart() created for these resources (taken: a batch owns them)."""
    if _WARM.get("key") != _options_key(execution):
        return []
    actors = _WARM.pop("actors", [])
    return actors[:slots]


# ---- the worker side -------------------------------------------------------------------------


def _run_chunk(call: Callable[..., Any], fn: Callable[[Any], Any], threads: int | None, items: list[Any],
               keys: list[str]) -> tuple[list[Any], list[float]]:
    """In a Ray worker: every study's outcome (its own errors included) and how long each took."""
    from pipeline.batch import set_worker_threads

    set_worker_threads(threads)
    outcomes, seconds = [], []
    for item, key in zip(items, keys, strict=True):
        started = time.perf_counter()
        outcomes.append(call(fn, item, key))
        seconds.append(time.perf_counter() - started)
    return outcomes, seconds


class _StudyActor:
    """A long-lived worker: imports the batch's modules when created (see :func:`prestart`); a Loaded
    recipe's first call loads the model, which then stays in this process for every later chunk."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        _import(modules)
        self.job: tuple[Callable[..., Any], Callable[[Any], Any], int | None] | None = None

    def setup(self, call: Callable[..., Any], fn: Callable[[Any], Any], threads: int | None) -> None:
        self.job = (call, fn, threads)

    def run(self, items: list[Any], keys: list[str]) -> tuple[list[Any], list[float]]:
        if self.job is None:
            raise RuntimeError("a medpipe Ray actor was given studies before its setup")
        return _run_chunk(*self.job, items, keys)


def _import(modules: tuple[str, ...]) -> None:
    """In a Ray worker: import what the coming studies need (torch, MONAI, decoders: the slow part of a start)."""
    for name in modules:
        importlib.import_module(name)


# ---- the driver side -------------------------------------------------------------------------


class _Chunks:
    """Chunk sizes: ``fixed``, or from the median study time so that a chunk takes about CHUNK_SECONDS.

    Until a study has been timed, chunks hold one study (the first ones also load models or
    import modules, which the median soon leaves out). An automatic chunk never holds more
    than an equal share of what is left per queued chunk, so the last chunks end together.
    """

    def __init__(self, fixed: int | None, slots: int) -> None:
        self.fixed, self.slots = fixed, slots
        self.seconds: deque[float] = deque(maxlen=_SAMPLES)

    def observe(self, seconds: list[float]) -> None:
        self.seconds.extend(seconds)

    def size(self, remaining: int) -> int:
        if self.fixed:
            return self.fixed
        if not self.seconds:
            return 1
        per_study = statistics.median(self.seconds)
        wanted = int(CHUNK_SECONDS / per_study) if per_study > 0 else remaining
        share = -(-remaining // (IN_FLIGHT * self.slots))
        return max(1, min(wanted, share))


class _Tasks:
    """Plain Ray tasks; at most IN_FLIGHT chunks per slot submitted (Ray queues them on free CPUs)."""

    def __init__(self, ray: Any, fn: Callable[[Any], Any], call: Callable[..., Any], threads: int | None,
                 execution: ExecutionConfig, slots: int) -> None:
        self.ray, self.call, self.threads, self.limit = ray, call, threads, IN_FLIGHT * slots
        self.remote = ray.remote(_run_chunk).options(**_options(execution), max_retries=0)
        self.fn = ray.put(fn)  # sent once, not with every task
        self.running: set[Any] = set()

    def has_room(self, *, exclusive: bool = False) -> bool:
        return len(self.running) < self.limit  # each task has a worker process of its own

    def submit(self, items: list[Any], keys: list[str], *, exclusive: bool = False) -> Any:
        ref = self.remote.remote(self.call, self.fn, self.threads, items, keys)
        self.running.add(ref)
        return ref

    def finished(self, ref: Any, *, lost: bool) -> None:
        self.running.discard(ref)

    def close(self) -> None:
        for ref in self.running:  # only when the batch was abandoned (an exception, Ctrl-C)
            self.ray.cancel(ref, force=True)


class _Actors:
    """One actor per slot, each loading the recipe once; a lost actor is replaced by a fresh one."""

    def __init__(self, ray: Any, fn: Callable[[Any], Any], call: Callable[..., Any], threads: int | None,
                 execution: ExecutionConfig, slots: int) -> None:
        self.ray, self.call, self.threads = ray, call, threads
        self.actor_class = ray.remote(_StudyActor).options(**_options(execution), max_restarts=0,
                                                           max_task_retries=0)
        self.modules = (type(fn).__module__, *fn.imports)
        self.fn_ref = ray.put(fn)  # sent once, not with every chunk
        warm = _prestarted_actors(execution, slots)
        self.actors = warm + [self._new() for _ in range(slots - len(warm))]
        try:  # waits for their start-up; the recipe failing to unpickle there fails every actor alike
            ray.get([self._setup(actor) for actor in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise StageError(f"a Ray actor could not start ({str(exc)[:500]}); check that every Ray worker can "
                             "import medpipe and read the model folder", code="worker_start_failed") from None
        self.busy = [0] * slots
        self.owner: dict[Any, tuple[int, Any, int]] = {}  # ref -> (slot, actor, queue weight)

    def _new(self) -> Any:
        return self.actor_class.remote(self.modules)

    def _setup(self, actor: Any) -> Any:
        return actor.setup.remote(self.call, self.fn_ref, self.threads)

    def has_room(self, *, exclusive: bool = False) -> bool:
        """A slot can take a chunk; ``exclusive``: an idle one (a retried study must not share its actor's
        queue, or a killer queued before it would be blamed on it)."""
        return min(self.busy) == 0 if exclusive else min(self.busy) < IN_FLIGHT

    def submit(self, items: list[Any], keys: list[str], *, exclusive: bool = False) -> Any:
        slot = self.busy.index(min(self.busy))
        ref = self.actors[slot].run.remote(items, keys)
        weight = IN_FLIGHT if exclusive else 1  # an exclusive call fills its actor's queue
        self.busy[slot] += weight
        self.owner[ref] = (slot, self.actors[slot], weight)
        return ref

    def finished(self, ref: Any, *, lost: bool) -> None:
        slot, actor, weight = self.owner.pop(ref)
        self.busy[slot] -= weight
        if lost and self.actors[slot] is actor:  # the first of its lost calls replaces it
            self.ray.kill(actor)
            self.actors[slot] = self._new()
            self._setup(self.actors[slot])  # runs before the chunks later sent to it

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _lost(item: Any, key: str, exc: BaseException, times: int) -> Outcome[Any, Any]:
    from pipeline.batch import Outcome

    return Outcome(item=item, key=key, code=LOST,
                   message=f"its Ray worker was lost {times} time(s) ({type(exc).__name__}); gave up after "
                           "execution.max_retries retries of it alone. The other studies were not affected")


def _task_error(item: Any, key: str, exc: BaseException) -> Outcome[Any, Any]:
    from pipeline.batch import Outcome

    cause = getattr(exc, "cause", None) or exc
    return Outcome(item=item, key=key, code="fatal_error",
                   message=f"{type(cause).__name__}: {str(cause)[:300]} (raised in its Ray worker outside the "
                           "study's own error handling; the study was abandoned)")


def run_on_ray(items: Sequence[Any], fn: Callable[[Any], Any], keys: Sequence[str], *,
               execution: ExecutionConfig, call: Callable[..., Outcome[Any, Any]],
               threads: int | None = None,
               arrived: Callable[[int], None] | None = None) -> Iterator[Outcome[Any, Any]]:
    """Outcomes of ``call(fn, item, key)`` for every item, in input order, computed on Ray in chunks.

    A study's own exception comes back as a failed outcome (not retried: it would fail again).
    A chunk whose worker or actor is lost is split: each of its studies runs alone, and one
    that is lost alone ``execution.max_retries + 1`` times is recorded as failed with code
    ``worker_lost``. ``threads``: torch threads in each task or actor; ``arrived(count)`` is called
    as outcomes arrive (before they are yielded in order).
    """
    if not items:
        return
    from pipeline.batch import Loaded

    ray = ensure_ray(execution)
    slots = _slots(ray, execution, len(items))
    runner_class = _Actors if isinstance(fn, Loaded) else _Tasks
    runner = runner_class(ray, fn, call, threads, execution, slots)
    chunks = _Chunks(getattr(execution, "chunk_size", None), slots)
    pending = deque(range(len(items)))
    alone: deque[int] = deque()  # studies of a lost chunk: each runs in a task of its own
    losses, solo = [0] * len(items), [0] * len(items)
    running: dict[Any, list[int]] = {}
    done: dict[int, Any] = {}
    emitted = 0
    try:
        while emitted < len(items):
            while (alone or pending) and runner.has_room(exclusive=bool(alone)):
                retry = bool(alone)  # a study of a lost chunk runs on an idle worker, so a loss is its own
                if retry:
                    chunk = [alone.popleft()]
                else:
                    chunk = [pending.popleft() for _ in range(min(chunks.size(len(pending)), len(pending)))]
                ref = runner.submit([items[i] for i in chunk], [keys[i] for i in chunk], exclusive=retry)
                running[ref] = chunk
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                chunk = running.pop(ref)
                try:
                    outcomes, seconds = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # raised outside `call`: not the worker's loss
                    runner.finished(ref, lost=False)
                    if len(chunk) > 1:
                        alone.extend(chunk)
                    else:
                        done[chunk[0]] = _task_error(items[chunk[0]], keys[chunk[0]], exc)
                        _count(arrived, 1)
                    continue
                except ray.exceptions.RayError as exc:
                    if getattr(exc, "actor_init_failed", False):  # no study's fault: every actor would fail
                        raise StageError(f"a Ray actor could not start ({str(exc)[:500]}); check that every "
                                         "Ray worker can import medpipe and read the model folder",
                                         code="worker_start_failed") from None
                    runner.finished(ref, lost=True)
                    before = len(done)
                    _after_loss(chunk, exc, losses=losses, solo=solo, alone=alone, done=done, items=items,
                                keys=keys, max_retries=execution.max_retries)
                    _count(arrived, len(done) - before)
                    continue
                runner.finished(ref, lost=False)
                chunks.observe(seconds)
                done.update(zip(chunk, outcomes, strict=True))
                _count(arrived, len(chunk))
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
    finally:
        runner.close()


def _count(arrived: Callable[[int], None] | None, count: int) -> None:
    if arrived is not None and count:
        arrived(count)


def _after_loss(chunk: list[int], exc: BaseException, *, losses: list[int], solo: list[int], alone: deque[int],
                done: dict[int, Any], items: Sequence[Any], keys: Sequence[str], max_retries: int) -> None:
    """A chunk's worker was lost: split a chunk of several; retry a lone study, or give it up."""
    for index in chunk:
        losses[index] += 1
    if len(chunk) > 1:
        log.warning("a Ray worker holding %d studies was lost (%s); running each of them alone", len(chunk),
                    type(exc).__name__)
        alone.extend(chunk)
        return
    index = chunk[0]
    solo[index] += 1
    log.warning("study %s: Ray worker lost (try %d of %d alone): %s", keys[index], solo[index], max_retries + 1,
                type(exc).__name__)
    if solo[index] <= max_retries:
        alone.appendleft(index)
    else:
        done[index] = _lost(items[index], keys[index], exc, losses[index])
