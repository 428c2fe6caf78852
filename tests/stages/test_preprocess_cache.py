"""The preprocess stage with a shared cache and a hand-edited plans file: hits, recovery, overrides, sources."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import pipeline.stages.preprocess as stage
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.fileio import read_json, sha256_file
from pipeline.io.nifti import load_nifti
from pipeline.manifest import load_manifest
from pipeline.preprocess_cache import IMAGE_FILE
from pipeline.stages.preprocess import preprocess
from tests.stages.test_preprocess import make_ingest


@pytest.fixture(scope="module")
def ingest_dir(msd_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cache_ingest") / "01_ingest"
    make_ingest(msd_dataset, folder)
    return folder


def _checksums(out: Path) -> dict[str, str]:
    files = [out / "plans.json", out / "dataset.json", *sorted((out / "data").iterdir())]
    return {str(p.relative_to(out)): sha256_file(p) for p in files if p.is_file()}


def _no_compute(*args: object, **kwargs: object) -> None:
    raise AssertionError("preprocessing ran although the cache holds this study")


def test_cache_hit_is_byte_identical_and_skips_computation(ingest_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, overrides=[f"preprocess.cache_dir={tmp_path / 'cache'}"])
    first = preprocess(ingest_dir, tmp_path / "a", config=config)
    assert first["status"] == "complete" and first["cache"] == {"hits": 0, "computed": 6}
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 6
    reference = _checksums(tmp_path / "a")

    monkeypatch.setattr(stage, "preprocessing_transforms", _no_compute)
    second = preprocess(ingest_dir, tmp_path / "b", config=config)
    assert second["status"] == "complete" and second["cache"] == {"hits": 6, "computed": 0}
    assert all(s["reused"] for s in second["studies"])
    assert _checksums(tmp_path / "b") == reference

    # a corrupt entry is noticed on read, recomputed with a warning, and stored again
    monkeypatch.undo()
    entry = next(p for p in sorted((tmp_path / "cache").iterdir()))
    damaged = bytearray((entry / IMAGE_FILE).read_bytes())
    damaged[-3] ^= 0x01
    (entry / IMAGE_FILE).unlink()
    (entry / IMAGE_FILE).write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        third = preprocess(ingest_dir, tmp_path / "c", config=config)
    assert third["cache"] == {"hits": 5, "computed": 1}
    assert "corrupt" in caplog.text
    assert _checksums(tmp_path / "c") == reference
    assert sha256_file(entry / IMAGE_FILE) == read_json(entry / "meta.json")["outputs"][IMAGE_FILE]
    assert _checksums(tmp_path / "a") == reference  # the run folders sharing files with the cache are intact


def test_dataset_entries_name_their_source_and_plans_hold_the_topology(ingest_dir: Path, tmp_path: Path) -> None:
    preprocess(ingest_dir, tmp_path / "pre", config=load_config(None))
    sources = {s.id: s.source for s in load_manifest(ingest_dir).studies}
    entries = read_json(tmp_path / "pre" / "dataset.json")["studies"]
    assert entries and all(e["source"] == sources[e["id"]] for e in entries)
    assert all(e["source"].startswith("imagesTr/") for e in entries)
    plans = read_json(tmp_path / "pre" / "plans.json")
    assert plans["normalization"] == "zscore" and isinstance(plans["batch_size"], int) and plans["batch_size"] >= 2
    network = plans["network"]
    assert len(network["strides"]) == len(network["kernel_sizes"]) == len(network["filters"]) >= 3
    assert network["strides"][0] == [1, 1, 1] and network["filters"][:3] == [32, 64, 128]
    divisor = [1, 1, 1]
    for stride in network["strides"]:
        divisor = [d * s for d, s in zip(divisor, stride, strict=True)]
    assert all(p % d == 0 for p, d in zip(plans["patch_size"], divisor, strict=True))


def test_plans_file_overrides_and_reruns_when_edited(ingest_dir: Path, tmp_path: Path) -> None:
    plans_file = tmp_path / "my_plans.json"
    plans_file.write_text(json.dumps({"target_spacing": [2.0, 2.0, 2.0], "batch_size": 3}))
    config = load_config(None, overrides=[f"preprocess.plans_file={plans_file}"])
    record = preprocess(ingest_dir, tmp_path / "pre", config=config)
    assert record["plans_file_keys"] == ["batch_size", "target_spacing"]
    assert "plans_file" in record["inputs"]
    plans = read_json(tmp_path / "pre" / "plans.json")
    assert plans["target_spacing"] == [2.0, 2.0, 2.0] and plans["batch_size"] == 3
    entry = read_json(tmp_path / "pre" / "dataset.json")["studies"][0]
    assert load_nifti(tmp_path / "pre" / entry["image"]).spacing == pytest.approx((2.0, 2.0, 2.0))
    assert preprocess(ingest_dir, tmp_path / "pre", config=config).get("skipped") is True

    plans_file.write_text(json.dumps({"target_spacing": [2.0, 2.0, 2.0], "batch_size": 4}))
    edited = preprocess(ingest_dir, tmp_path / "pre", config=config)
    assert not edited.get("skipped") and read_json(tmp_path / "pre" / "plans.json")["batch_size"] == 4
    assert all(s["reused"] for s in edited["studies"])  # the batch size changes no voxel

    plans_file.write_text(json.dumps({"target_spacing": [2.0, 2.0, 2.0], "batch_sise": 4}))
    with pytest.raises(ConfigError, match=r"my_plans\.json: unknown plans key 'batch_sise'"):
        preprocess(ingest_dir, tmp_path / "other", config=config)
    assert not (tmp_path / "other").exists()
