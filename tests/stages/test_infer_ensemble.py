"""The infer stage over a cross-validation train folder: fold ensemble, 'auto' postprocessing, probability maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import CheckpointError
from pipeline.fileio import read_json
from pipeline.io.nifti import load_nifti
from pipeline.stages.infer import infer
from tests.stages.test_infer import image_folder  # noqa: F401  (fixture)
from tests.unit.test_predictor import make_model_folder

OVERRIDES = ["infer.device=cpu", "infer.sw_batch_size=2", "infer.overlap=0.25"]


def cv_folder(root: Path) -> Path:
    """A train folder with fold_0 and fold_1 models and their validation.json (LCC helped class 2 only)."""
    for k in (0, 1):
        make_model_folder(root / f"fold_{k}" / "model", seed=10 + k)
        (root / f"fold_{k}" / "validation.json").write_text(json.dumps({"fold": k, "studies": [
            {"id": f"s{k}", "dice": {"1": 0.8, "2": 0.6}, "dice_lcc": {"1": 0.79, "2": 0.7}}]}))
    return root


def test_ensemble_with_auto_postprocess_and_probabilities(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    train = cv_folder(tmp_path / "03_train")
    out = tmp_path / "04_infer"
    config = load_config(None, overrides=[*OVERRIDES, "infer.save_probabilities=true"])
    record = infer(train, image_folder, out, config=config)
    assert record["status"] == "complete"
    index = read_json(out / "predictions.json")
    assert index["model"]["folds"] == [0, 1] and len(index["model"]["members"]) == 2
    assert index["postprocess"]["mode"] == "auto" and index["postprocess"]["classes"] == [2]
    assert record["postprocess"]["classes"] == [2]
    for entry in index["predictions"]:
        assert entry["probabilities"] == f"probabilities/{entry['id']}.nii.gz"
        src = load_nifti(image_folder / entry["image"])
        probs = load_nifti(out / entry["probabilities"], allow_4d=True)
        labels = load_nifti(out / entry["prediction"])
        assert probs.array.shape == (*src.shape, 3)
        np.testing.assert_array_equal(probs.affine, src.affine)
        np.testing.assert_allclose(probs.array.sum(axis=-1), 1.0, atol=3 * 0.5 / 255 + 1e-6)
        assert labels.shape == src.shape
    # validation.json is an input: changing it reruns inference with the new decision
    for k in (0, 1):
        (train / f"fold_{k}" / "validation.json").write_text(json.dumps({"studies": [
            {"id": "x", "dice": {"1": 0.8, "2": 0.6}, "dice_lcc": {"1": 0.9, "2": 0.5}}]}))
    again = infer(train, image_folder, out, config=config)
    assert not again.get("skipped") and again["postprocess"]["classes"] == [1]
    # probabilities off again: the old maps are removed
    infer(train, image_folder, out, config=load_config(None, overrides=OVERRIDES))
    assert not list((out / "probabilities").iterdir())
    assert "probabilities" not in read_json(out / "predictions.json")["predictions"][0]


def test_fold_subset_and_missing_fold(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    train = cv_folder(tmp_path / "03_train")
    config = load_config(None, overrides=[*OVERRIDES, "infer.folds=[1]", "infer.postprocess=none"])
    infer(train, image_folder, tmp_path / "one", config=config)
    index = read_json(tmp_path / "one" / "predictions.json")
    assert index["model"]["folds"] == [1] and index["postprocess"] == {"mode": "none", "classes": []}
    with pytest.raises(CheckpointError, match=r"fold\(s\) 4"):
        infer(train, image_folder, tmp_path / "bad",
              config=load_config(None, overrides=[*OVERRIDES, "infer.folds=[0,4]"]))
