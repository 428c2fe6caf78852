"""The Ray backend on a real local Ray cluster (2 CPUs): outcomes, bounded retries of lost workers, actors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
        loads = Path(self.tag)
        loads.write_text(loads.read_text() + f"{loaded_at}\n" if loads.exists() else f"{loaded_at}\n")
        return lambda x: (x + 1, loaded_at)


def test_actors_load_the_model_once_each(cluster: None, tmp_path: Path) -> None:
    recipe = CountingRecipe(str(tmp_path / "loads.txt"))
    outcomes = list(run_batch(list(range(12)), recipe, key=str, execution=RAY))
    assert [o.result[0] for o in outcomes] == list(range(1, 13))
    pids = {o.result[1] for o in outcomes}
    loads = (tmp_path / "loads.txt").read_text().split()
    assert len(pids) <= 2 and sorted(set(loads)) == sorted(str(p) for p in pids) and len(loads) == len(pids)
