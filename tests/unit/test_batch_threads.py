"""One core per worker: the per-worker torch thread rule in worker processes and in-process, and batch timings."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.batch import STATS_ENV, Loaded, cpu_count, run_batch, worker_threads
from pipeline.config import ExecutionConfig


def _execution(**fields: Any) -> Any:
    """An ExecutionConfig with ``fields``; a stand-in with the same attributes while the config lacks one of them."""
    known = {k: v for k, v in fields.items() if k in ExecutionConfig.model_fields}
    config = ExecutionConfig(**known)
    if len(known) == len(fields):
        return config
    return SimpleNamespace(**{**config.model_dump(), **fields})


def torch_threads(_: int) -> int:
    import torch

    return torch.get_num_threads()


@dataclass(frozen=True)
class GreedyRecipe(Loaded[int, int]):
    """Loads like PredictRecipe does: sets its own torch thread count, here a wrong one."""

    threads: int

    def load(self) -> Callable[[int], int]:
        import torch

        torch.set_num_threads(self.threads)
        return torch_threads


def test_the_rule_shares_the_cpus_out() -> None:
    cpus = cpu_count()
    assert worker_threads(_execution(), workers=1) == cpus
    assert worker_threads(_execution(), workers=2) == max(1, cpus // 2)
    assert worker_threads(_execution(), workers=4 * cpus) == 1  # never 0
    assert worker_threads(_execution(threads_per_worker=3), workers=2) == 3
    assert worker_threads(_execution(backend="ray", num_cpus_per_task=2.0), workers=1) == 2
    assert worker_threads(_execution(backend="ray", num_cpus_per_task=0.5), workers=1) == 1


def test_worker_processes_run_torch_with_the_per_worker_threads() -> None:
    """torch is imported by the study function, after the worker set its thread count (torch's default
    here is every core; asking for more threads than cores is capped by torch on its first import)."""
    outcomes = list(run_batch(list(range(4)), torch_threads, key=str, workers=2,
                              execution=_execution(threads_per_worker=1)))
    assert [o.result for o in outcomes] == [1] * 4


def test_the_batch_rule_wins_over_what_a_recipe_sets_when_it_loads() -> None:
    outcomes = list(run_batch(list(range(3)), GreedyRecipe(threads=5), key=str, workers=2,
                              execution=_execution(threads_per_worker=1)))
    assert [o.result for o in outcomes] == [1, 1, 1]


def test_in_process_applies_only_an_explicit_setting_and_restores_it() -> None:
    import torch

    before = torch.get_num_threads()
    explicit = 1 if before != 1 else 2
    assert [o.result for o in run_batch([0, 1], torch_threads, key=str,
                                        execution=_execution(threads_per_worker=explicit))] == [explicit] * 2
    assert torch.get_num_threads() == before
    assert [o.result for o in run_batch([0], torch_threads, key=str, execution=_execution())] == [before]


def _nap(x: int) -> int:
    time.sleep(0.02)
    return x


def test_batch_timings_are_logged_to_the_stats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    assert [o.result for o in run_batch(list(range(10)), _nap, key=str, desc="naps")] == list(range(10))
    assert [o.result for o in run_batch(list(range(4)), _nap, key=str, workers=2, desc="naps2")] == list(range(4))
    first, second = (json.loads(line) for line in stats.read_text().splitlines())
    assert first["desc"] == "naps" and first["backend"] == "in-process" and first["items"] == 10
    assert first["seconds"] >= 10 * 0.02 and first["first_s"] >= 0.02
    assert 0 < first["steady_per_s"] <= 1 / 0.02 * 1.01  # one study at a time: at most 50 a second
    assert second["backend"] == "local" and second["workers"] == 2 and second["items"] == 4


def test_prestarted_workers_import_their_modules_before_the_batch(tmp_path: Path) -> None:
    """The forkserver started by prestart_workers imports the study module while this process does other
    work; the batch then forks its workers from it, without importing the module again."""
    (tmp_path / "slowmod.py").write_text(
        "import os, time\n"
        f"with open({str(tmp_path / 'imports.txt')!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()} {time.time()}\\n')\n"
        "def parent(_):\n"
        "    return os.getppid()\n")
    script = tmp_path / "main.py"
    script.write_text(
        "import os, time\n"
        "from pipeline.batch import prestart_workers, run_batch\n"
        "if __name__ == '__main__':\n"
        "    prestart_workers(['slowmod'])\n"
        "    import torch  # loaded: workers start from the forkserver\n"
        "    time.sleep(1.0)\n"
        "    started = time.time()\n"
        "    import slowmod\n"
        "    parents = {o.result for o in run_batch([1, 2, 3], slowmod.parent, key=str, workers=2)}\n"
        "    print(started, os.getpid(), *parents)\n")
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the forkserver imports slowmod from there too
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    started, main_pid, *parents = done.stdout.split()
    imports = [line.split() for line in (tmp_path / "imports.txt").read_text().splitlines()]
    server = [(pid, at) for pid, at in imports if pid != main_pid]
    assert len(server) == 1 and float(server[0][1]) < float(started)  # imported once, before the batch
    assert set(parents) == {server[0][0]}  # every worker was forked from that server


def test_local_workers_preload_the_recipes_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forkserver that local workers fork from imports a Loaded recipe's ``imports`` (torch, MONAI) once."""
    from pipeline import batch

    seen: dict[str, tuple[str, ...]] = {}

    def fake_run_isolated(jobs, *, workers, limits, preload=()):  # noqa: ANN001, ANN202
        seen["preload"] = tuple(preload)
        yield from ()

    monkeypatch.setattr(batch, "run_isolated", fake_run_isolated)

    class Recipe(batch.Loaded[int, int]):
        imports = ("torch", "colorsys")

        def load(self):  # noqa: ANN202
            return abs

    with contextlib.suppress(KeyError):  # the fake pool returns nothing
        list(batch._in_workers([1], Recipe(), ["1"], desc="t", workers=2, limits=batch.Isolation(), threads=1))
    assert seen["preload"] == (__name__, "torch", "colorsys", "pipeline.batch")
