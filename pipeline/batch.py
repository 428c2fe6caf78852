"""The one batch loop: per-study work with continue-on-error, optional worker processes, progress."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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


def _call(fn: Callable[[T], R], item: T, key: str) -> Outcome[T, R]:
    try:
        return Outcome(item=item, key=key, result=fn(item))
    except PipelineError as exc:
        return Outcome(item=item, key=key, code=exc.code, message=str(exc))
    except (MemoryError, RecursionError) as exc:
        return Outcome(item=item, key=key, code="resource_error", message=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one study's unexpected failure must not stop the batch
        log.debug("unexpected error on %s:\n%s", key, traceback.format_exc())
        return Outcome(item=item, key=key, code="unexpected_error", message=f"{type(exc).__name__}: {exc}")


def run_batch(
    items: Sequence[T],
    fn: Callable[[T], R],
    *,
    key: Callable[[T], str],
    workers: int = 1,
    desc: str = "studies",
) -> Iterator[Outcome[T, R]]:
    """Apply ``fn`` to every item, yielding outcomes in input order; failures never stop the batch.

    With ``workers > 1`` items run in worker processes (``fn`` and items must pickle); a
    worker that dies fails only the items it had not finished, which are then reported.
    """
    bar = tqdm(total=len(items), desc=desc, unit="study", disable=None, leave=False)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                outcome = _call(fn, item, key(item))
                bar.update()
                yield outcome
            return
        results: dict[int, Outcome[T, R]] = {}
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_call, fn, item, key(item)): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except BrokenProcessPool as exc:
                    results[i] = Outcome(item=items[i], key=key(items[i]), code="worker_died",
                                         message=f"the worker process died ({exc}); rerun to retry this study")
                bar.update()
        for i in range(len(items)):
            yield results[i]
    finally:
        bar.close()


def outcome_summary(outcomes: Sequence[Outcome[Any, Any]]) -> str:
    failed = [o for o in outcomes if not o.ok]
    return f"{len(outcomes) - len(failed)} ok, {len(failed)} failed"
