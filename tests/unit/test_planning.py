"""Fingerprint and plans on phantoms with known spacing, shape and intensities (exact values)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import GeometryError
from pipeline.io.volume import Volume
from pipeline.planning import axis_order, dataset_fingerprint, foreground_samples, make_plans, study_fingerprint


def _pair(shape, spacing, fg_value, *, fg_box=(slice(2, 4), slice(2, 4), slice(2, 4)), cls=1, affine=None):
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image[fg_box] = fg_value
    label[fg_box] = cls
    aff = np.diag([*spacing, 1.0]) if affine is None else affine
    return Volume(image, aff), Volume(label, aff)


def test_fingerprint_exact_values() -> None:
    # study a: 8 voxels of 10, class 1; study b: 8 voxels of 30, class 2; study c: 8 voxels of 20, class 1
    a = study_fingerprint("a", *_pair((6, 6, 6), (1.0, 1.0, 2.0), 10.0), modality="MR")
    b = study_fingerprint("b", *_pair((8, 6, 10), (1.0, 2.0, 3.0), 30.0, cls=2), modality="MR")
    c = study_fingerprint("c", *_pair((10, 8, 6), (2.0, 1.0, 1.0), 20.0), modality="CT")
    fp = dataset_fingerprint([c, a, b])
    assert fp["n_studies"] == 3
    assert fp["median_spacing"] == [1.0, 1.0, 2.0]
    assert fp["median_shape"] == [8.0, 6.0, 6.0]
    assert fp["min_shape"] == [6, 6, 6] and fp["max_shape"] == [10, 8, 10]
    values = np.array([10.0] * 8 + [30.0] * 8 + [20.0] * 8)
    assert fp["intensity"]["mean"] == pytest.approx(20.0)
    assert fp["intensity"]["std"] == pytest.approx(float(np.std(values)))  # population std = sqrt(200/3)
    assert fp["intensity"]["std"] == pytest.approx(np.sqrt(200 / 3))
    assert fp["intensity"]["p005"] == pytest.approx(10.0)
    assert fp["intensity"]["p995"] == pytest.approx(30.0)
    total = 216 + 480 + 480
    assert fp["class_fractions"] == pytest.approx({"0": (total - 24) / total, "1": 16 / total, "2": 8 / total})
    assert fp["modality"] == "MR"


def test_fingerprint_reorients_spacing_and_shape() -> None:
    # array axes stored as (A, S, R): axis 0 runs anterior (1.5 mm), axis 1 superior (1 mm), axis 2 right (2 mm)
    affine = np.array([[0, 0, 2.0, 0], [1.5, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    assert axis_order(affine, "RAS") == [1, 2, 0]
    fp = study_fingerprint("x", *_pair((5, 6, 7), (1, 1, 1), 1.0, affine=affine))
    assert fp.spacing == (2.0, 1.5, 1.0)
    assert fp.shape == (7, 5, 6)


def test_percentiles_on_a_ramp() -> None:
    shape = (10, 10, 10)
    image = np.arange(1000, dtype=np.float32).reshape(shape)
    label = np.ones(shape, dtype=np.uint8)
    label[0, 0, 0] = 0  # value 0 is background
    fp = dataset_fingerprint([study_fingerprint("r", Volume(image, np.eye(4)), Volume(label, np.eye(4)))])
    fg = np.arange(1, 1000, dtype=np.float64)
    assert fp["intensity"]["p005"] == pytest.approx(np.percentile(fg, 0.5))
    assert fp["intensity"]["p995"] == pytest.approx(np.percentile(fg, 99.5))
    assert fp["intensity"]["mean"] == pytest.approx(500.0)
    assert fp["intensity"]["min"] == 1.0 and fp["intensity"]["max"] == 999.0


def test_foreground_subsampling_is_deterministic_and_bounded() -> None:
    values = np.arange(100_000, dtype=np.float32)
    a = foreground_samples(values, max_samples=1000)
    b = foreground_samples(values, max_samples=1000)
    assert a.size == 1000 and np.array_equal(a, b)
    assert a[0] == 0 and a[-1] == 99_999


def test_label_off_grid_is_refused() -> None:
    image, label = _pair((6, 6, 6), (1, 1, 1), 1.0)
    shifted = Volume(label.array, label.affine + np.array([[0, 0, 0, 1.0], [0] * 4, [0] * 4, [0] * 4]))
    with pytest.raises(GeometryError, match="same grid"):
        study_fingerprint("s", image, shifted)


def test_plans_use_median_spacing_or_config() -> None:
    fp = dataset_fingerprint([study_fingerprint("a", *_pair((6, 6, 6), (0.8, 0.8, 2.5), 5.0, cls=2))])
    labels = {"0": "background", "1": "liver", "2": "tumour"}
    plans = make_plans(fp, config=PreprocessConfig(), labels=labels)
    assert plans["target_spacing"] == [0.8, 0.8, 2.5]
    assert plans["num_classes"] == 3 and plans["labels"] == labels
    assert plans["patch_size"] == [32, 48, 32] and plans["orientation"] == "RAS"
    assert plans["intensity"] == {"mean": 5.0, "std": 0.0, "p005": 5.0, "p995": 5.0}
    assert plans["fingerprint"]["median_shape_resampled"] == [6.0, 6.0, 6.0]
    fixed = make_plans(fp, config=PreprocessConfig(spacing=(1.6, 1.6, 5.0), normalization="ct"), labels=None)
    assert fixed["target_spacing"] == [1.6, 1.6, 5.0] and fixed["normalization"] == "ct"
    assert fixed["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    assert fixed["fingerprint"]["median_shape_resampled"] == [3.0, 3.0, 3.0]
