"""The Ray backend on a real local Ray cluster (2 CPUs): outcomes, chunks, bounded retries of lost workers, actors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.batch import Loaded, run_batch
from pipeline.config import ExecutionConfig
from pipeline.errors import StageError

if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    import ray  # the dev extras install it: under CI its absence is a failure
else:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'medpipe[ray]')")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


RAY = ExecutionConfig(backend="ray", num_cpus_per_task=1, max_retries=1)


def _ray(**fields: Any) -> Any:
    """RAY with ``fields``; a stand-in with the same attributes while ExecutionConfig lacks one of them."""
    known = {k: v for k, v in fields.items() if k in ExecutionConfig.model_fields}
    config = RAY.model_copy(update=known)
    return config if len(known) == len(fields) else SimpleNamespace(**{**config.model_dump(), **fields})


def task_of(x: int) -> tuple[int, str]:
    """The item and the Ray task that ran it; item 3 fails with its own error."""
    if x == 3:
        raise StageError("three is refused", code="refused")
    return x, ray.get_runtime_context().get_task_id()


def nap(x: int) -> tuple[int, str]:
    time.sleep(0.01)
    return x, ray.get_runtime_context().get_task_id()


def square_or_fail(x: int) -> int:
    if x == 3:
        raise StageError("three is refused", code="refused")
    return x * x


def die_on_five(args: tuple[int, str]) -> int:
    """Kills its Ray worker on item 5 (every try); on item 6 only on the first try (a marker file remembers)."""
    x, marker = args
    if x == 5:
        os._exit(1)
    if x == 6 and not Path(marker).exists():
        Path(marker).write_text("tried")
        os._exit(1)
    return x


def test_tasks_give_the_local_outcomes(cluster: None) -> None:
    outcomes = list(run_batch(list(range(6)), square_or_fail, key=str, execution=RAY))
    assert [o.key for o in outcomes] == [str(i) for i in range(6)]
    assert [o.result for o in outcomes if o.ok] == [0, 1, 4, 16, 25]
    failed = [o for o in outcomes if not o.ok]
    assert [(o.key, o.code) for o in failed] == [("3", "refused")]  # a study's own error is not retried


def test_lost_workers_are_retried_then_recorded(cluster: None, tmp_path: Path) -> None:
    items = [(i, str(tmp_path / "tried")) for i in range(4, 8)]
    outcomes = {o.key: o for o in run_batch(items, die_on_five, key=lambda a: str(a[0]), execution=RAY)}
    assert outcomes["5"].code == "worker_lost" and "2 time(s)" in (outcomes["5"].message or "")
    assert outcomes["6"].ok and outcomes["6"].result == 6  # lost once, retried once, done
    assert outcomes["4"].result == 4 and outcomes["7"].result == 7


@dataclass(frozen=True)
class CountingRecipe(Loaded[int, tuple[int, int]]):
    tag: str

    def load(self) -> Callable[[int], tuple[int, int]]:
        loaded_at = os.getpid()
        with open(self.tag, "a", encoding="utf-8") as loads:  # O_APPEND: two actors loading at once both count
            loads.write(f"{loaded_at}\n")
        return lambda x: (x + 1, loaded_at)


def test_actors_load_the_model_once_each(cluster: None, tmp_path: Path) -> None:
    recipe = CountingRecipe(str(tmp_path / "loads.txt"))
    outcomes = list(run_batch(list(range(12)), recipe, key=str, execution=RAY))
    assert [o.result[0] for o in outcomes] == list(range(1, 13))
    pids = {o.result[1] for o in outcomes}
    loads = (tmp_path / "loads.txt").read_text().split()
    assert len(pids) <= 2 and sorted(set(loads)) == sorted(str(p) for p in pids) and len(loads) == len(pids)


def test_chunks_run_several_studies_per_task_and_fail_per_study(cluster: None) -> None:
    outcomes = list(run_batch(list(range(10)), task_of, key=str, execution=_ray(chunk_size=3)))
    assert [o.key for o in outcomes] == [str(i) for i in range(10)]
    assert [(o.key, o.code) for o in outcomes if not o.ok] == [("3", "refused")]  # its chunk mates are fine
    tasks = {o.result[0]: o.result[1] for o in outcomes if o.ok}
    assert tasks[0] == tasks[1] == tasks[2] and tasks[4] == tasks[5] and tasks[6] == tasks[7] == tasks[8]
    assert len({tasks[0], tasks[4], tasks[6], tasks[9]}) == 4  # chunks [0-2] [3-5] [6-8] [9]


def test_automatic_chunks_grow_from_the_measured_study_time(cluster: None) -> None:
    outcomes = list(run_batch(list(range(60)), nap, key=str, execution=_ray()))
    assert [o.result[0] for o in outcomes] == list(range(60))
    tasks = [o.result[1] for o in outcomes]
    assert tasks[0] != tasks[1]  # nothing timed yet: the first chunks hold one study each
    assert len(set(tasks)) <= 30  # then ~0.2 s of 10 ms studies per task, capped by a share of what is left


def test_a_lost_chunk_is_split_and_only_the_killer_is_given_up(cluster: None, tmp_path: Path) -> None:
    items = [(i, str(tmp_path / "tried")) for i in range(8)]
    outcomes = {o.key: o for o in run_batch(items, die_on_five, key=lambda a: str(a[0]),
                                            execution=_ray(chunk_size=4))}
    assert outcomes["5"].code == "worker_lost" and "3 time(s)" in (outcomes["5"].message or "")  # chunk + 2 alone
    assert {k: o.result for k, o in outcomes.items() if o.ok} == {str(i): i for i in range(8) if i != 5}


@dataclass(frozen=True)
class DyingRecipe(Loaded[int, int]):
    """An actor whose study 5 kills it (every time)."""

    def load(self) -> Callable[[int], int]:
        def run(x: int) -> int:
            if x == 5:
                os._exit(1)
            return -x

        return run


def test_a_lost_actor_is_replaced_and_its_chunk_split(cluster: None) -> None:
    outcomes = list(run_batch(list(range(12)), DyingRecipe(), key=str, execution=_ray(chunk_size=3)))
    assert [o.key for o in outcomes if not o.ok] == ["5"] and outcomes[5].code == "worker_lost"
    assert [o.result for o in outcomes if o.ok] == [-i for i in range(12) if i != 5]


@dataclass(frozen=True)
class UnpicklableOnWorkers(Loaded[int, int]):
    """A recipe whose unpickling fails in the Ray worker (like a module it cannot import)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())

    def load(self) -> Callable[[int], int]:
        return abs


