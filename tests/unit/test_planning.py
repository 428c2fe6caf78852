"""Fingerprint and plans on phantoms with known spacing, shape and intensities (exact values)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import ConfigError, GeometryError
from pipeline.io.volume import Volume
from pipeline.planning import (
    StudyFingerprint,
    axis_order,
    dataset_fingerprint,
    foreground_samples,
    make_plans,
    planned_spacing,
    resolve_normalization,
    study_fingerprint,
)
from pipeline.transforms.preprocessing import normalization_transform


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
    assert plans["orientation"] == "RAS" and plans["normalization"] == "zscore"  # auto, no modality
    assert plans["intensity"] == {"mean": 5.0, "std": 0.0, "p005": 5.0, "p995": 5.0}
    assert plans["fingerprint"]["median_shape_resampled"] == [6.0, 6.0, 6.0]
    # crop_foreground plans on the 2x2x2 box of positive voxels; 4 is the smallest patch, no pooling fits
    assert plans["fingerprint"]["planning_shape"] == [2.0, 2.0, 2.0]
    assert plans["patch_size"] == [4, 4, 4] and plans["batch_size"] == 2
    # z (2.5 mm) is over 2x the finest spacing (0.8 mm): kernel 1 along it
    assert plans["network"] == {"kernel_sizes": [[3, 3, 1]], "strides": [[1, 1, 1]], "filters": [32]}
    fixed = make_plans(fp, config=PreprocessConfig(spacing=(1.6, 1.6, 5.0), normalization="ct",
                                                   patch_size=(24, 24, 24)), labels=None)
    assert fixed["target_spacing"] == [1.6, 1.6, 5.0] and fixed["normalization"] == "ct"
    assert fixed["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    assert fixed["fingerprint"]["median_shape_resampled"] == [3.0, 3.0, 3.0]
    # a given patch is kept exactly (only even sizes pool); z (5 mm vs 1.6) waits one level, then catches up
    assert fixed["patch_size"] == [24, 24, 24]
    assert fixed["network"]["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [1, 1, 2]]


def _fp(study_id: str, spacing, shape, *, modality="MR") -> StudyFingerprint:
    return StudyFingerprint(id=study_id, spacing=spacing, shape=shape, foreground=np.array([1.0, 2.0, 3.0]),
                            class_counts={0: 100, 1: 10}, modality=modality)


def test_fingerprint_records_p10_cropping_and_volume() -> None:
    image = np.zeros((10, 12, 14), dtype=np.float32)
    image[2:7, 3:5, 1:13] = 1.0  # positive box 5 x 2 x 12
    label = np.zeros(image.shape, dtype=np.uint8)
    label[3, 3, 3] = 1
    affine = np.diag([1.0, 2.0, 0.5, 1.0])
    fp = study_fingerprint("a", Volume(image, affine), Volume(label, affine))
    assert fp.cropped_shape == (5, 2, 12)
    zs = [3.0, 3.5, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 7.0]
    studies = [_fp(f"s{i}", (0.8, 0.8, z), (100, 100, 20)) for i, z in enumerate(zs)]
    dataset = dataset_fingerprint(studies)
    assert dataset["spacing_p10"] == pytest.approx([0.8, 0.8, 3.45])  # between 3.0 and 3.5, 90 % of the way
    assert dataset["total_volume_mm3"] == pytest.approx(sum(0.64 * z * 100 * 100 * 20 for z in zs))
    assert dataset["median_cropped_shape"] == [100.0, 100.0, 20.0]  # no cropped shape: the full shape
    assert dataset["intensity_percentiles"] == [0.5, 99.5]
    assert dataset["class_fractions"] == pytest.approx({"0": 100 / 110, "1": 10 / 110})


def test_anisotropic_dataset_takes_the_10th_percentile_and_pools_z_late() -> None:
    zs = [3.0, 3.5, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 7.0]
    fp = dataset_fingerprint([_fp(f"s{i}", (0.8, 0.8, z), (256, 256, 30)) for i, z in enumerate(zs)])
    spacing, axis = planned_spacing(fp, anisotropy_threshold=3.0)
    assert axis == 2 and spacing == pytest.approx([0.8, 0.8, 3.45])
    plans = make_plans(fp, config=PreprocessConfig(crop_foreground=False))
    assert plans["target_spacing"] == pytest.approx([0.8, 0.8, 3.45])
    assert plans["fingerprint"]["anisotropic_axis"] == 2
    assert plans["fingerprint"]["median_shape_resampled"][2] == pytest.approx(30 * 5 / 3.45, abs=1e-3)
    strides, kernels = plans["network"]["strides"], plans["network"]["kernel_sizes"]
    # z (3.45 mm) waits while x/y go 0.8 -> 1.6 -> 3.2 mm, then pools with them
    assert strides[:4] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert kernels[:3] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]
    assert plans["patch_size"][2] % np.prod([s[2] for s in strides]) == 0


def test_anisotropy_rule_needs_coarse_spacing_and_few_slices() -> None:
    zs = [3.0, 3.5, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 7.0]
    many_slices = dataset_fingerprint([_fp(f"s{i}", (0.8, 0.8, z), (256, 256, 200)) for i, z in enumerate(zs)])
    assert planned_spacing(many_slices) == ([0.8, 0.8, 5.0], None)  # 200 * 3 >= 256: not "few"
    mild = dataset_fingerprint([_fp(f"s{i}", (1.0, 1.0, z / 2), (256, 256, 30)) for i, z in enumerate(zs)])
    assert planned_spacing(mild) == ([1.0, 1.0, 2.5], None)  # 2.5 / 1.0 < 3
    assert planned_spacing(mild, anisotropy_threshold=2.5)[1] == 2  # >= threshold counts
    # the percentile never goes finer than the other axes: 1 mm in-plane, z spacings 0.4..3.5
    zs = [0.4] * 2 + [3.5] * 8
    odd = dataset_fingerprint([_fp(f"s{i}", (1.0, 1.0, z), (256, 256, 30)) for i, z in enumerate(zs)])
    assert planned_spacing(odd) == ([1.0, 1.0, 1.0], 2)


def test_normalization_follows_modality() -> None:
    assert resolve_normalization("auto", "CT") == "ct" and resolve_normalization("auto", " ct ") == "ct"
    assert resolve_normalization("auto", "MRI") == "zscore" and resolve_normalization("auto", None) == "zscore"
    assert resolve_normalization("none", "CT") == "none"
    ct = dataset_fingerprint([_fp("a", (1.0, 1.0, 1.0), (64, 64, 64), modality="CT")])
    assert make_plans(ct, config=PreprocessConfig())["normalization"] == "ct"
    assert make_plans(ct, config=PreprocessConfig(normalization="zscore"))["normalization"] == "zscore"


def test_ct_normalization_clips_then_uses_dataset_statistics() -> None:
    import torch

    plans = {"normalization": "ct", "modality": "CT",
             "intensity": {"mean": 100.0, "std": 50.0, "p005": -100.0, "p995": 300.0}}
    values = torch.tensor([[[[-1000.0, 0.0, 100.0, 1000.0]]]])
    data = {"image": values}
    for step in normalization_transform(plans):
        data = step(data)
    expected = (np.clip([-1000.0, 0.0, 100.0, 1000.0], -100, 300) - 100.0) / 50.0
    assert np.allclose(np.asarray(data["image"]).ravel(), expected)
    auto = {**plans, "normalization": "auto"}  # resolved the same way as planning does
    assert len(normalization_transform(auto)) == 2
    with pytest.raises(ConfigError, match="unknown normalization"):
        normalization_transform({"normalization": "minmax"})


def test_hippocampus_plans_match_nnunet_layout() -> None:
    """MSD Task04 (../shared/data): nnU-Net plans [40, 56, 40], 4 levels of stride 2; our 210 cases cap the batch."""
    import json

    from pipeline.io.nifti import load_nifti
    from tests.shared_data import shared_data

    root = shared_data("Task04_Hippocampus")
    entries = json.loads((root / "dataset.json").read_text())["training"]
    fingerprint = dataset_fingerprint([
        study_fingerprint(str(i), load_nifti(root / e["image"]), load_nifti(root / e["label"]), modality="MRI")
        for i, e in enumerate(entries)])
    plans = make_plans(fingerprint, config=PreprocessConfig())
    assert plans["target_spacing"] == [1.0, 1.0, 1.0] and plans["normalization"] == "zscore"
    assert plans["patch_size"] == [40, 56, 40]
    assert plans["network"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert plans["network"]["filters"] == [32, 64, 128, 256]
    cap = int(0.05 * fingerprint["total_cropped_volume_mm3"] // (40 * 56 * 40))
    assert plans["batch_size"] == cap == 7  # 5 % of 210 cases' 13.1 M voxels / 89,600 per patch


@pytest.mark.parametrize("label_dtype", [np.uint8, np.float32])
def test_fingerprint_is_the_same_for_either_voxel_order(label_dtype: type) -> None:
    """Volumes loaded in the file's (Fortran) order measure exactly like C-ordered ones, samples included."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(30, 40, 50)).astype(np.float32)
    label = (rng.random((30, 40, 50)) < 0.4).astype(label_dtype) * rng.integers(1, 3, size=(30, 40, 50))
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    c_order = study_fingerprint("s", Volume(image, affine), Volume(label.astype(label_dtype), affine))
    f_order = study_fingerprint("s", Volume(np.asfortranarray(image), affine),
                                Volume(np.asfortranarray(label.astype(label_dtype)), affine))
    assert c_order.foreground.size == 10_000 < np.count_nonzero(label)  # strided samples: order matters
    np.testing.assert_array_equal(f_order.foreground, c_order.foreground)
    assert f_order.class_counts == c_order.class_counts and sum(c_order.class_counts.values()) == label.size
    assert (f_order.spacing, f_order.shape, f_order.cropped_shape) == (c_order.spacing, c_order.shape,
                                                                       c_order.cropped_shape)


def test_class_counts_by_slab_equal_one_bincount() -> None:
    from pipeline.planning import _class_counts

    rng = np.random.default_rng(6)
    label = rng.integers(0, 5, size=(9, 8, 7)).astype(np.uint8)
    label[-1, -1, -1] = 6  # a class that first appears in the last slab: the counts grow
    for array in (label, np.asfortranarray(label), label.astype(np.float32), label[:, ::2]):
        for slab in (1, 7, 64, 1 << 22):
            np.testing.assert_array_equal(_class_counts(array, slab=slab), np.bincount(array.ravel().astype(int)))
