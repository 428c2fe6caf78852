"""Sharding: a deterministic, stable split; shards merged equal an unsharded run; bad merges refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError, ManifestError
from pipeline.fileio import read_json, sha256_file
from pipeline.runner import run_pipeline
from pipeline.sharding import Shard, merge_shards, shard_of
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import preprocess


def _files(folder: Path, *, skip: tuple[str, ...] = ("record.json", "config.yaml", "medpipe.log")) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip and not any(q.startswith("shard-") for q in p.parts)}


def test_split_is_a_partition_and_stable_under_added_studies() -> None:
    ids = [f"study-{i}" for i in range(200)]
    owners = {sid: shard_of(sid, 4) for sid in ids}
    assert sorted({o for o in owners.values()}) == [0, 1, 2, 3]
    assert all(sum(Shard(i, 4).owns(sid) for i in range(4)) == 1 for sid in ids)
    more = ids + [f"new-{i}" for i in range(50)]
    assert {sid: shard_of(sid, 4) for sid in more if sid in owners} == owners  # no study moves
    assert 30 <= sum(1 for o in owners.values() if o == 0) <= 70  # roughly balanced
    with pytest.raises(ConfigError):
        Shard.parse("4/4")
    with pytest.raises(ConfigError):
        load_config(None, overrides=["execution.shard=2/2"])


def test_sharded_ingest_and_preprocess_merge_to_the_unsharded_outputs(msd_dataset: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    run_pipeline(load_config(None, overrides=[f"data.root={msd_dataset}"]), plain, stages=("ingest", "preprocess"))
    sharded = tmp_path / "sharded"
    for i in range(3):
        assert main(["ingest", str(msd_dataset), "--out", str(sharded / "01_ingest"), "--shard", f"{i}/3", "-q"]) == 0
    shard_ids = [{s["id"] for s in read_json(sharded / "01_ingest" / f"shard-{i}-of-3" / "manifest.json")["studies"]}
                 for i in range(3)]
    assert sum(len(s) for s in shard_ids) == 6 and not (shard_ids[0] & shard_ids[1])
    assert main(["merge", str(sharded / "01_ingest"), "-q"]) == 0
    assert _files(sharded / "01_ingest") == _files(plain / "01_ingest")  # manifest and images byte-identical
    for i in range(2):
        preprocess(sharded / "01_ingest", sharded / "02_preprocess",
                   config=load_config(None, overrides=[f"execution.shard={i}/2"]))
    record = merge_shards(sharded / "02_preprocess")
    assert record["status"] == "complete" and record["counts"]["ok"] == 6
    assert _files(sharded / "02_preprocess") == _files(plain / "02_preprocess")
    # the merged folder is up to date for the unsharded config: a run skips it
    assert ingest(msd_dataset, sharded / "01_ingest", config=load_config(None)).get("skipped")


def test_merge_refuses_missing_mixed_and_overlapping_shards(msd_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingest"
    ingest(msd_dataset, out, config=load_config(None, overrides=["execution.shard=0/2"]))
    with pytest.raises(ManifestError, match="shard.*1/2.*missing"):
        merge_shards(out)
    ingest(msd_dataset, out, config=load_config(None, overrides=["execution.shard=1/2", "ingest.max_voxels=99999999"]))
    with pytest.raises(ManifestError, match="different configs"):
        merge_shards(out)
    ingest(msd_dataset, out, config=load_config(None, overrides=["execution.shard=1/2"]))
    assert merge_shards(out)["counts"]["ok"] == 6
    ingest(msd_dataset, out, config=load_config(None, overrides=["execution.shard=0/3"]))
    with pytest.raises(ManifestError, match="different splits"):
        merge_shards(out)


def test_run_refuses_to_shard_training(msd_dataset: Path, tmp_path: Path) -> None:
    config = load_config(None, overrides=[f"data.root={msd_dataset}", "execution.shard=0/2"])
    with pytest.raises(ConfigError, match="train"):
        run_pipeline(config, tmp_path / "run", stages=("ingest", "train"))
    assert isinstance(config, PipelineConfig)
