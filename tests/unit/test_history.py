"""Training logs: history.csv columns and values, TensorBoard scalars read back, the progress plot."""

from __future__ import annotations

import builtins
import csv
import logging
from pathlib import Path

import pytest

import pipeline.training.history as history_module
from pipeline.training.history import HISTORY_CSV, PROGRESS_PNG, TENSORBOARD_DIR, HistoryLogger, history_columns

ROWS = [
    {"epoch": 1, "train_loss": 1.5, "val_dice_1": 0.2, "val_dice_2": 0.4, "val_mean_dice": 0.3,
     "val_ema_dice": 0.3, "lr": 0.01, "samples": 8, "seconds": 2.0, "data_seconds": 0.5, "step_seconds": 1.2,
     "val_seconds": 0.3},
    {"epoch": 2, "train_loss": 1.1, "lr": 0.005, "samples": 8, "seconds": 1.5, "data_seconds": 0.1,
     "step_seconds": 1.3, "val_seconds": 0.0},
    {"epoch": 3, "train_loss": 0.9, "val_dice_1": 0.5, "val_dice_2": 0.7, "val_mean_dice": 0.6,
     "val_ema_dice": 0.33, "lr": 0.001, "samples": 8, "seconds": 2.1, "data_seconds": 0.2, "step_seconds": 1.3,
     "val_seconds": 0.6},
]


def _log_all(out: Path, rows: list[dict], **kwargs: object) -> None:
    logger = HistoryLogger(out, [1, 2], **kwargs)
    for i in range(len(rows)):
        logger.log(rows[: i + 1])
    logger.close()


def test_csv_has_every_column_and_blank_for_missing(tmp_path: Path) -> None:
    _log_all(tmp_path, ROWS, tensorboard=False)
    with open(tmp_path / HISTORY_CSV, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == history_columns([1, 2])
    assert {"data_seconds", "step_seconds", "val_seconds", "val_ema_dice", "samples"} <= set(reader.fieldnames)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["val_mean_dice"] == "" and float(rows[2]["val_dice_2"]) == 0.7
    assert float(rows[0]["data_seconds"]) == 0.5 and float(rows[2]["lr"]) == 0.001


def test_progress_plot_is_a_png_rewritten_each_epoch(tmp_path: Path) -> None:
    logger = HistoryLogger(tmp_path, [1, 2], tensorboard=False)
    logger.log(ROWS[:1])
    first = (tmp_path / PROGRESS_PNG).read_bytes()
    logger.log(ROWS)
    second = (tmp_path / PROGRESS_PNG).read_bytes()
    assert first[:8] == second[:8] == b"\x89PNG\r\n\x1a\n" and first != second
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # atomic: no temporary left


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    _log_all(tmp_path, ROWS)
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.5, 1.1, 0.9])
    assert scalars["val/mean_dice"] == [(1, pytest.approx(0.3)), (3, pytest.approx(0.6))]
    assert [v for _, v in scalars["val/dice_2"]] == pytest.approx([0.4, 0.7])
    assert [v for _, v in scalars["time/data_seconds"]] == pytest.approx([0.5, 0.1, 0.2])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([0.01, 0.005, 0.001])


def test_a_resumed_run_replaces_the_epochs_it_repeats(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    _log_all(tmp_path, ROWS)  # a run logged epochs 1-3 but its checkpoint holds epoch 2
    logger = HistoryLogger(tmp_path, [1, 2], start_epoch=3)
    logger.log([*ROWS[:2], {**ROWS[2], "train_loss": 0.7}])
    logger.close()
    assert _scalars(tmp_path / TENSORBOARD_DIR)["train/loss"] == [(1, pytest.approx(1.5)), (2, pytest.approx(1.1)),
                                                                  (3, pytest.approx(0.7))]


def test_missing_tensorboard_warns_once_and_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(history_module, "_warned_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.history"):
        _log_all(tmp_path / "a", ROWS)
        _log_all(tmp_path / "b", ROWS)
    assert sum("tensorboard" in r.getMessage() for r in caplog.records) == 1
    assert (tmp_path / "a" / HISTORY_CSV).is_file() and not (tmp_path / "a" / TENSORBOARD_DIR).exists()
