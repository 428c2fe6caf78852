"""The Ray backend of run_batch: per-study tasks (or model-holding actors) with bounded retries on lost workers."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.batch import Outcome
    from pipeline.config import ExecutionConfig

log = logging.getLogger(__name__)

__all__ = ["ensure_ray", "run_on_ray"]

LOST = "worker_lost"


def ensure_ray(execution: ExecutionConfig) -> Any:
    """The ``ray`` module, connected to ``execution.address`` (or a local Ray started now)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("execution.backend is 'ray' but Ray is not installed; pip install 'medpipe[ray]' "
                          "or use --backend local") from None
    if not ray.is_initialized():
        where = execution.address or "a new local Ray"
        log.info("connecting to %s", where)
        try:
            ray.init(address=execution.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {where} ({exc}); start it with "
                              "'ray start --head' or give the right --address") from None
    return ray


def _options(execution: ExecutionConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": execution.num_cpus_per_task, "num_gpus": execution.num_gpus_per_task}
    if execution.memory_mb_per_task:
        options["memory"] = execution.memory_mb_per_task * 1024 * 1024
    return options


def _slots(ray: Any, execution: ExecutionConfig, count: int) -> int:
    """How many actors fit the cluster at once (by CPUs, and GPUs when asked for), at most ``count``."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 1) / execution.num_cpus_per_task] if execution.num_cpus_per_task else []
    if execution.num_gpus_per_task:
        fits.append(total.get("GPU", 0) / execution.num_gpus_per_task)
    return max(1, min(count, int(min(fits)) if fits else count))


class _StudyActor:
    """Holds a Loaded recipe; its first call loads the model, which then stays for every later study."""

    def __init__(self, fn: Callable[[Any], Any], call: Callable[..., Any]) -> None:
        self.fn, self.call = fn, call

    def run(self, item: Any, key: str) -> Any:
        return self.call(self.fn, item, key)


def _lost(item: Any, key: str, exc: BaseException, tries: int) -> Outcome[Any, Any]:
    from pipeline.batch import Outcome

    return Outcome(item=item, key=key, code=LOST,
                   message=f"its Ray worker was lost {tries} time(s) ({type(exc).__name__}); gave up after "
                           "execution.max_retries retries. The other studies were not affected")


def run_on_ray(items: Sequence[Any], fn: Callable[[Any], Any], keys: Sequence[str], *,
               execution: ExecutionConfig, call: Callable[..., Outcome[Any, Any]]) -> Iterator[Outcome[Any, Any]]:
    """Outcomes of ``call(fn, item, key)`` for every item, in input order, computed on Ray.

    A study's own exception comes back as a failed outcome (not retried: it would fail again);
    a worker or actor that dies is retried ``execution.max_retries`` times, then the study is
    recorded as failed with code ``worker_lost``.
    """
    if not items:
        return
    from pipeline.batch import Loaded

    ray = ensure_ray(execution)
    if isinstance(fn, Loaded):
        yield from _on_actors(ray, items, fn, keys, execution=execution, call=call)
        return
    task = ray.remote(call).options(**_options(execution), max_retries=execution.max_retries,
                                    retry_exceptions=False)
    refs = [task.remote(fn, item, key) for item, key in zip(items, keys, strict=True)]
    for ref, item, key in zip(refs, items, keys, strict=True):
        try:
            yield ray.get(ref)
        except ray.exceptions.RayError as exc:
            yield _lost(item, key, exc, execution.max_retries + 1)


def _on_actors(ray: Any, items: Sequence[Any], fn: Any, keys: Sequence[str], *, execution: ExecutionConfig,
               call: Callable[..., Any]) -> Iterator[Outcome[Any, Any]]:
    """One study at a time per actor; an actor that dies is replaced and only its study retried."""
    actor_class = ray.remote(_StudyActor).options(**_options(execution), max_restarts=0)
    idle = [actor_class.remote(fn, call) for _ in range(_slots(ray, execution, len(items)))]
    pending = deque(range(len(items)))
    tries = [0] * len(items)
    running: dict[Any, tuple[int, Any]] = {}
    done: dict[int, Any] = {}
    emitted = 0
    while emitted < len(items):
        while pending and idle:
            index = pending.popleft()
            actor = idle.pop()
            tries[index] += 1
            running[actor.run.remote(items[index], keys[index])] = (index, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            index, actor = running.pop(ref)
            try:
                done[index] = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayError as exc:
                log.warning("study %s: Ray worker lost (try %d of %d): %s", keys[index], tries[index],
                            execution.max_retries + 1, type(exc).__name__)
                ray.kill(actor)
                idle.append(actor_class.remote(fn, call))
                if tries[index] <= execution.max_retries:
                    pending.appendleft(index)
                else:
                    done[index] = _lost(items[index], keys[index], exc, tries[index])
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1
    for actor in idle:
        ray.kill(actor)
