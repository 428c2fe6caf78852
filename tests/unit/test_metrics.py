"""Segmentation metrics against analytic phantoms (boxes, spheres, points), MONAI, scikit-learn; empty-set policy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, jaccard_score

from pipeline.errors import GeometryError, StageError
from pipeline.metrics.segmentation import (
    class_metrics,
    grid_spacing,
    integer_labels,
    nsd_tolerances,
    present_labels,
    segmentation_metrics,
    surface_distances,
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


def blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5


# ---- overlap and volume ---------------------------------------------------------------------


def test_offset_cubes_dice_iou_volume_are_analytic() -> None:
    shape = (24, 20, 16)
    a = box(shape, (2, 2, 2), (10, 9, 8))  # 8*7*6 = 336 voxels
    b = box(shape, (5, 4, 2), (13, 11, 8))  # 8*7*6 = 336, overlap 5*5*6 = 150
    spacing = (0.8, 1.0, 1.5)
    m = class_metrics(a, b, label=1, spacing=spacing)
    assert m.dice == pytest.approx(2 * 150 / (336 + 336), abs=1e-12)
    assert m.iou == pytest.approx(150 / (336 + 336 - 150), abs=1e-12)
    assert m.volume_pred_ml == pytest.approx(336 * 0.8 * 1.0 * 1.5 / 1000, rel=1e-12)
    assert m.volume_ref_ml == m.volume_pred_ml and m.rel_volume_error == 0.0
    assert not (m.ref_empty or m.pred_empty)


def test_relative_volume_error_and_voxel_volume_from_the_affine() -> None:
    shape = (12, 12, 12)
    ref = box(shape, (2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = box(shape, (2, 2, 2), (6, 6, 8))  # 96 voxels
    m = class_metrics(pred, ref, label=1, spacing=(1, 1, 1), voxel_ml=0.002)
    assert m.rel_volume_error == pytest.approx(0.5)
    assert (m.volume_ref_ml, m.volume_pred_ml) == (pytest.approx(0.128), pytest.approx(0.192))
    rotated = np.array([[0, -2.0, 0, 5], [0.5, 0, 0, 1], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    spacing, voxel_ml = grid_spacing(rotated, what="x")
    assert spacing == (0.5, 2.0, 3.0) and voxel_ml == pytest.approx(0.003)


def test_dice_and_iou_match_sklearn_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        ref = rng.random((12, 14, 10)) < 0.3
        pred = rng.random((12, 14, 10)) < 0.4
        m = class_metrics(pred, ref, label=1, spacing=(1.0, 1.0, 1.0))
        assert m.dice == pytest.approx(f1_score(ref.ravel(), pred.ravel()), abs=1e-12)
        assert m.iou == pytest.approx(jaccard_score(ref.ravel(), pred.ravel()), abs=1e-12)


# ---- surface distances: analytic ------------------------------------------------------------


def test_shifted_cube_hausdorff_is_the_shift_in_mm() -> None:
    shape = (20, 16, 16)
    a = box(shape, (2, 3, 3), (8, 10, 10))
    b = box(shape, (5, 3, 3), (11, 10, 10))  # shifted 3 voxels along x
    m = class_metrics(a, b, label=1, spacing=(2.0, 1.0, 1.0), percentile=100.0)
    assert m.hd == pytest.approx(6.0, abs=1e-9)
    m_y = class_metrics(a, box(shape, (2, 5, 3), (8, 12, 10)), label=1, spacing=(2.0, 0.7, 1.0), percentile=100)
    assert m_y.hd == pytest.approx(1.4, abs=1e-9)


def test_two_points_give_their_distance_for_every_surface_metric() -> None:
    shape = (12, 12, 14)
    a = box(shape, (5, 5, 3), (6, 6, 4))
    b = box(shape, (5, 5, 7), (6, 6, 8))  # 4 voxels along z at 2 mm: 8 mm
    m = class_metrics(a, b, label=1, spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=7.99)
    assert (m.hd, m.assd, m.nsd, m.dice) == (pytest.approx(8.0), pytest.approx(8.0), 0.0, 0.0)
    assert class_metrics(a, b, label=1, spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=8.0).nsd == 1.0


def _to_box_surface_from_inside(point: np.ndarray, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray) -> float:
    """Distance from a voxel inside a box to the box's boundary voxels: straight to the nearest face."""
    return float(np.min(np.minimum(point - lo, hi - point) * spacing))


def _to_box_from_outside(point: np.ndarray, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray) -> float:
    """Distance from a voxel outside a box to the box (its nearest voxel lies on the boundary)."""
    return float(np.linalg.norm(np.maximum(0, np.maximum(lo - point, point - hi)) * spacing))