def _refuse() -> None:  # called where the recipe is unpickled: only in the Ray workers
    raise ImportError("no module named 'medpipe_models'")


def test_actors_that_cannot_start_stop_the_batch_with_the_reason(cluster: None) -> None:
    with pytest.raises(StageError) as caught:
        list(run_batch(list(range(4)), UnpicklableOnWorkers(), key=str, execution=RAY))
    assert caught.value.code == "worker_start_failed" and "medpipe_models" in str(caught.value)


@dataclass(frozen=True)
class WhichActor(Loaded[int, tuple[int, str]]):
    """Each study answered with the id of the actor that ran it."""

    def load(self) -> Callable[[int], tuple[int, str]]:
        return lambda x: (x, ray.get_runtime_context().get_actor_id())


def test_prestarted_actors_run_the_batch(cluster: None) -> None:
    from pipeline import ray_backend

    ray_backend.prestart(RAY, modules=["colorsys"], actors=True)  # colorsys: imported by nothing else here
    warm = {actor._actor_id.hex() for actor in ray_backend._WARM["actors"]}
    assert len(warm) == 2  # one per CPU of the cluster
    outcomes = list(run_batch(list(range(8)), WhichActor(), key=str, execution=RAY))
    assert [o.result[0] for o in outcomes] == list(range(8))
    used = {o.result[1] for o in outcomes}
    assert used <= warm and len(used) == 2  # no actor of its own: the batch took the warm ones
    assert "actors" not in ray_backend._WARM  # taken, not shared with a later batch


def test_prestarted_tasks_leave_the_batch_unchanged(cluster: None) -> None:
    from pipeline import ray_backend

    ray_backend.prestart(RAY, modules=["colorsys"], actors=False)
    ray.get(ray_backend._WARM["tasks"])  # the import tasks ran
    outcomes = list(run_batch(list(range(6)), square_or_fail, key=str, execution=RAY))
    assert [o.result for o in outcomes if o.ok] == [0, 1, 4, 16, 25] and outcomes[3].code == "refused"


@dataclass(frozen=True)
class ImportsRecipe(Loaded[int, bool]):
    """Declares a slow import; its load() reports whether the actor had it before loading."""

    imports = ("tabnanny",)  # imported by nothing else here

    def load(self) -> Callable[[int], bool]:
        import sys

        before = "tabnanny" in sys.modules
        return lambda x: before


def test_actors_import_the_recipes_imports_when_created(cluster: None) -> None:
    outcomes = list(run_batch(list(range(4)), ImportsRecipe(), key=str, execution=RAY))
    assert [o.result for o in outcomes] == [True] * 4

