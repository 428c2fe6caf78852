"""Predictor: model folder loading, sliding-window prediction, exact mapping back onto the input grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from pipeline.config import InferConfig, NetworkConfig
from pipeline.errors import CheckpointError
from pipeline.fileio import write_json_atomic
from pipeline.inference.predictor import Predictor, load_model, resample_to_grid, resolve_model_dir
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.models.segmenters import build_segmenter

TINY_NET = NetworkConfig(name="unet", channels=(4, 8), strides=(2,), num_res_units=0)
LABELS = {"0": "background", "1": "core", "2": "shell"}


def tiny_plans(*, spacing: list[float] | None = (1.0, 1.0, 1.0), normalization: str = "zscore") -> dict[str, Any]:
    return {"schema_version": 1, "orientation": "RAS", "target_spacing": list(spacing) if spacing else None,
            "normalization": normalization, "crop_foreground": False, "patch_size": [16, 16, 16],
            "num_classes": 3, "labels": LABELS, "modality": "MRI",
            "intensity": {"mean": 0.0, "std": 1.0, "p005": -1.0, "p995": 1.0}, "fingerprint": {}}


def make_model_folder(folder: Path, *, plans: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A model folder as train writes it: model.json + model.pt (a plain state_dict) of a tiny UNet."""
    plans = plans or tiny_plans()
    torch.manual_seed(seed)
    net = build_segmenter(TINY_NET, in_channels=1, out_channels=3)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    write_json_atomic(folder / "model.json", {
        "schema_version": 1, "task": "segmentation", "network": TINY_NET.model_dump(mode="json"),
        "in_channels": 1, "out_channels": 3, "plans": plans, "labels": LABELS,
        "patch_size": plans["patch_size"], "config_hash": "abc123", "seed": seed,
    })
    return folder


class ThresholdNet(nn.Module):
    """A 'segmenter' whose output is a fixed function of intensity: class = (x > 1) + (x > 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = (x > 1.0).long() + (x > 2.0).long()
        return torch.nn.functional.one_hot(classes[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 10.0


def affine_for(code: str, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """An affine whose array axes follow ``code`` (e.g. LPS, ASR) with the given voxel sizes."""
    axis_of = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for col, letter in enumerate(code):
        row, sign = axis_of[letter]
        affine[row, col] = sign * spacing[col]
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2) + np.array([3.0, -7.0, 11.0])
    return affine


def blocky_image(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Piecewise-constant intensities 0 / 1.5 / 2.5 in boxes, plus an off-centre marker, asymmetric on every axis."""
    img = np.zeros(shape, dtype=np.float32)
    x, y, z = shape
    img[2:x - 5, 3:y - 2, 1:z - 6] = 1.5
    img[4:x // 2, 5:y // 2 + 1, 3:z // 2] = 2.5
    img[x - 4, y - 3, z - 3] = 2.5
    return img + rng.uniform(-0.2, 0.2, size=shape).astype(np.float32)


def threshold(img: np.ndarray) -> np.ndarray:
    return ((img > 1.0).astype(np.uint8) + (img > 2.0).astype(np.uint8)).astype(np.uint8)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_folder(tmp_path / "03_train" / "model")


@pytest.mark.parametrize(
    ("code", "spacing"),
    [("RAS", (1.0, 1.0, 1.0)), ("LAS", (1.0, 1.0, 1.0)), ("LPS", (1.0, 1.0, 1.0)),
     ("RAS", (0.8, 1.0, 1.5)), ("LPI", (0.8, 1.0, 1.5)), ("ASL", (1.2, 0.7, 1.0))],
)
def test_prediction_has_exactly_the_input_grid(model_dir: Path, tmp_path: Path, code: str, spacing: tuple) -> None:
    shape = (21, 18, 13)
    affine = affine_for(code, spacing, shape)
    rng = np.random.default_rng(0)
    path = save_nifti(Volume(rng.normal(size=shape).astype(np.float32), affine), tmp_path / "img.nii.gz")
    predictor, _ = Predictor.from_folder(model_dir, config=InferConfig(sw_batch_size=2, device="cpu"))
    out = predictor.predict_file(path)
    assert out.shape == shape
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.affine, load_nifti(path).affine)
    assert set(np.unique(out.array)) <= {0, 1, 2}


