"""``medpipe run`` with cross-validation: fold K predicts and evaluates exactly fold K's held-out studies
with fold K's model; ``all`` trains every fold and, with nothing unlabelled to predict, ends at cv.json."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.fileio import read_json
from pipeline.runner import run_pipeline


def _config(tiny: PipelineConfig, data: Path, fold: int | str) -> PipelineConfig:
    update = {"fold": fold, "num_folds": 2, "epochs": 1, "device": "cpu"}
    return tiny.model_copy(update={"data": tiny.data.model_copy(update={"root": data}),
                                   "train": tiny.train.model_copy(update=update)})


def test_run_with_one_fold_predicts_that_folds_validation(msd_dataset: Path, tiny_config: PipelineConfig,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    records = run_pipeline(_config(tiny_config, msd_dataset, 1), run)
    assert set(records) == {"ingest", "preprocess", "train", "infer", "evaluate", "report"}
    split = read_json(run / "03_train" / "fold_1" / "split.json")
    predictions = read_json(run / "04_infer" / "predictions.json")
    assert sorted(p["id"] for p in predictions["predictions"]) == sorted(split["validation"])
    model = json.loads((run / "03_train" / "fold_1" / "model" / "model.json").read_text())
    assert model["fold"] == 1
    assert not (run / "03_train" / "fold_0").exists()  # only the fold asked for was trained
    summary = read_json(run / "05_evaluate" / "summary.json")
    assert summary["studies"] == sorted(split["validation"])


def test_run_with_all_folds_stops_at_the_cross_validation(msd_dataset: Path, tiny_config: PipelineConfig,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    records = run_pipeline(_config(tiny_config, msd_dataset, "all"), run)
    assert set(records) == {"ingest", "preprocess", "train"}  # every study is labelled: nothing to predict
    cv = read_json(run / "03_train" / "cv.json")
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    assert cv["pooled"]["studies"] == 6  # every study validated exactly once, by the fold that held it out
