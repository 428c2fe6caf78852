"""The collector paused while a stage builds its long-lived objects, which then stay out of its collections."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.batch import run_batch
from pipeline.collector import collector_paused, long_lived
from pipeline.errors import StageError
from pipeline.isolation import Isolation, run_isolated


def collector_state(_: int) -> tuple[bool, int]:
    """In a worker: (collector enabled, objects frozen)."""
    return gc.isenabled(), gc.get_freeze_count()


def _worker_state() -> tuple[bool, int]:
    [(_, reply)] = list(run_isolated([(collector_state, (0,))], workers=1, limits=Isolation(start_method="fork"),
                                     test_faults=False))  # type: ignore[arg-type]
    assert reply[0] == "ok", reply
    return reply[1]


def test_paused_inside_and_as_before_afterwards() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        assert _worker_state()[0]  # a worker forked here collects its own garbage
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_long_lived_objects_stay_out_of_collections_until_the_block_ends() -> None:
    class Node:
        pass

    def build() -> list[Node]:
        assert not gc.isenabled()
        return [Node() for _ in range(1000)]

    before = gc.get_freeze_count()
    with long_lived(build) as nodes:
        assert gc.isenabled() and len(nodes) == 1000
        frozen = gc.get_freeze_count()
        assert frozen >= before + 1000
        assert not any(node is nodes[0] for node in gc.get_objects())  # no collection walks them
        _, worker_frozen = _worker_state()
        assert worker_frozen >= 0.9 * frozen  # the worker inherits them frozen (a few freed since) ...
        assert gc.get_freeze_count() >= frozen  # ... and in this process
        cycle = Node()
        cycle.self = cycle  # type: ignore[attr-defined]  # made inside the block: collected as usual
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0
    assert any(node is nodes[0] for node in gc.get_objects())


def test_a_failing_build_leaves_the_collector_as_it_was() -> None:
    def build() -> None:
        raise ValueError("discovery failed")

    with pytest.raises(ValueError, match="discovery failed"), long_lived(build):
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0


@dataclass
class Big:
    payload: bytes


def size_of(item: Big) -> int:
    return len(item.payload)


def test_worker_outcomes_come_back_without_their_items() -> None:
    items = [Big(bytes(100_000)) for _ in range(3)]
    outcomes = list(run_batch(items, size_of, key=lambda item: str(id(item)), workers=2,
                              isolation=Isolation(start_method="fork")))
    assert [o.result for o in outcomes] == [100_000] * 3
    assert all(o.item is item for o, item in zip(outcomes, items, strict=True))  # the parent's, not a copy


def test_the_ingest_command_keeps_its_imports_and_config_out_of_collections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`medpipe ingest` validates its config and imports its stage with the collector paused; what they leave
    alive (the config, the stage's functions) is out of every collection while the stage runs, and back in
    once the command ends."""
    import pipeline.cli as cli
    import pipeline.stages.ingest as stage

    seen: dict[str, object] = {}
    load_config = cli._config

    def config(*args: object, **kwargs: object) -> object:
        seen["paused while validating"] = not gc.isenabled()
        return load_config(*args, **kwargs)  # type: ignore[arg-type]

    def ingest(scan_dir: Path, out: Path, *, config: object, **_: object) -> dict:
        seen["enabled while running"] = gc.isenabled()
        walked = gc.get_objects()
        seen["config walked"] = any(o is config for o in walked)
        seen["stage walked"] = any(o is stage.discover for o in walked)
        seen["config"] = config
        raise StageError("stopped by the test")

    monkeypatch.setattr(cli, "_config", config)
    monkeypatch.setattr(stage, "ingest", ingest)
    (tmp_path / "scan").mkdir()
    assert cli.main(["ingest", str(tmp_path / "scan"), "--out", str(tmp_path / "out"), "--workers", "1"]) != 0
    assert seen["paused while validating"] and seen["enabled while running"]
    assert not seen["config walked"] and not seen["stage walked"]
    assert gc.isenabled() and gc.get_freeze_count() == 0  # as it was, once the command ended
    assert any(o is seen["config"] for o in gc.get_objects())