def test_nested_boxes_match_closed_form_distances_to_box_faces() -> None:
    """Inner box strictly inside the outer one: each direction has a closed form per boundary voxel."""
    shape, spacing = (20, 18, 16), np.array([0.8, 1.0, 1.5])
    outer_lo, outer_hi = np.array([2, 2, 2]), np.array([15, 14, 12])  # inclusive corners
    inner_lo, inner_hi = np.array([5, 4, 6]), np.array([10, 11, 8])
    outer = box(shape, tuple(outer_lo), tuple(outer_hi + 1))
    inner = box(shape, tuple(inner_lo), tuple(inner_hi + 1))

    def shell(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        idx = np.argwhere(box(shape, tuple(lo), tuple(hi + 1)))
        return idx[np.any((idx == lo) | (idx == hi), axis=1)]

    d_in = np.array([_to_box_surface_from_inside(p, outer_lo, outer_hi, spacing) for p in shell(inner_lo, inner_hi)])
    d_out = np.array([_to_box_from_outside(p, inner_lo, inner_hi, spacing) for p in shell(outer_lo, outer_hi)])
    tol = 2.0
    m = class_metrics(inner, outer, label=1, spacing=tuple(spacing), percentile=95.0, nsd_tolerance_mm=tol)
    assert m.hd == pytest.approx(max(np.percentile(d_in, 95), np.percentile(d_out, 95)), abs=1e-9)
    assert m.assd == pytest.approx(np.concatenate([d_in, d_out]).mean(), abs=1e-9)
    assert m.nsd == pytest.approx(((d_in <= tol).sum() + (d_out <= tol).sum()) / (d_in.size + d_out.size), abs=1e-12)
    to_ref, to_pred = surface_distances(inner, outer, spacing=tuple(spacing))
    np.testing.assert_allclose(np.sort(to_ref), np.sort(d_in), atol=1e-9)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(d_out), atol=1e-9)


def test_concentric_spheres_distances_are_the_radius_difference_in_mm() -> None:
    spacing = (0.8, 1.0, 1.5)
    shape = (60, 48, 32)
    inner, outer = sphere(shape, spacing, 10.0), sphere(shape, spacing, 15.0)
    m = class_metrics(inner, outer, label=1, spacing=spacing, percentile=95.0, nsd_tolerance_mm=6.5)
    voxel = max(spacing)
    assert m.hd == pytest.approx(5.0, abs=voxel)  # voxelisation error stays within a voxel
    assert m.assd == pytest.approx(5.0, abs=voxel)
    assert m.nsd == 1.0
    assert class_metrics(inner, outer, label=1, spacing=spacing, nsd_tolerance_mm=3.0).nsd == 0.0
    # Same voxel counts but isotropic spacing would give a distance in voxels, not mm: guard the unit.
    m_wrong = class_metrics(inner, outer, label=1, spacing=(1.0, 1.0, 1.0), percentile=95.0)
    assert abs(m_wrong.hd - 5.0) > abs(m.hd - 5.0)


def test_structure_on_the_image_border_keeps_its_border_surface() -> None:
    """Voxels on the image border are boundary voxels (as in MONAI): a full-image mask is all boundary."""
    shape = (6, 6, 6)
    full = np.ones(shape, dtype=bool)
    m = class_metrics(full, full, label=1, spacing=(1, 1, 1))
    assert (m.dice, m.hd, m.assd, m.nsd) == (1.0, 0.0, 0.0, 1.0)
    inner = box(shape, (1, 1, 1), (5, 5, 5))
    to_ref, _ = surface_distances(inner, full, spacing=(1, 1, 1))
    assert to_ref.max() == 1.0 and to_ref.size == 4**3 - 2**3


# ---- surface distances: MONAI ---------------------------------------------------------------


