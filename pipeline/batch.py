"""The one batch loop: per-study work with continue-on-error, isolated worker processes or Ray, progress."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.isolation import Isolation, Reply, run_isolated

if TYPE_CHECKING:
    from pipeline.config import ExecutionConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Isolation", "Loaded", "Outcome", "outcome_summary", "run_batch"]


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
    """

    def load(self) -> Callable[[T], R]:
        raise NotImplementedError

    def __call__(self, item: T) -> R:
        cache_key = f"{type(self).__module__}.{type(self).__qualname__}:{self!r}"
        loaded = _LOADED.get(cache_key)
        if loaded is None:
            _LOADED.clear()  # one recipe per process at a time: a new model replaces the old one
            loaded = _LOADED[cache_key] = self.load()
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


def _from_reply(reply: Reply, item: T, key: str, limits: Isolation) -> Outcome[T, R]:
    if reply[0] == "ok":
        outcome: Outcome[T, R] = reply[1]
        if outcome.code == "out_of_memory" and limits.memory_limit_mb:
            outcome.message = (f"{outcome.message}; the worker's memory limit is {limits.memory_limit_mb} MB "
                               f"({limits.memory_setting})")
        return outcome
    _, code, message = reply
    return Outcome(item=item, key=key, code=code, message=message)


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

    ``execution.backend == "ray"`` runs every item as a Ray task instead (a :class:`Loaded`
    ``fn`` on actors that load once), with the execution section's resources and retries; see
    :mod:`pipeline.ray_backend`. Outcomes and codes are the same whichever backend runs them.
    """
    keys = [key(item) for item in items]
    if execution is not None and execution.backend == "ray":
        from pipeline.ray_backend import run_on_ray

        bar = tqdm(total=len(items), desc=desc, unit="study", disable=None, leave=False)
        try:
            for outcome in run_on_ray(items, fn, keys, execution=execution, call=_call):
                bar.update()
                yield outcome
        finally:
            bar.close()
        return
    if isolation is None and workers <= 1:
        bar = tqdm(total=len(items), desc=desc, unit="study", disable=None, leave=False)
        try:
            for item, item_key in zip(items, keys, strict=True):
                outcome = _call(fn, item, item_key)
                bar.update()
                yield outcome
        finally:
            bar.close()
            if isinstance(fn, Loaded):
                _LOADED.clear()  # in this process: do not keep a model alive after its batch
        return
    limits = isolation or Isolation()
    jobs = [(_call, (fn, item, item_key)) for item, item_key in zip(items, keys, strict=True)]
    results: dict[int, Outcome[T, R]] = {}
    preload = (type(fn).__module__ if isinstance(fn, Loaded) else getattr(fn, "__module__", ""),)
    replies = run_isolated(jobs, workers=workers, limits=limits, preload=preload)
    bar = None
    try:
        for index, reply in replies:
            if bar is None:  # after the workers started: tqdm's monitor thread must not exist at fork
                bar = tqdm(total=len(items), desc=desc, unit="study", disable=None, leave=False, initial=len(results))
            results[index] = _from_reply(reply, items[index], keys[index], limits)
            bar.update()
    finally:
        replies.close()
        if bar is not None:
            bar.close()
    for i in range(len(items)):
        yield results[i]


def outcome_summary(outcomes: Sequence[Outcome[Any, Any]]) -> str:
    failed = [o for o in outcomes if not o.ok]
    return f"{len(outcomes) - len(failed)} ok, {len(failed)} failed"
