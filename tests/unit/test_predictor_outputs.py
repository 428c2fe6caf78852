"""Predictor outputs: probability maps on the input grid, postprocessed labels, fold folders as an ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import InferConfig
from pipeline.errors import CheckpointError
from pipeline.inference.model_loading import load_models, resolve_model_dirs
from pipeline.inference.predictor import Predictor, save_probability_map
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from tests.unit.test_predictor import ThresholdNet, affine_for, blocky_image, make_model_folder, tiny_plans


def test_probability_map_is_on_the_input_grid_and_sums_to_one(tmp_path: Path) -> None:
    shape = (21, 18, 13)
    volume = Volume(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                    affine_for("LPI", (0.8, 1.0, 1.5), shape))
    predictor, _ = Predictor.from_folder(make_model_folder(tmp_path / "m"),
                                         config=InferConfig(device="cpu", sw_batch_size=2))
    prediction = predictor.predict(volume, probabilities=True)
    probs = prediction.probabilities
    assert probs is not None and probs.array.shape == (*shape, 3)
    np.testing.assert_array_equal(probs.affine, volume.affine)
    np.testing.assert_allclose(probs.array.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(probs.array, axis=-1), prediction.labels.array)

    path = save_probability_map(probs, tmp_path / "p.nii.gz")
    saved = load_nifti(path, allow_4d=True)
    assert saved.array.shape == (*shape, 3) and saved.meta["source_dtype"] == "uint8"
    np.testing.assert_allclose(saved.affine, volume.affine, atol=1e-5)  # NIfTI stores the affine as float32
    np.testing.assert_allclose(saved.array.sum(axis=-1), 1.0, atol=3 * 0.5 / 255 + 1e-6)
    np.testing.assert_allclose(saved.array, probs.array, atol=0.5 / 255 + 1e-6)
    first = path.read_bytes()
    save_probability_map(probs, path)
    assert path.read_bytes() == first  # deterministic


def test_largest_component_postprocessing_in_predict() -> None:
    shape = (19, 14, 11)
    img = blocky_image(shape, np.random.default_rng(1))  # class 2: a box plus a one-voxel marker far from it
    volume = Volume(img, affine_for("RAS", (1.0, 1.0, 1.0), shape))
    plans = tiny_plans(spacing=None, normalization="none")
    config = InferConfig(device="cpu", sw_batch_size=2)
    raw = Predictor(ThresholdNet(), plans, config=config).predict_volume(volume).array
    cleaned = Predictor(ThresholdNet(), plans, config=config, postprocess=[2]).predict_volume(volume).array
    marker = (shape[0] - 4, shape[1] - 3, shape[2] - 3)
    assert raw[marker] == 2 and cleaned[marker] == 0
    changed = raw != cleaned
    assert changed.sum() == 1 and (cleaned[~changed] == raw[~changed]).all()


def _fold_folders(root: Path, folds: list[int], *, flip_axes: list[int]) -> Path:
    for k in folds:
        folder = make_model_folder(root / f"fold_{k}" / "model", seed=k)
        meta = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps({**meta, "fold": k, "flip_axes": flip_axes}))
    return root


def test_fold_folders_are_an_ensemble(tmp_path: Path) -> None:
    train = _fold_folders(tmp_path / "03_train", [0, 1, 2], flip_axes=[0, 2])
    (train / "fold_3").mkdir()  # started, not finished: left out
    assert resolve_model_dirs(train) == [train / f"fold_{k}" / "model" for k in (0, 1, 2)]
    assert resolve_model_dirs(train / "model") == resolve_model_dirs(train)  # RUN/03_train/model of a CV run
    assert resolve_model_dirs(train, folds=[2, 0]) == [train / "fold_0/model", train / "fold_2/model"]
    with pytest.raises(CheckpointError, match=r"fold\(s\) 3, 7 .*trained folds: 0, 1, 2"):
        resolve_model_dirs(train, folds=[0, 3, 7])

    predictor, bundles = Predictor.from_models(train, config=InferConfig(device="cpu", tta=True, folds=(0, 1)))
    assert [b.fold for b in bundles] == [0, 1] and len(predictor.networks) == 2
    assert predictor.flip_axes == (0, 2) and predictor.window.passes == 2 * 4


def test_ensemble_members_must_share_plans(tmp_path: Path) -> None:
    train = _fold_folders(tmp_path / "t", [0], flip_axes=[])
    make_model_folder(train / "fold_1" / "model", plans={**tiny_plans(), "target_spacing": [2.0, 2.0, 2.0]})
    with pytest.raises(CheckpointError, match="different plans"):
        load_models(train)


def test_single_model_folder_is_preferred_and_legacy_flip_axes(tmp_path: Path) -> None:
    train = tmp_path / "03_train"
    make_model_folder(train / "model")
    _fold_folders(train, [0], flip_axes=[1])
    assert resolve_model_dirs(train) == [train / "model"]
    assert resolve_model_dirs(train, folds=[0]) == [train / "fold_0" / "model"]
    (bundle,) = load_models(train)
    assert bundle.fold is None and bundle.flip_axes == (0, 1, 2)  # model.json without flip_axes
