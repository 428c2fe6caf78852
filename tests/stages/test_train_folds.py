"""Cross-validation in the train stage: fold k into OUT/fold_k, 'all' skipping finished folds, cv.json, ensembling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.fileio import read_json
from pipeline.stages.infer import infer
from pipeline.stages.train import train
from pipeline.training.split import make_folds
from tests.stages.test_train import preprocessed  # noqa: F401  (module fixture: 6 preprocessed phantoms)

TINY = [
    "train.network.name=unet", "train.network.channels=[4,8]", "train.network.strides=[2]",
    "train.network.num_res_units=0", "train.epochs=1", "train.batch_size=2", "train.samples_per_volume=1",
    "train.optimizer=adamw", "train.num_workers=0", "train.device=cpu", "train.tensorboard=false",
    "train.num_folds=2", "preprocess.patch_size=[16,16,16]", "infer.device=cpu", "infer.sw_batch_size=2",
]


def tiny(*extra: str) -> PipelineConfig:
    return load_config(None, overrides=[*TINY, *extra])


def _ids(preprocessed: Path) -> list[str]:  # noqa: F811
    return sorted(e["id"] for e in read_json(preprocessed / "dataset.json")["studies"])


@pytest.fixture(scope="module")
def cv_run(preprocessed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:  # noqa: F811
    out = tmp_path_factory.mktemp("cv") / "03_train"
    one = train(preprocessed, out, config=tiny("train.fold=1"))
    every = train(preprocessed, out, config=tiny("train.fold=all"))
    return out, one, every


def test_fold_k_trains_into_its_own_folder(cv_run: tuple[Path, dict, dict], preprocessed: Path) -> None:  # noqa: F811
    out, one, _ = cv_run
    fold = out / "fold_1"
    assert one["status"] == "complete" and one["fold"] == 1 and one["epochs_run"] == 1
    assert read_json(fold / "record.json")["config"]["train"]["fold"] == 1
    expected = make_folds(_ids(preprocessed), num_folds=2, seed=0)[1]
    assert read_json(fold / "split.json") == expected
    meta = read_json(fold / "model" / "model.json")
    assert meta["fold"] == 1 and meta["patch_size"] == [16, 16, 16] and meta["flip_axes"] == [0, 1, 2]
    validation = read_json(fold / "validation.json")
    assert validation["fold"] == 1 and [s["id"] for s in validation["studies"]] == expected["validation"]
    assert not (out / "model").exists()  # a fold run writes nothing but its fold folder


def test_all_folds_skip_finished_ones_and_summarise(cv_run: tuple[Path, dict, dict],
                                                   preprocessed: Path) -> None:  # noqa: F811
    out, _, every = cv_run
    assert every["status"] == "complete" and every["num_folds"] == 2
    assert [(f["fold"], f["skipped"]) for f in every["folds"]] == [(0, False), (1, True)]
    validated = sorted(s["id"] for s in every["studies"])
    assert validated == _ids(preprocessed)  # each study validated once, in its fold
    cv = read_json(out / "cv.json")
    assert [f["fold"] for f in cv["folds"]] == [0, 1] and cv["pooled"]["studies"] == 6
    for k in (0, 1):
        assert cv["folds"][k]["dice"] == read_json(out / f"fold_{k}" / "validation.json")["mean"]["dice"]
    for c in ("1", "2"):
        values = [f["dice"][c] for f in cv["folds"] if f["dice"][c] is not None]
        if values:
            assert cv["mean_over_folds"]["dice"][c] == pytest.approx(sum(values) / len(values), abs=1e-6)
    assert set(cv["postprocess"]["classes"]) <= {1, 2}
    again = train(preprocessed, out, config=tiny("train.fold=all"))
    assert again.get("skipped") is True


def test_infer_ensembles_the_folds(cv_run: tuple[Path, dict, dict], preprocessed: Path,  # noqa: F811
                                   tmp_path: Path) -> None:
    out, _, _ = cv_run
    record = infer(out, preprocessed.parent / "01_ingest", tmp_path / "04_infer", config=tiny())
    assert record["status"] == "complete"
    index = read_json(tmp_path / "04_infer" / "predictions.json")
    assert index["model"]["folds"] == [0, 1]
    assert index["postprocess"]["classes"] == read_json(out / "cv.json")["postprocess"]["classes"]


def test_fold_from_an_id_keyed_split_file(preprocessed: Path, tmp_path: Path) -> None:  # noqa: F811
    ids = _ids(preprocessed)
    path = tmp_path / "folds.json"
    path.write_text(json.dumps({"key": "id", "folds": [{"train": ids[2:], "validation": ids[:2]},
                                                       {"train": ids[:4], "validation": ids[4:]}]}))
    train(preprocessed, tmp_path / "t", config=tiny("train.fold=1", f"data.split_file={path}"))
    split = read_json(tmp_path / "t" / "fold_1" / "split.json")
    assert split["train"] == ids[:4] and split["validation"] == ids[4:]
