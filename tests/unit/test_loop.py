"""The training loop on tiny phantoms: exact resume, history timings, time budget, divergence, best-model choice."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.training.loop as loop
from pipeline.config import PipelineConfig, load_config
from pipeline.demo_data import phantom
from pipeline.errors import StageError
from pipeline.io.nifti import save_nifti
from pipeline.runtime import seed_everything
from pipeline.training.checkpoints import load_checkpoint, load_latest
from pipeline.training.loop import _Best, batch_size, run_training

PLANS = {"num_classes": 3, "patch_size": [16, 16, 16], "target_spacing": [1.0, 1.0, 1.0]}


class Killed(Exception):
    """Stands in for the process dying right after an epoch's checkpoint."""


def write_problem(folder: Path, n: int = 4, *, shape: tuple[int, int, int] = (16, 16, 16)) -> list[dict[str, str]]:
    """``n`` phantom image/label pairs as preprocessed NIfTI files; the items run_training takes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        image, label = phantom(rng, shape=shape)
        image = type(image)((image.array - 300.0) / 200.0, image.affine)  # roughly z-scored, as preprocess leaves it
        save_nifti(image, folder / f"s{i}_image.nii.gz")
        save_nifti(label, folder / f"s{i}_label.nii.gz")
        items.append({"id": f"s{i}", "image": str(folder / f"s{i}_image.nii.gz"),
                      "label": str(folder / f"s{i}_label.nii.gz")})
    return items


def tiny_config(*overrides: str) -> PipelineConfig:
    return load_config(None, overrides=["train.epochs=3", "train.batch_size=2", "train.samples_per_volume=1",
                                        "train.network.channels=[4,8,16]", "train.network.strides=[2,2]",
                                        "train.num_workers=0", "train.device=cpu", "train.tensorboard=false",
                                        *overrides])


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return write_problem(tmp_path_factory.mktemp("loop"))


def _train(config: PipelineConfig, items: list[dict[str, str]], out: Path, **kwargs: object) -> loop.TrainResult:
    seed_everything(config.seed)
    return run_training(config=config, plans=PLANS, train_items=items[:3], val_items=items[3:], out=out,
                        device="cpu", **kwargs)


def test_resume_after_epoch_two_is_bit_identical(items: list[dict[str, str]], tmp_path: Path) -> None:
    config = tiny_config("train.network.deep_supervision=true")
    straight = _train(config, items, tmp_path / "straight")

    def die_after_two(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        _train(config, items, tmp_path / "resumed", on_epoch_end=die_after_two)
    state, _ = load_latest(tmp_path / "resumed" / "checkpoints")
    assert state["epoch"] == 2
    torch.manual_seed(12345)  # a fresh process: the global RNGs hold something else
    np.random.seed(99)
    resumed = _train(config, items, tmp_path / "resumed", resume=state)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == straight.epochs_run == 3

    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(not torch.equal(a["model"][k], state["model"][k]) for k in a["model"])  # epoch 3 changed them
    momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    assert all(torch.equal(x, s["momentum_buffer"]) for x, s in zip(momentum, b["optimizer"]["state"].values(),
                                                                   strict=True))
    keys = ["epoch", "train_loss", "val_mean_dice", "val_ema_dice", "lr", "samples"]
    assert [{k: r.get(k) for k in keys} for r in straight.history] == [{k: r.get(k) for k in keys}
                                                                       for r in resumed.history]
    assert (straight.best_epoch, straight.best_metric) == (resumed.best_epoch, resumed.best_metric)
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["name"] == "poly"
    assert {"rng", "scaler", "best_ema", "val_ema", "train_seconds"} <= set(b)
    assert "loader" in b["rng"] and {"python", "numpy", "torch"} <= set(b["rng"])


def test_history_records_data_and_step_time(items: list[dict[str, str]], tmp_path: Path) -> None:
    result = _train(tiny_config("train.epochs=2", "train.val_every=2"), items, tmp_path)
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["step_seconds"]) > 0 and float(row["data_seconds"]) >= 0
        assert float(row["seconds"]) >= float(row["step_seconds"]) + float(row["data_seconds"])
        assert row["samples"] == "2"  # 3 volumes, batches of 2, the incomplete batch dropped
    assert rows[0]["val_mean_dice"] == "" and rows[1]["val_mean_dice"] != ""  # val_every=2
    # one step per epoch: SGD's default 0.01 at the start, then poly at half of the 2 epochs
    assert float(rows[0]["lr"]) == 0.01 and float(rows[1]["lr"]) == pytest.approx(0.01 * 0.5**0.9)
    assert result.best_epoch == 2 and (tmp_path / "checkpoints/best.pt").is_file()
    assert (tmp_path / "progress.png").is_file()


def test_time_budget_stops_after_the_epoch_that_reaches_it(items: list[dict[str, str]], tmp_path: Path) -> None:
    result = _train(tiny_config("train.epochs=50", "train.max_minutes=0.0001"), items, tmp_path)
    assert result.stopped_by == "max_minutes" and result.epochs_run == 1
    assert result.history[0]["val_mean_dice"] is not None  # the last epoch is always validated


def test_divergence_is_a_stage_error(items: list[dict[str, str]], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    class NanLoss(torch.nn.Module):
        def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return output.float().mean() * float("nan")

    monkeypatch.setattr(loop, "segmentation_loss", NanLoss)
    with pytest.raises(StageError, match="diverged") as info:
        _train(tiny_config(), items, tmp_path)
    assert info.value.code == "training_diverged"


def test_batch_size_comes_from_config_then_plans() -> None:
    assert batch_size(tiny_config("train.batch_size=5"), {"batch_size": 9}) == 5
    assert batch_size(load_config(None), {"batch_size": 9}) == 9
    assert batch_size(load_config(None), {}) == 2


def test_best_model_follows_the_moving_average() -> None:
    best = _Best()
    for epoch, dice in enumerate([0.5, 0.9, 0.1, 0.2], start=1):
        best.update(dice, {"1": dice}, epoch)
    assert best.epoch == 2 and best.metric == 0.9 and best.best_ema == pytest.approx(0.54)
    best = _Best()
    for epoch, dice in enumerate([0.5, 0.4, 0.9], start=1):  # a dip, then the average climbs past its peak
        best.update(dice, {"1": dice}, epoch)
    assert best.epoch == 3 and best.ema == pytest.approx(0.531)


def test_other_networks_train_through_the_loop(items: list[dict[str, str]], tmp_path: Path) -> None:
    config = tiny_config("train.epochs=2", "train.network.name=unet", "train.optimizer=adamw")
    result = _train(config, items, tmp_path)
    assert result.epochs_run == 2 and result.history[1]["lr"] == pytest.approx(5e-4)  # cosine from AdamW's 1e-3


def test_validation_dice_of_a_perfect_and_an_empty_prediction() -> None:
    label = torch.zeros(1, 1, 12, 12, 12)
    label[..., 2:6, 2:6, 2:6] = 1
    label[..., 7:10, 7:10, 7:10] = 2
    volumes = [{"id": "a", "image": label.clone(), "label": label}]

    def oracle(x: torch.Tensor) -> torch.Tensor:  # class c scores highest where the image holds c
        return torch.cat([-(x - c) ** 2 for c in range(4)], dim=1)

    def background(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones_like(x), torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    kwargs = {"num_classes": 4, "patch_size": [8, 8, 8], "device": "cpu", "amp": False}
    perfect = loop.validate(_Module(oracle), volumes, **kwargs)
    assert perfect[:2] == [1.0, 1.0] and np.isnan(perfect[2])  # class 3 is absent from the reference
    assert loop.validate(_Module(background), volumes, **kwargs)[:2] == [0.0, 0.0]
    half = label.clone()
    half[..., 2:4, 2:6, 2:6] = 0  # half of class 1 missed: Dice 2 * 32 / (32 + 64)
    assert loop.validate(_Module(oracle), [{"id": "b", "image": half, "label": label}], **kwargs)[0] == \
        pytest.approx(2 / 3)


class _Module(torch.nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_rng_state_includes_the_loader_generator() -> None:
    from pipeline.training.checkpoints import restore_rng_state, rng_state

    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    state = rng_state(loader=generator)
    expected = (torch.rand(3), torch.rand(3, generator=generator))
    torch.manual_seed(99)
    generator.manual_seed(99)
    restore_rng_state(state, loader=generator)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=generator), expected[1])
