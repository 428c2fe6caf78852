"""Patch sampling: cached class indices, foreground oversampling frequency, bounds, margins and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import AugmentationConfig
from pipeline.transforms.augmentation import training_transforms
from pipeline.transforms.sampling import (
    MIN_LOCATIONS,
    ClassIndicesd,
    RandPatchSamplerd,
    class_locations,
    rotation_matrix,
    spatial_margin,
)

PATCH = (16, 16, 16)


def _corner_blob(shape=(64, 64, 64)) -> dict:
    """A 3-voxel foreground cube in one corner: a uniformly placed 16^3 patch almost never contains it."""
    label = np.zeros(shape, dtype=np.float32)
    label[2:5, 2:5, 2:5] = 1
    return {"image": label[None].copy(), "label": label[None].copy()}


def _sampler(data: dict, *, fraction: float, n: int, seed: int, mode="foreground", num_classes=2, margin=(0, 0, 0)):
    head = ClassIndicesd("label", num_classes=num_classes, include_background=mode == "classes")(
        {k: torch.as_tensor(v) for k, v in data.items()})
    sampler = RandPatchSamplerd(keys=["image", "label"], label_key="label", patch_size=PATCH, num_samples=n,
                                mode=mode, foreground_fraction=fraction, margin=margin)
    sampler.set_random_state(seed=seed)
    return sampler, sampler(head)


def test_class_locations_are_the_exact_voxels_and_capped_for_big_classes() -> None:
    label = np.zeros((4, 5, 6), dtype=np.uint8)
    label[1, 2, 3] = 1
    label[3, 4, 5] = 2
    label[0, 0, 0] = 2
    locs = class_locations(label, num_classes=3, include_background=False)
    assert locs[0].size == 0
    assert locs[1].tolist() == [np.ravel_multi_index((1, 2, 3), label.shape)]
    assert locs[2].tolist() == [0, label.size - 1]
    assert class_locations(label, num_classes=3, include_background=True)[0].size == label.size - 3
    big = np.zeros(40 * 40 * 40, dtype=np.uint8)
    big[:30_000] = 1
    kept = class_locations(big.reshape(40, 40, 40), num_classes=2, include_background=False)[1]
    assert kept.size == max(MIN_LOCATIONS, math.ceil(0.01 * 30_000))
    assert np.all(np.diff(kept) > 0) and kept.max() < 30_000  # sorted subset of the class's voxels
    again = class_locations(big.reshape(40, 40, 40), num_classes=2, include_background=False)[1]
    assert np.array_equal(kept, again)  # deterministic: cacheable


def test_foreground_fraction_of_patches_is_centred_on_foreground() -> None:
    n, fraction = 600, 0.33
    sampler, patches = _sampler(_corner_blob(), fraction=fraction, n=n, seed=7)
    centred = sum(sampler.centred)
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(centred - n * fraction) < 3 * sd
    assert centred == 191  # exact for this seed: the draws are reproducible
    with_fg = [bool(p["label"].any()) for p in patches]
    assert all(f for f, c in zip(with_fg, sampler.centred, strict=True) if c)  # centred ones contain it
    uniform_hits = sum(f for f, c in zip(with_fg, sampler.centred, strict=True) if not c)
    assert uniform_hits < 0.05 * (n - centred)  # (5/49)^3 ~ 0.1 % of uniform placements reach the corner


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_foreground_fraction_extremes(fraction: float) -> None:
    sampler, patches = _sampler(_corner_blob(), fraction=fraction, n=50, seed=1)
    assert sum(sampler.centred) == (50 if fraction == 1.0 else 0)
    if fraction == 1.0:
        assert all(bool(p["label"].any()) for p in patches)


def test_foreground_classes_are_chosen_uniformly() -> None:
    label = np.zeros((64, 64, 64), dtype=np.float32)
    label[2:4, 2:4, 2:4] = 1
    label[60:62, 60:62, 60:62] = 2  # opposite corners: a patch holds at most one of them
    _, patches = _sampler({"image": label[None], "label": label[None]}, fraction=1.0, n=400, seed=3,
                          num_classes=3)
    ones = sum(bool((p["label"] == 1).any()) for p in patches)
    twos = sum(bool((p["label"] == 2).any()) for p in patches)
    assert ones + twos == 400 and abs(ones - 200) < 3 * 10  # binomial(400, 0.5): sd 10


def test_no_foreground_means_uniform_patches() -> None:
    empty = {"image": np.ones((1, 32, 32, 32), np.float32), "label": np.zeros((1, 32, 32, 32), np.float32)}
    sampler, patches = _sampler(empty, fraction=1.0, n=20, seed=0)
    assert not any(sampler.centred) and len(patches) == 20


def test_patches_lie_inside_the_volume_and_crop_exactly() -> None:
    shape = (40, 30, 20)
    coords = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # voxel value = its flat index
    label = np.zeros(shape, dtype=np.float32)
    label[0, 0, 0] = label[39, 29, 19] = 1  # corner foreground: centring must be clamped inside
    _, patches = _sampler({"image": coords[None], "label": label[None]}, fraction=0.5, n=200, seed=2)
    for patch in patches:
        start = np.unravel_index(int(patch["image"][0, 0, 0, 0]), shape)
        assert all(0 <= s <= n - p for s, n, p in zip(start, shape, PATCH, strict=True))
        expected = coords[tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))]
        assert np.array_equal(patch["image"][0].numpy(), expected)


def test_margin_enlarges_the_crop_with_zeros_outside() -> None:
    shape = (20, 20, 20)
    image = np.arange(1, 8001, dtype=np.float32).reshape(shape)  # no zeros inside
    label = np.zeros(shape, dtype=np.float32)
    _, patches = _sampler({"image": image[None], "label": label[None]}, fraction=0.0, n=20, seed=5,
                          margin=(3, 2, 1))
    for patch in patches:
        crop = patch["image"][0].numpy()
        assert crop.shape == (22, 20, 18)
        inner = crop[3:19, 2:18, 1:17]
        start = np.unravel_index(int(inner[0, 0, 0]) - 1, shape)
        assert np.array_equal(inner, image[tuple(slice(s, s + 16) for s in start)])
        # the enlarged crop is the volume where it exists and zero beyond it
        padded = np.pad(image, [(3, 3), (2, 2), (1, 1)])
        assert np.array_equal(crop, padded[tuple(slice(s, s + n) for s, n in zip(start, crop.shape, strict=True))])


def test_classes_mode_balances_all_classes_including_background() -> None:
    shape = (64, 64, 64)
    label = np.zeros(shape, dtype=np.float32)
    label[5:8, 5:8, 5:8] = 2
    label[50:60, 50:60, 50:60] = 1
    data = {"image": label[None].copy(), "label": label[None].copy()}
    tf = training_transforms(AugmentationConfig(enabled=False), patch_size=PATCH, num_classes=3,
                             samples_per_volume=300, sampling="classes")
    tf.set_random_state(seed=3)
    with_class2 = sum(bool((p["label"] == 2).any()) for p in tf(data))
    assert abs(with_class2 - 100) < 3 * math.sqrt(300 * (1 / 3) * (2 / 3))  # 1 of 3 classes present


def test_same_seed_same_patches_and_cache_untouched() -> None:
    data = _corner_blob((40, 40, 40))
    data["image"] = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    tf = training_transforms(AugmentationConfig(rotate_prob=0.5, noise_prob=1.0), patch_size=PATCH, num_classes=2,
                             samples_per_volume=6)
    head = tf(data, end=3)  # what CacheDataset caches
    before = {k: torch.as_tensor(head[k]).clone() for k in ("image", "label")}
    runs = []
    for seed in (9, 9, 10):
        tf.set_random_state(seed=seed)
        runs.append([p["image"] for p in tf(head, start=3)])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    assert all(torch.equal(torch.as_tensor(head[k]), before[k]) for k in before)  # crops are copies


def test_spatial_margin_covers_every_rotated_scaled_patch() -> None:
    patch, deg, scale = (40, 56, 40), 30.0, 0.2
    margin = spatial_margin(patch, rotate_deg=deg, scale_range=scale)
    assert spatial_margin(patch, rotate_deg=0, scale_range=0) == (0, 0, 0)
    half_in = (np.array(patch) + 2 * np.array(margin) - 1) / 2
    corners = np.array(np.meshgrid(*[[-(p - 1) / 2, (p - 1) / 2] for p in patch], indexing="ij")).reshape(3, -1)
    rng = np.random.default_rng(0)
    for _ in range(500):
        matrix = rotation_matrix(np.radians(rng.uniform(-deg, deg, 3))) * rng.uniform(1 - scale, 1 + scale)
        assert np.all(np.abs(matrix @ corners) <= half_in[:, None] - 1 + 1e-9)  # plus one interpolation neighbour