@pytest.mark.parametrize("seed,spacing", [(0, (1.0, 1.0, 1.0)), (1, (0.8, 1.1, 2.0)), (2, (2.5, 0.6, 1.3))])
def test_surface_metrics_match_monai(seed: int, spacing: tuple[float, float, float]) -> None:
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        compute_average_surface_distance,
        compute_surface_dice,
    )

    rng = np.random.default_rng(seed)
    shape = (30, 28, 20)
    ref, pred = blobs(rng, shape), blobs(rng, shape)
    assert ref.any() and pred.any()
    p, r = (torch.from_numpy(x)[None, None].float() for x in (pred, ref))
    for tol in (0.5, 1.5, 3.0):
        m = class_metrics(pred, ref, label=1, spacing=spacing, percentile=95.0, nsd_tolerance_mm=tol)
        nsd = compute_surface_dice(p, r, class_thresholds=[tol], spacing=list(spacing)).item()
        assert m.nsd == pytest.approx(nsd, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = HausdorffDistanceMetric(percentile=95)(p, r, spacing=list(spacing)).item()
        hd100 = HausdorffDistanceMetric()(p, r, spacing=list(spacing)).item()
        assd = compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing)).item()
    dice = DiceMetric(include_background=True)(p, r).item()
    assert m.hd == pytest.approx(hd95, abs=1e-4)
    assert m.assd == pytest.approx(assd, abs=1e-4)
    assert m.dice == pytest.approx(dice, abs=1e-6)
    assert class_metrics(pred, ref, label=1, spacing=spacing, percentile=100.0).hd == pytest.approx(hd100, abs=1e-4)


# ---- empty sets, classes, tolerances ---------------------------------------------------------


def test_empty_set_policy() -> None:
    shape = (8, 8, 8)
    empty = np.zeros(shape, dtype=bool)
    some = box(shape, (2, 2, 2), (4, 4, 4))
    both = class_metrics(empty, empty, label=2, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert (both.dice, both.iou, both.hd, both.assd, both.nsd, both.rel_volume_error) == (1.0, 1.0, 0.0, 0.0, 1.0, 0.0)
    assert both.ref_empty and both.pred_empty and both.nsd_tolerance_mm == 1.0
    missed = class_metrics(empty, some, label=1, spacing=(1, 1, 1))
    assert (missed.dice, missed.iou, missed.nsd, missed.pred_empty, missed.ref_empty) == (0.0, 0.0, 0.0, True, False)
    assert math.isnan(missed.hd) and math.isnan(missed.assd) and missed.rel_volume_error == -1.0
    assert missed.volume_ref_ml == pytest.approx(0.008)
    spurious = class_metrics(some, empty, label=1, spacing=(1, 1, 1))
    assert spurious.dice == 0.0 and spurious.nsd == 0.0 and spurious.ref_empty and not spurious.pred_empty
    assert math.isnan(spurious.hd) and math.isnan(spurious.assd) and math.isnan(spurious.rel_volume_error)
    with pytest.raises(StageError, match="non-empty"):
        surface_distances(empty, some, spacing=(1, 1, 1))


def test_multiclass_metrics_per_class_with_tolerances() -> None:
    shape = (16, 16, 16)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    ref[box(shape, (2, 2, 2), (8, 8, 8))] = 1
    pred[box(shape, (2, 2, 2), (8, 8, 8))] = 1  # class 1 perfect
    ref[box(shape, (10, 10, 10), (14, 14, 14))] = 2  # class 2 missed
    rows = segmentation_metrics(pred, ref, spacing=(1, 1, 1), classes=[0, 2, 1, 3], tolerances={1: 1.0, 2: 2.0, 3: 3.0})
    assert [r.label for r in rows] == [1, 2, 3]
    assert [r.nsd_tolerance_mm for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0].dice == pytest.approx(1.0) and rows[0].hd == 0.0 and rows[0].nsd == 1.0
    assert rows[1].dice == 0.0 and math.isnan(rows[1].hd)
    assert rows[2].dice == 1.0  # class 3 in neither: both-empty policy
    assert present_labels(pred, ref) == [1, 2]


def test_nsd_tolerances_by_value_name_and_default() -> None:
    names = {"1": "anterior", "2": "posterior", "3": "tail"}
    assert nsd_tolerances(1.5, [1, 2], names) == {1: 1.5, 2: 1.5}
    setting = {"1": 0.5, "posterior": 2.0, "default": 3.0}
    assert nsd_tolerances(setting, [1, 2, 3], names) == {1: 0.5, 2: 2.0, 3: 3.0}
    with pytest.raises(StageError, match=r"no tolerance for class 3 \(tail\)"):
        nsd_tolerances({"1": 0.5, "2": 1.0}, [1, 2, 3], names)


def test_sheared_grids_are_refused_for_distances() -> None:
    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    with pytest.raises(GeometryError, match="orthogonal"):
        grid_spacing(sheared, what="case_1 reference")


def test_integer_labels_refuses_fractional_and_negative_values() -> None:
    np.testing.assert_array_equal(integer_labels(np.array([0.0, 1.0, 2.0]), what="x"), [0, 1, 2])
    with pytest.raises(StageError, match="non-integer"):
        integer_labels(np.array([0.0, 0.5]), what="case_1 prediction")
    with pytest.raises(StageError, match="negative"):
        integer_labels(np.array([0, -1]), what="case_1 prediction")