@pytest.mark.parametrize("code", ["RAS", "LAS", "LPS", "PIR", "SLA"])
def test_threshold_model_gives_back_the_thresholded_input_exactly(code: str) -> None:
    shape = (19, 14, 11)
    spacing = (0.8, 1.0, 1.5)
    img = blocky_image(shape, np.random.default_rng(1))
    volume = Volume(img, affine_for(code, spacing, shape))
    predictor = Predictor(ThresholdNet(), tiny_plans(spacing=None, normalization="none"),
                          config=InferConfig(device="cpu", sw_batch_size=2))
    out = predictor.predict_volume(volume)
    np.testing.assert_array_equal(out.affine, volume.affine)
    np.testing.assert_array_equal(out.array, threshold(img))


@pytest.mark.parametrize("code", ["RAS", "LPS"])
def test_threshold_model_through_resampling_matches_away_from_edges(code: str) -> None:
    """Anisotropic 0.8 x 1 x 1.5 mm input resampled to 1 mm and back: labels agree except at class boundaries."""
    shape = (30, 24, 16)
    img = blocky_image(shape, np.random.default_rng(2))
    img[img.shape[0] - 4, img.shape[1] - 3, img.shape[2] - 3] = 0.0  # drop the one-voxel marker
    volume = Volume(img, affine_for(code, (0.8, 1.0, 1.5), shape))
    predictor = Predictor(ThresholdNet(), tiny_plans(spacing=(1.0, 1.0, 1.0), normalization="none"),
                          config=InferConfig(device="cpu", sw_batch_size=2, tta=True))
    out = predictor.predict_volume(volume)
    expected = threshold(img)
    interior = np.ones(shape, dtype=bool)
    for value in (0, 1, 2):
        boundary = ndimage.binary_dilation(expected == value, iterations=2) & (expected != value)
        interior &= ~boundary
    np.testing.assert_array_equal(out.array[interior], expected[interior])
    assert (out.array == expected).mean() > 0.95


def test_resample_to_grid_is_exact_for_flips_and_permutations() -> None:
    values = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    src = np.diag([1.0, 2.0, 3.0, 1.0])
    # target: axes reversed (z, y, x), x flipped
    dst = np.array([[0, 0, -1, 2], [0, 2, 0, 0], [3, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    out = resample_to_grid(values, src_affine=src, dst_affine=dst, dst_shape=(5, 4, 3))
    np.testing.assert_array_equal(out, np.transpose(values, (0, 3, 2, 1))[:, :, :, ::-1])


def test_model_folder_accepts_train_folder(model_dir: Path) -> None:
    assert resolve_model_dir(model_dir.parent) == model_dir
    bundle = load_model(model_dir.parent)
    assert bundle.num_classes == 3 and bundle.labels == LABELS and len(bundle.sha256) == 64


def test_missing_model_json_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_corrupt_weights_raise_checkpoint_error(model_dir: Path, damage: str) -> None:
    weights = model_dir / "model.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "garbage":
        weights.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"optimizer": object()}, weights)  # arbitrary pickled object: refused by weights_only
    with pytest.raises(CheckpointError, match="model.pt") as info:
        load_model(model_dir)
    assert info.value.code == "checkpoint_corrupt"


def test_weights_that_do_not_fit_the_network_are_refused(model_dir: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3)}, model_dir / "model.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(model_dir)


def test_prediction_is_deterministic(model_dir: Path, phantom_pair) -> None:
    image, _ = phantom_pair
    predictor, _ = Predictor.from_folder(model_dir, config=InferConfig(device="cpu", sw_batch_size=2))
    a = predictor.predict_volume(image).array
    b = predictor.predict_volume(image).array
    np.testing.assert_array_equal(a, b)
