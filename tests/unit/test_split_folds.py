"""Cross-validation folds: seeded k-fold properties, multi-fold split files keyed by id or by ingest source."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, StageError
from pipeline.training.split import make_folds, read_folds, resolve_folds, resolve_split

IDS = [f"study_{i:03d}" for i in range(23)]
REPO = Path(__file__).resolve().parents[2]


def entries(n: int = 23, *, source: bool = True) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        entry = {"id": f"study_{i:03d}", "image": f"data/study_{i:03d}_image.nii.gz",
                 "label": f"data/study_{i:03d}_label.nii.gz"}
        if source:
            entry["source"] = f"imagesTr/case_{i:03d}.nii.gz"
        out.append(entry)
    return out


def _write(tmp_path: Path, data: object, name: str = "folds.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("k", [2, 5, 23])
def test_folds_are_disjoint_covering_and_balanced(k: int) -> None:
    folds = make_folds(IDS, num_folds=k, seed=12)
    assert len(folds) == k and [f["fold"] for f in folds] == list(range(k))
    validation = [i for f in folds for i in f["validation"]]
    assert sorted(validation) == IDS  # every study validated exactly once
    assert len(set(validation)) == len(IDS)
    sizes = [len(f["validation"]) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        assert not set(fold["train"]) & set(fold["validation"])
        assert sorted(fold["train"] + fold["validation"]) == IDS
        assert fold["train"] == sorted(fold["train"]) and fold["validation"] == sorted(fold["validation"])


def test_folds_are_deterministic_and_seeded() -> None:
    a = make_folds(IDS, num_folds=5, seed=3)
    assert make_folds(list(reversed(IDS)), num_folds=5, seed=3) == a  # input order does not matter
    assert make_folds(IDS, num_folds=5, seed=4) != a


def test_too_few_studies_for_the_folds() -> None:
    with pytest.raises(StageError, match="num_folds"):
        make_folds(IDS[:3], num_folds=5, seed=0)
    with pytest.raises(StageError, match="twice"):
        make_folds([*IDS, IDS[0]], num_folds=5, seed=0)


def test_source_keyed_file_maps_to_ids_and_drops_unknown_sources(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    sources = [f"imagesTr/case_{i:03d}.nii.gz" for i in range(23)]
    data = {"key": "source", "seed": 9, "folds": [
        {"train": sources[5:] + ["imagesTr/failed_at_ingest.nii.gz"], "validation": sources[:5]},
        {"train": sources[:5] + sources[10:], "validation": sources[5:10]},
    ]}
    with caplog.at_level(logging.WARNING):
        folds = read_folds(_write(tmp_path, data), entries())
    assert "failed_at_ingest" in caplog.text and "dropped" in caplog.text
    assert folds[0]["validation"] == IDS[:5] and folds[0]["train"] == IDS[5:]
    assert folds[1]["validation"] == IDS[5:10] and folds[1]["train"] == IDS[:5] + IDS[10:]
    assert folds[0]["seed"] == 9 and folds[1]["num_folds"] == 2


def test_source_keyed_file_needs_sources_in_dataset_json(tmp_path: Path) -> None:
    path = _write(tmp_path, {"key": "source", "folds": [{"train": ["a"], "validation": ["b"]}]})
    with pytest.raises(ConfigError, match="preprocess") as info:
        read_folds(path, entries(source=False))
    assert str(path) in str(info.value)


def test_source_keyed_file_matching_nothing_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {"key": "source", "folds": [{"train": ["x/a.nii.gz"], "validation": ["x/b.nii.gz"]}]})
    with pytest.raises(ConfigError, match="none of its sources"):
        read_folds(path, entries())


def test_unknown_id_and_overlap_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"key": "id", "folds": [{"train": IDS[1:], "validation": ["nobody"]}]})
    with pytest.raises(ConfigError, match="nobody") as info:
        read_folds(path, entries())
    assert "folds.json fold 0" in str(info.value)
    path = _write(tmp_path, {"folds": [{"train": IDS[1:], "validation": IDS[:2]}]}, "overlap.json")
    with pytest.raises(ConfigError, match="overlap.json fold 0.*both train and validation"):
        read_folds(path, entries())


def test_fold_run_and_single_split_file_do_not_mix(tmp_path: Path) -> None:
    single = _write(tmp_path, {"train": IDS[5:], "validation": IDS[:5]}, "single.json")
    multi = _write(tmp_path, {"folds": [{"train": IDS[5:], "validation": IDS[:5]}]}, "multi.json")
    with pytest.raises(ConfigError, match="train.fold to null"):
        resolve_folds(entries(), split_file=single, num_folds=5, seed=0)
    with pytest.raises(ConfigError, match="train.fold"):
        resolve_split(entries(), split_file=multi, val_fraction=0.2, seed=0)
    assert resolve_split(entries(), split_file=single, val_fraction=0.2, seed=0)["validation"] == IDS[:5]
    assert resolve_folds(entries(), split_file=None, num_folds=4, seed=1) == make_folds(IDS, num_folds=4, seed=1)


def test_shipped_hippocampus_folds_map_onto_ingest_sources(tmp_path: Path) -> None:
    """data_manifests/task04_hippocampus_splits.json against a dataset missing one study (failed at ingest)."""
    path = REPO / "data_manifests" / "task04_hippocampus_splits.json"
    data = json.loads(path.read_text())
    sources = sorted({s for fold in data["folds"] for s in fold["validation"]})
    assert len(sources) == 210
    dataset = [{"id": f"id_{i:03d}", "image": "i", "label": "l", "source": s} for i, s in enumerate(sources)
               if i != 7]
    folds = read_folds(path, dataset)
    assert len(folds) == 5
    validation = [i for f in folds for i in f["validation"]]
    assert sorted(validation) == sorted(e["id"] for e in dataset)  # disjoint and covering, the missing one dropped
    for fold in folds:
        assert not set(fold["train"]) & set(fold["validation"])
        assert len(fold["train"]) + len(fold["validation"]) == 209
