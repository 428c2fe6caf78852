"""The train stage on phantoms: outputs, weights-only model, split, resume after a kill, checkpoint fallback."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

import pipeline.stages.train as train_stage
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, save_manifest
from pipeline.models.segmenters import build_segmenter
from pipeline.stages.preprocess import preprocess
from pipeline.stages.train import train
from pipeline.training.checkpoints import LAST, PREVIOUS, load_checkpoint
from tests.stages.test_preprocess import make_ingest

PREPROCESS = load_config(None, overrides=["preprocess.patch_size=[24,24,24]"])


class Killed(Exception):
    """Stands in for the process being killed right after an epoch's checkpoint was written."""


@pytest.fixture(scope="module")
def preprocessed(msd_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    make_ingest(msd_dataset, root / "01_ingest")
    preprocess(root / "01_ingest", root / "02_preprocess", config=PREPROCESS)
    return root / "02_preprocess"


def _with(config: PipelineConfig, **train: object) -> PipelineConfig:
    return config.model_copy(update={"train": config.train.model_copy(update={"num_workers": 0, "device": "cpu",
                                                                              **train})})


def _untimed(path: Path) -> list[dict[str, str]]:
    """history.csv rows without the timing columns (seconds, data_seconds, ...)."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(handle)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_train_writes_model_history_and_split(preprocessed: Path, tmp_path: Path,
                                              tiny_config: PipelineConfig) -> None:
    config = _with(tiny_config)
    out = tmp_path / "03_train"
    record = train(preprocessed, out, config=config)
    assert record["status"] == "complete"
    assert record["epochs_run"] == 2 and record["stopped_by"] == "epochs" and record["resumed_from_epoch"] is None
    assert record["best_epoch"] in (1, 2) and set(record["val_dice"]) == {"core", "shell"}
    assert record["device_type"] == "cpu"

    split = json.loads((out / "split.json").read_text())
    ids = [e["id"] for e in json.loads((preprocessed / "dataset.json").read_text())["studies"]]
    assert split["seed"] == config.seed
    assert len(split["validation"]) == 2 and len(split["train"]) == 4
    assert sorted(split["train"] + split["validation"]) == sorted(ids)

    meta = json.loads((out / "model/model.json").read_text())
    assert meta["out_channels"] == 3 and meta["in_channels"] == 1 and meta["patch_size"] == [24, 24, 24]
    # the plans travel with the model
    assert meta["plans"] == {**json.loads((preprocessed / "plans.json").read_text()), "patch_size": [24, 24, 24]}
    assert meta["fold"] is None and meta["flip_axes"] == [0, 1, 2]  # the default augmentation mirrors every axis
    model = build_segmenter(meta["network"], in_channels=meta["in_channels"], out_channels=meta["out_channels"],
                            plans=meta["plans"])
    model.load_state_dict(torch.load(out / "model/model.pt", weights_only=True))
    best = torch.load(out / "checkpoints/best.pt", weights_only=True)
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())

    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"epoch", "train_loss", "val_dice_1", "val_dice_2", "val_mean_dice", "lr", "seconds"}
    best_row = rows[record["best_epoch"] - 1]
    assert float(best_row["val_mean_dice"]) == pytest.approx(record["best_mean_dice"], abs=1e-6)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) <= (config.train.learning_rate or 1e-3)

    validation = json.loads((out / "validation.json").read_text())
    assert [row["id"] for row in validation["studies"]] == split["validation"]
    assert set(validation["mean"]["dice"]) == {"1", "2"} and validation["settings"]["space"] == "preprocessed"
    assert record["validation"] == validation["mean"] and "validation.json" in record["outputs"]

    again = train(preprocessed, out, config=config)
    assert again.get("skipped") is True


def test_kill_and_resume_equals_uninterrupted_run(preprocessed: Path, tmp_path: Path,
                                                  tiny_config: PipelineConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = _with(tiny_config, epochs=2)
    train(preprocessed, tmp_path / "straight", config=config)

    def kill_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_stage, "run_training",
                      functools.partial(train_stage.run_training, on_epoch_end=kill_after_first))
        with pytest.raises(Killed):
            train(preprocessed, tmp_path / "killed", config=config)
    assert load_checkpoint(tmp_path / "killed/checkpoints" / LAST)["epoch"] == 1
    assert not (tmp_path / "killed/record.json").exists()

    resumed = train(preprocessed, tmp_path / "killed", config=config)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 2
    straight = _weights(tmp_path / "straight/checkpoints" / LAST)
    again = _weights(tmp_path / "killed/checkpoints" / LAST)
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert _untimed(tmp_path / "straight/history.csv") == _untimed(tmp_path / "killed/history.csv")


def test_more_epochs_continue_from_the_checkpoint(preprocessed: Path, tmp_path: Path,
                                                  tiny_config: PipelineConfig) -> None:
    out = tmp_path / "t"
    first = train(preprocessed, out, config=_with(tiny_config, epochs=1))
    assert first["epochs_run"] == 1
    one = _weights(out / "checkpoints" / LAST)
    second = train(preprocessed, out, config=_with(tiny_config, epochs=2))
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == 2
    assert load_checkpoint(out / "checkpoints" / PREVIOUS)["epoch"] == 1
    assert all(torch.equal(one[k], v) for k, v in _weights(out / "checkpoints" / PREVIOUS).items())
    assert (out / "history.csv").read_text().count("\n") == 3


def test_corrupt_last_checkpoint_falls_back_to_previous(preprocessed: Path, tmp_path: Path,
                                                        tiny_config: PipelineConfig,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "t"
    train(preprocessed, out, config=_with(tiny_config, epochs=2))
    last = out / "checkpoints" / LAST
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a crash during a copy
    (out / "record.json").unlink()
    record = train(preprocessed, out, config=_with(tiny_config, epochs=2))
    assert "truncated or corrupt" in caplog.text and "falling back" in caplog.text
    assert record["resumed_from_epoch"] == 1 and record["status"] == "complete"
    assert load_checkpoint(last)["epoch"] == 2


def test_split_file_is_honoured(preprocessed: Path, tmp_path: Path, tiny_config: PipelineConfig) -> None:
    ids = sorted(e["id"] for e in json.loads((preprocessed / "dataset.json").read_text())["studies"])
    split_file = tmp_path / "my_split.json"
    split_file.write_text(json.dumps({"seed": 3, "train": ids[:5], "validation": ids[5:]}))
    config = _with(tiny_config, epochs=1).model_copy(
        update={"data": tiny_config.data.model_copy(update={"split_file": split_file})})
    train(preprocessed, tmp_path / "t", config=config)
    assert json.loads((tmp_path / "t/split.json").read_text()) == {"seed": 3, "train": ids[:5],
                                                                    "validation": ids[5:]}
    shutil.rmtree(tmp_path / "t")


def test_a_wrong_folder_given_to_train_names_the_step_before_it_and_writes_nothing(tmp_path: Path) -> None:
    ingested = tmp_path / "01_ingest"
    save_manifest(Manifest(), ingested)
    with pytest.raises(ManifestError, match="is an ingest folder, not a preprocess folder") as caught:
        train(ingested, tmp_path / "train")
    assert f"run 'medpipe preprocess {ingested} --out PREPROCESS'" in str(caught.value)
    with pytest.raises(ManifestError, match="run 'medpipe preprocess INGEST --out PREPROCESS'"):
        train(tmp_path / "elsewhere", tmp_path / "train2")
    with pytest.raises(ManifestError, match="run 'medpipe ingest SCAN_DIR --out DIR' first"):
        train(tmp_path / "elsewhere", tmp_path / "train3", config=PipelineConfig(task="classification"))
    # a wrong folder leaves nothing behind: no config.yaml that would mark an unfinished run
    assert not any(tmp_path.glob("train*"))
