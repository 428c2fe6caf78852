"""Study figures: non-blank, contours in their colours, slice choice, aspect ratio from the spacing."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.errors import GeometryError
from pipeline.io.volume import Volume
from pipeline.reporting.figures import best_slices, study_figure, to_ras


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


def colour_mask(rgb: np.ndarray, colour: tuple[float, float, float], tol: float = 0.15) -> np.ndarray:
    return np.all(np.abs(rgb - np.array(colour)) < tol, axis=-1)


GREEN, MAGENTA = (0.0, 1.0, 0.0), (1.0, 0.0, 1.0)


def cube_volumes(spacing=(1.0, 1.0, 1.0), shape=(30, 30, 20)) -> tuple[Volume, Volume, Volume]:
    rng = np.random.default_rng(0)
    affine = np.diag([*spacing, 1.0])
    image = rng.normal(size=shape).astype(np.float32)
    ref = np.zeros(shape, np.uint8)
    ref[8:18, 10:20, 6:14] = 1
    pred = np.zeros(shape, np.uint8)
    pred[11:21, 12:22, 7:15] = 1
    return Volume(image, affine), Volume(ref, affine), Volume(pred, affine)


def test_figure_is_non_blank_with_both_contour_colours() -> None:
    image, ref, pred = cube_volumes()
    rgb = decode(study_figure(image=image, reference=ref, prediction=pred, title="case_1"))
    assert rgb.std() > 0.05
    assert colour_mask(rgb, GREEN).sum() > 50
    assert colour_mask(rgb, MAGENTA).sum() > 50


def test_only_the_given_contours_appear() -> None:
    image, ref, pred = cube_volumes()
    rgb = decode(study_figure(image=image, reference=None, prediction=pred))
    body = rgb[: int(rgb.shape[0] * 0.85)]  # above the legend, which shows both colours
    assert colour_mask(body, GREEN).sum() == 0
    assert colour_mask(body, MAGENTA).sum() > 50


def test_figure_is_deterministic() -> None:
    image, ref, pred = cube_volumes()
    assert study_figure(image=image, reference=ref, prediction=pred) == study_figure(
        image=image, reference=ref, prediction=pred)


def test_volumes_on_different_grids_are_refused() -> None:
    image, ref, _ = cube_volumes()
    other = Volume(ref.array, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GeometryError, match="one grid"):
        study_figure(image=image, reference=other, prediction=None)


def test_best_slices_pick_most_foreground() -> None:
    mask = np.zeros((10, 12, 8), bool)
    mask[2, :, :] = True  # a full sagittal plane at x=2
    mask[7, 1:3, 5] = True
    assert best_slices(mask, mask.shape) == (2, 1, 5)
    assert best_slices(np.zeros((10, 12, 8), bool), (10, 12, 8)) == (5, 6, 4)


def test_to_ras_reorders_axes_and_spacing() -> None:
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    # array axes: A (0.7 mm), S (2 mm), L (1 mm)
    affine = np.array([[0, 0, -1.0, 0], [0.7, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    ras, spacing = to_ras(Volume(arr, affine))
    assert ras.shape == (4, 2, 3) and spacing == (1.0, 0.7, 2.0)
    np.testing.assert_array_equal(ras, np.transpose(arr, (2, 0, 1))[::-1])


def test_aspect_ratio_follows_the_voxel_spacing() -> None:
    """A box 8 x 8 voxels in y, z at 1 x 3 mm must look three times taller than wide in the sagittal panel."""
    shape = (20, 24, 12)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    ref = np.zeros(shape, np.uint8)
    ref[6:14, 8:16, 2:10] = 1
    rgb = decode(study_figure(image=None, reference=Volume(ref, affine), prediction=None))
    left = colour_mask(rgb[:, : rgb.shape[1] // 3], GREEN)
    left[int(rgb.shape[0] * 0.85):] = False  # ignore the legend
    rows, cols = np.nonzero(left)
    height, width = rows.max() - rows.min(), cols.max() - cols.min()
    assert height / width == pytest.approx(3.0, rel=0.12)
