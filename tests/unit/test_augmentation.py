"""Training transforms: patch size, class-balanced sampling, and image/label staying aligned under augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentationConfig
from pipeline.transforms.augmentation import augmentation_transforms, training_transforms


def _volume(shape=(30, 34, 26), seed=0):
    """Label: a box of class 1 and a ball of class 2; image = 100 * label (so structure is visible in both)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.float32)
    x0, y0, z0 = rng.integers(3, 8, size=3)
    label[x0:x0 + 9, y0:y0 + 7, z0:z0 + 6] = 1
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    label[np.linalg.norm(grid - np.array(shape) * 0.65, axis=-1) <= 5] = 2
    return {"image": (label * 100.0)[None], "label": label[None].copy()}


SPATIAL_ONLY = AugmentationConfig(flip_prob=0.5, rotate_deg=20, rotate_prob=1.0, scale_range=0.2, scale_prob=1.0,
                                  intensity_prob=0.0, noise_prob=0.0)


def test_patches_have_patch_size_even_from_small_volumes() -> None:
    tf = training_transforms(AugmentationConfig(), patch_size=(24, 40, 32), num_classes=3, samples_per_volume=3)
    tf.set_random_state(seed=0)
    out = tf(_volume(shape=(30, 34, 26)))  # smaller than the patch along two axes: padded first
    assert isinstance(out, list) and len(out) == 3
    for patch in out:
        assert tuple(patch["image"].shape) == (1, 24, 40, 32)
        assert tuple(patch["label"].shape) == (1, 24, 40, 32)
        assert patch["image"].dtype == torch.float32
        assert set(patch) == {"image", "label"}


def test_sampling_is_class_balanced() -> None:
    # a small class-2 ball in a big volume: uniform crops would rarely contain it; balanced ones do in ~1/3
    shape = (64, 64, 64)
    label = np.zeros(shape, dtype=np.float32)
    label[5:8, 5:8, 5:8] = 2
    label[50:60, 50:60, 50:60] = 1
    data = {"image": label[None].copy(), "label": label[None].copy()}
    tf = training_transforms(AugmentationConfig(enabled=False), patch_size=(16, 16, 16), num_classes=3,
                             samples_per_volume=60)
    tf.set_random_state(seed=3)
    patches = tf(data)
    with_class2 = sum(bool((p["label"] == 2).any()) for p in patches)
    assert 10 <= with_class2 <= 35  # expected ~20 of 60; a uniform crop would hit it ~0.4 times


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spatial_augmentation_keeps_image_and_label_aligned(seed: int) -> None:
    tf = training_transforms(SPATIAL_ONLY, patch_size=(24, 24, 24), num_classes=3, samples_per_volume=2)
    tf.set_random_state(seed=seed)
    for patch in tf(_volume(seed=seed)):
        image, label = patch["image"][0].numpy(), patch["label"][0].numpy()
        assert set(np.unique(label)) <= {0.0, 1.0, 2.0}  # nearest neighbour: no invented classes
        # the image was 100 * label: after the same warp both must agree except at interpolated borders
        agree = np.abs(np.rint(image / 100.0) - label) < 0.5
        assert agree.mean() > 0.97
        inner = label == 2
        if inner.sum() > 20:
            assert np.median(image[inner]) == pytest.approx(200.0, abs=1.0)


def test_spatial_augmentation_actually_changes_geometry() -> None:
    # with rotation/scaling always on, patches differ from plain crops of the same volume
    tf = training_transforms(SPATIAL_ONLY, patch_size=(30, 34, 26), num_classes=3, samples_per_volume=1)
    tf.set_random_state(seed=5)
    data = _volume()
    warped = tf(data)[0]["label"][0].numpy()
    assert not np.array_equal(warped, data["label"][0])


def test_intensity_augmentation_touches_only_the_image() -> None:
    cfg = AugmentationConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_prob=1.0, intensity_shift=0.5,
                             intensity_scale=0.5, noise_prob=1.0, noise_std=0.2)
    tf = training_transforms(cfg, patch_size=(30, 34, 26), num_classes=3, samples_per_volume=1)
    tf.set_random_state(seed=1)
    data = _volume()
    out = tf(data)[0]
    assert torch.equal(out["label"][0], torch.as_tensor(data["label"][0]))
    assert not torch.allclose(out["image"][0], torch.as_tensor(data["image"][0]))


def test_disabled_augmentation_adds_nothing_random() -> None:
    assert augmentation_transforms(AugmentationConfig(enabled=False)) == []
    names = [type(t).__name__ for t in augmentation_transforms(AugmentationConfig())]
    assert names == ["RandFlipd", "RandFlipd", "RandFlipd", "RandAffined", "RandScaleIntensityd",
                     "RandShiftIntensityd", "RandGaussianNoised"]


def test_same_seed_same_patches() -> None:
    def run() -> list[np.ndarray]:
        tf = training_transforms(AugmentationConfig(), patch_size=(16, 16, 16), num_classes=3, samples_per_volume=2)
        tf.set_random_state(seed=11)
        return [p["image"].numpy() for p in tf(_volume())]

    a, b = run(), run()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
