"""Largest-component postprocessing, per-class Dice with and without it, and the cross-validated 'auto' decision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ManifestError
from pipeline.inference.postprocess import (
    class_dice,
    decide_postprocessing,
    dice,
    keep_largest_component,
    largest_component,
    postprocess_plan,
)


def test_largest_component_removes_a_disconnected_blob() -> None:
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels, far away
    labels[7:11, 1:3, 1:3] = 2  # class 2: one blob of 16
    labels[1, 9, 9] = 2  # and a stray voxel
    out = keep_largest_component(labels, [1])
    assert (out == 1).sum() == 64 and not out[8:10, 8:10, 8:10].any()
    assert (out == 2).sum() == 17  # class 2 not asked for: untouched
    both = keep_largest_component(labels, [1, 2])
    assert (both == 2).sum() == 16 and both[1, 9, 9] == 0
    assert labels[8, 8, 8] == 1  # the input is not modified


def test_components_are_26_connected() -> None:
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[3, 3, 3] = True  # touches the cube only at a corner: same component
    mask[5, 0, 5] = True  # isolated
    kept = largest_component(mask)
    assert kept.sum() == 9 and kept[3, 3, 3] and not kept[5, 0, 5]


def test_dice_values() -> None:
    pred = np.zeros((10, 10, 10), dtype=np.uint8)
    ref = np.zeros_like(pred)
    ref[0:4, 0:4, 0:4] = 1  # 64
    pred[0:4, 0:4, 0:2] = 1  # 32, all inside
    pred[8:10, 8:10, 8:10] = 1  # 8 outside
    assert dice(pred == 1, ref == 1) == pytest.approx(2 * 32 / (40 + 64))
    assert math.isnan(dice(pred == 5, ref == 5))
    scores = class_dice(pred, ref, [1, 2])
    assert scores["dice"]["1"] == pytest.approx(round(64 / 104, 6))
    assert scores["dice_lcc"]["1"] == pytest.approx(round(64 / 96, 6))
    assert scores["dice"]["2"] is None and scores["dice_lcc"]["2"] is None  # absent from both: undefined


def _validation(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "validation.json"
    path.write_text(json.dumps({"schema_version": 1, "studies": rows}))
    return path


def test_auto_enables_the_component_filter_only_where_it_helped(tmp_path: Path) -> None:
    # class 1: LCC helps on average (+0.10, -0.02); class 2: it hurts (-0.05, +0.01); class 3: no change
    fold0 = _validation(tmp_path / "fold_0", [
        {"id": "a", "dice": {"1": 0.70, "2": 0.90, "3": 0.8}, "dice_lcc": {"1": 0.80, "2": 0.85, "3": 0.8}},
    ])
    fold1 = _validation(tmp_path / "fold_1", [
        {"id": "b", "dice": {"1": 0.90, "2": 0.80, "3": None}, "dice_lcc": {"1": 0.88, "2": 0.81, "3": None}},
    ])
    decision = decide_postprocessing([fold0, fold1])
    assert decision["classes"] == [1]
    assert decision["per_class"]["1"] == {"dice": 0.8, "dice_lcc": 0.84, "studies": 2}
    assert decision["per_class"]["3"]["studies"] == 1  # the undefined value is left out of the mean
    plan = postprocess_plan("auto", num_classes=4, validation_files=[fold0, fold1])
    assert plan["mode"] == "auto" and plan["classes"] == [1] and plan["connectivity"] == 26
    # a fold on its own decides differently: the decision pools every validation study
    assert decide_postprocessing([fold1])["classes"] == [2]


def test_postprocess_modes() -> None:
    assert postprocess_plan("none", num_classes=3, validation_files=[])["classes"] == []
    assert postprocess_plan("largest_component", num_classes=3, validation_files=[])["classes"] == [1, 2]
    assert postprocess_plan("auto", num_classes=3, validation_files=[]) == {
        "mode": "auto", "classes": [], "reason": "no validation.json"}


def test_unreadable_validation_file(tmp_path: Path) -> None:
    (tmp_path / "validation.json").write_text("{not json")
    with pytest.raises(ManifestError, match="validation.json"):
        decide_postprocessing([tmp_path / "validation.json"])
