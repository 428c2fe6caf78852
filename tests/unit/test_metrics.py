"""Segmentation metrics against analytic phantoms, scikit-learn, and the empty-set policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from pipeline.errors import StageError
from pipeline.metrics.segmentation import (
    class_metrics,
    describe,
    integer_labels,
    present_labels,
    segmentation_metrics,
)


def box(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def sphere(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """A ball of ``radius_mm`` around the grid centre, measured in world mm."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2


def test_offset_cubes_dice_iou_volume_are_analytic() -> None:
    shape = (24, 20, 16)
    a = box(shape, (2, 2, 2), (10, 9, 8))  # 8*7*6 = 336 voxels
    b = box(shape, (5, 4, 2), (13, 11, 8))  # 8*7*6 = 336, overlap 5*5*6 = 150
    spacing = (0.8, 1.0, 1.5)
    m = class_metrics(a, b, label=1, spacing=spacing)
    assert m.dice == pytest.approx(2 * 150 / (336 + 336), abs=1e-7)
    assert m.iou == 150 / (336 + 336 - 150)
    assert m.volume_pred_ml == pytest.approx(336 * 0.8 * 1.0 * 1.5 / 1000, rel=1e-12)
    assert m.volume_ref_ml == m.volume_pred_ml
    assert not (m.ref_empty or m.pred_empty)


def test_shifted_cube_hausdorff_is_shift_in_mm() -> None:
    shape = (20, 16, 16)
    a = box(shape, (2, 3, 3), (8, 10, 10))
    b = box(shape, (5, 3, 3), (11, 10, 10))  # shifted 3 voxels along x
    m = class_metrics(a, b, label=1, spacing=(2.0, 1.0, 1.0), percentile=100.0)
    assert m.hd == pytest.approx(6.0, abs=1e-6)
    m_y = class_metrics(a, box(shape, (2, 5, 3), (8, 12, 10)), label=1, spacing=(2.0, 0.7, 1.0), percentile=100)
    assert m_y.hd == pytest.approx(1.4, abs=1e-6)


def test_concentric_spheres_hd95_is_radius_difference_with_anisotropic_spacing() -> None:
    spacing = (0.8, 1.0, 1.5)
    shape = (60, 48, 32)
    inner = sphere(shape, spacing, 10.0)
    outer = sphere(shape, spacing, 15.0)
    m = class_metrics(inner, outer, label=1, spacing=spacing, percentile=95.0)
    assert m.hd == pytest.approx(5.0, abs=1.0)  # voxelisation error stays within a voxel
    # Same voxel counts but isotropic spacing would give a distance in voxels, not mm: guard the unit.
    m_wrong = class_metrics(inner, outer, label=1, spacing=(1.0, 1.0, 1.0), percentile=95.0)
    assert abs(m_wrong.hd - 5.0) > abs(m.hd - 5.0)


def test_dice_matches_sklearn_f1_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        ref = rng.random((12, 14, 10)) < 0.3
        pred = rng.random((12, 14, 10)) < 0.4
        m = class_metrics(pred, ref, label=1, spacing=(1.0, 1.0, 1.0))
        assert m.dice == pytest.approx(f1_score(ref.ravel(), pred.ravel()), abs=1e-6)
        assert m.iou == pytest.approx(jaccard_score(ref.ravel(), pred.ravel()), abs=1e-12)


def test_empty_set_policy() -> None:
    shape = (8, 8, 8)
    empty = np.zeros(shape, dtype=bool)
    some = box(shape, (2, 2, 2), (4, 4, 4))
    both = class_metrics(empty, empty, label=2, spacing=(1, 1, 1))
    assert (both.dice, both.iou, both.hd, both.ref_empty, both.pred_empty) == (1.0, 1.0, 0.0, True, True)
    missed = class_metrics(empty, some, label=1, spacing=(1, 1, 1))
    assert (missed.dice, missed.iou, missed.pred_empty, missed.ref_empty) == (0.0, 0.0, True, False)
    assert math.isnan(missed.hd) and missed.volume_ref_ml == pytest.approx(0.008)
    spurious = class_metrics(some, empty, label=1, spacing=(1, 1, 1))
    assert spurious.dice == 0.0 and math.isnan(spurious.hd) and spurious.ref_empty and not spurious.pred_empty


def test_multiclass_metrics_per_class() -> None:
    shape = (16, 16, 16)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    ref[box(shape, (2, 2, 2), (8, 8, 8))] = 1
    pred[box(shape, (2, 2, 2), (8, 8, 8))] = 1  # class 1 perfect
    ref[box(shape, (10, 10, 10), (14, 14, 14))] = 2  # class 2 missed
    rows = segmentation_metrics(pred, ref, spacing=(1, 1, 1), classes=[0, 2, 1, 3])
    assert [r.label for r in rows] == [1, 2, 3]
    assert rows[0].dice == pytest.approx(1.0) and rows[0].hd == 0.0
    assert rows[1].dice == 0.0 and math.isnan(rows[1].hd)
    assert rows[2].dice == 1.0  # class 3 in neither: both-empty policy
    assert present_labels(pred, ref) == [1, 2]


def test_describe_ignores_and_counts_nan() -> None:
    d = describe([1.0, 3.0, float("nan"), 2.0])
    assert d == {"n": 3, "n_nan": 1, "mean": 2.0, "std": pytest.approx(np.std([1, 2, 3])), "median": 2.0,
                 "min": 1.0, "max": 3.0}
    assert describe([float("nan")])["mean"] is None


def test_integer_labels_refuses_fractional_values() -> None:
    np.testing.assert_array_equal(integer_labels(np.array([0.0, 1.0, 2.0]), what="x"), [0, 1, 2])
    with pytest.raises(StageError, match="non-integer"):
        integer_labels(np.array([0.0, 0.5]), what="case_1 prediction")
