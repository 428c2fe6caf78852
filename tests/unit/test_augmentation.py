"""Training transforms: patch shapes, each augmentation's effect (prob 1) and absence (prob 0), alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentationConfig
from pipeline.transforms.augmentation import augmentation_transforms, crop_margin, training_transforms
from pipeline.transforms.spatial_augmentation import RandSpatialPatchd

OFF = dict(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, elastic_prob=0.0, intensity_prob=0.0, noise_prob=0.0,
           blur_prob=0.0, contrast_prob=0.0, gamma_prob=0.0, lowres_prob=0.0)


def only(**settings: object) -> AugmentationConfig:
    """Every augmentation off except ``settings``."""
    return AugmentationConfig(**{**OFF, **settings})


def _volume(shape=(30, 34, 26), seed=0):
    """Label: a box of class 1 and a ball of class 2; image = 100 * label (so structure is visible in both)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.float32)
    x0, y0, z0 = rng.integers(3, 8, size=3)
    label[x0:x0 + 9, y0:y0 + 7, z0:z0 + 6] = 1
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    label[np.linalg.norm(grid - np.array(shape) * 0.65, axis=-1) <= 5] = 2
    return {"image": (label * 100.0)[None], "label": label[None].copy()}


def _whole(cfg: AugmentationConfig, data: dict, *, seed: int = 0) -> dict:
    """Run the pipeline with the patch = the whole volume (so the crop is the identity)."""
    tf = training_transforms(cfg, patch_size=data["label"].shape[1:], num_classes=3)
    tf.set_random_state(seed=seed)
    return tf(data)[0]


def _intensity(cfg: AugmentationConfig, image: np.ndarray, *, seed: int = 0) -> torch.Tensor:
    """Apply the intensity/mirroring steps alone to a (X, Y, Z) image with an empty label."""
    data = {"image": torch.as_tensor(image[None], dtype=torch.float32),
            "label": torch.zeros((1, *image.shape), dtype=torch.float32)}
    for step in augmentation_transforms(cfg):
        step.set_random_state(seed=seed)
        data = step(data)
    assert torch.equal(torch.as_tensor(data["label"]), torch.zeros((1, *image.shape)))  # labels never touched
    return torch.as_tensor(data["image"])[0]


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


def test_every_probability_zero_returns_the_crop_unchanged() -> None:
    data = _volume()
    out = _whole(only(), data)
    assert torch.equal(out["image"], torch.as_tensor(data["image"]))
    assert torch.equal(out["label"], torch.as_tensor(data["label"]))
    assert augmentation_transforms(only()) == []
    assert crop_margin(only(), (16, 16, 16)) == (0, 0, 0)


def test_default_steps_in_nnunet_order() -> None:
    assert augmentation_transforms(AugmentationConfig(enabled=False)) == []
    names = [type(t).__name__ for t in training_transforms(AugmentationConfig(), patch_size=(16, 16, 16),
                                                           num_classes=3).transforms]
    assert names == ["EnsureTyped", "SpatialPadd", "ClassIndicesd", "RandPatchSamplerd", "RandSpatialPatchd",
                     "RandGaussianNoised", "RandGaussianSmoothd", "RandScaleIntensityd", "RandShiftIntensityd",
                     "RandScaleIntensityFixedMeand", "RandSimulateLowResolutiond", "RandAdjustContrastd",
                     "RandAdjustContrastd", "RandFlipd", "RandFlipd", "RandFlipd", "EnsureTyped"]


def test_noise_adds_zero_mean_noise() -> None:
    out = _intensity(only(noise_prob=1.0, noise_std=0.5), np.full((20, 20, 20), 3.0, dtype=np.float32))
    assert 0.0 < float(out.std()) <= 0.5 * 1.05
    assert float(out.mean()) == pytest.approx(3.0, abs=0.05)


def test_blur_reduces_the_variance_of_noise() -> None:
    noise = np.random.default_rng(0).normal(0, 1, (24, 24, 24)).astype(np.float32)
    out = _intensity(only(blur_prob=1.0, blur_sigma=(0.5, 1.0)), noise)
    # smoothing white noise with a normalised Gaussian of sigma >= 0.5 per axis keeps < 30 % of its variance
    assert float(out[4:-4, 4:-4, 4:-4].var()) < 0.3 * float(noise.var())
    assert float(out.mean()) == pytest.approx(float(noise.mean()), abs=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brightness_multiplies_and_shifts(seed: int) -> None:
    image = np.random.default_rng(seed).uniform(1, 2, (12, 12, 12)).astype(np.float32)
    scaled = _intensity(only(intensity_prob=1.0, intensity_scale=0.3, intensity_shift=0.0), image, seed=seed)
    ratio = scaled.numpy() / image
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-5) and 0.7 <= ratio.flat[0] <= 1.3 and ratio.flat[0] != 1.0
    shifted = _intensity(only(intensity_prob=1.0, intensity_scale=0.0, intensity_shift=0.4), image, seed=seed)
    delta = shifted.numpy() - image
    assert np.allclose(delta, delta.flat[0], atol=1e-5) and 0 < abs(delta.flat[0]) <= 0.4


def test_contrast_scales_about_the_mean_within_the_original_range() -> None:
    image = np.random.default_rng(3).normal(0, 1, (16, 16, 16)).astype(np.float32)
    out = _intensity(only(contrast_prob=1.0, contrast_range=(0.5, 0.5)), image).numpy()  # factor exactly 0.5
    assert np.allclose(out - image.mean(), 0.5 * (image - image.mean()), atol=1e-5)
    stretched = _intensity(only(contrast_prob=1.0, contrast_range=(1.5, 1.5)), image).numpy()
    assert stretched.min() >= image.min() - 1e-6 and stretched.max() <= image.max() + 1e-6  # clipped to range
    inside = np.abs(1.5 * (image - image.mean())) < 0.9 * min(image.max() - image.mean(), image.mean() - image.min())
    assert np.allclose(stretched[inside] - image.mean(), 1.5 * (image[inside] - image.mean()), atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_gamma_is_monotone_nonlinear_and_keeps_mean_and_std(seed: int) -> None:
    image = np.random.default_rng(seed).uniform(0, 1, (12, 12, 12)).astype(np.float32)
    out = _intensity(only(gamma_prob=1.0, gamma_range=(0.5, 0.6)), image, seed=seed).numpy()
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(out.reshape(-1)[order]) >= -1e-5)  # order preserved (also for inverted gamma)
    assert out.mean() == pytest.approx(image.mean(), abs=1e-3) and out.std() == pytest.approx(image.std(), rel=1e-3)
    slope, intercept = np.polyfit(image.reshape(-1), out.reshape(-1), 1)
    assert np.abs(out.reshape(-1) - (slope * image.reshape(-1) + intercept)).max() > 0.02  # not affine


def _high_frequency_energy(volume: np.ndarray) -> float:
    return float(sum((np.diff(volume, axis=a) ** 2).sum() for a in range(3)))


def test_low_resolution_removes_high_frequencies() -> None:
    x = np.arange(24, dtype=np.float32)
    smooth = np.sin(x / 4)[:, None, None] + np.cos(x / 5)[None, :, None] + np.sin(x / 6)[None, None, :]
    image = (smooth + np.random.default_rng(1).normal(0, 0.5, (24, 24, 24))).astype(np.float32)
    out = _intensity(only(lowres_prob=1.0, lowres_zoom=(0.5, 0.5)), image).numpy()
    assert out.shape == image.shape
    assert _high_frequency_energy(out) < 0.5 * _high_frequency_energy(image)
    assert np.corrcoef(out.reshape(-1), smooth.reshape(-1))[0, 1] > 0.8  # the same image, coarser


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_mirroring_flips_image_and_label_identically(axes: tuple[int, ...]) -> None:
    data = _volume()
    out = _whole(only(flip_prob=1.0, flip_axes=axes), data)
    dims = [a + 1 for a in axes]
    assert torch.equal(out["image"], torch.as_tensor(data["image"]).flip(dims))
    assert torch.equal(out["label"], torch.as_tensor(data["label"]).flip(dims))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("settings", [
    dict(rotate_deg=25, rotate_prob=1.0), dict(scale_range=0.25, scale_prob=1.0),
    dict(elastic_prob=1.0, elastic_sigma=(4.0, 5.0), elastic_magnitude=(200.0, 300.0)),
])
def test_spatial_augmentation_keeps_image_and_label_aligned(seed: int, settings: dict) -> None:
    tf = training_transforms(only(**settings), patch_size=(24, 24, 24), num_classes=3, samples_per_volume=2)
    tf.set_random_state(seed=seed)
    for patch in tf(_volume(seed=seed)):
        image, label = patch["image"][0].numpy(), patch["label"][0].numpy()
        assert set(np.unique(label)) <= {0.0, 1.0, 2.0}  # nearest neighbour: integer classes only
        # the image was 100 * label: after the same warp both must agree except at interpolated borders
        agree = np.abs(np.rint(image / 100.0) - label) < 0.5
        assert agree.mean() > 0.97
        inner = label == 2
        if inner.sum() > 20:
            assert np.median(image[inner]) == pytest.approx(200.0, abs=5.0)


def _ball(shape=(48, 48, 48), radius=9.0) -> dict:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    label = (np.linalg.norm(grid - (np.array(shape) - 1) / 2, axis=-1) <= radius).astype(np.float32)
    return {"image": (1.0 + label)[None], "label": label[None]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaling_changes_volume_by_the_drawn_factor_and_rotation_keeps_it(seed: int) -> None:
    data, patch = _ball(), (32, 32, 32)
    spatial = RandSpatialPatchd(keys=["image", "label"], modes=["bilinear", "nearest"], patch_size=patch,
                                margin=(8, 8, 8), rotate_deg=30, rotate_prob=1.0, scale_range=0.3, scale_prob=1.0)
    spatial.set_random_state(seed=seed)
    out = spatial(data)
    volume = float(out["label"].sum())
    scale = spatial.params["scale"]
    # the grid samples the input at scale x the output spacing: the ball shrinks by scale**3
    assert volume == pytest.approx(float(data["label"].sum()) / scale**3, rel=0.06)
    assert spatial.params["angles"] is not None and np.abs(spatial.params["angles"]).max() <= np.radians(30)


def test_rotation_uses_the_enlarged_crop_so_no_empty_corners() -> None:
    # a large volume of ones; patches centred on the middle: a rotated/zoomed-out patch must still be all ones
    shape, patch = (96, 96, 96), (24, 32, 24)
    label = np.zeros(shape, dtype=np.float32)
    label[47:49, 47:49, 47:49] = 1
    data = {"image": np.ones((1, *shape), dtype=np.float32), "label": label[None]}
    cfg = only(rotate_deg=45, rotate_prob=1.0, scale_range=0.3, scale_prob=1.0)
    tf = training_transforms(cfg, patch_size=patch, num_classes=2, samples_per_volume=8, foreground_fraction=1.0)
    tf.set_random_state(seed=4)
    for out in tf(data):
        assert tuple(out["image"].shape) == (1, *patch)
        assert float(out["image"].min()) == pytest.approx(1.0)


def test_spatial_augmentation_actually_changes_geometry() -> None:
    tf = training_transforms(only(rotate_deg=20, rotate_prob=1.0), patch_size=(30, 34, 26), num_classes=3)
    tf.set_random_state(seed=5)
    data = _volume()
    warped = tf(data)[0]["label"][0].numpy()
    assert not np.array_equal(warped, data["label"][0])
    assert abs(float((warped == 2).sum()) - float((data["label"][0] == 2).sum())) < 0.1 * (data["label"][0] == 2).sum()


def test_intensity_augmentation_touches_only_the_image() -> None:
    cfg = only(intensity_prob=1.0, intensity_shift=0.5, intensity_scale=0.5, noise_prob=1.0, noise_std=0.2,
               blur_prob=1.0, contrast_prob=1.0, gamma_prob=1.0, lowres_prob=1.0)
    data = _volume()
    out = _whole(cfg, data, seed=1)
    assert torch.equal(out["label"], torch.as_tensor(data["label"]))
    assert not torch.allclose(out["image"], torch.as_tensor(data["image"]))


def test_same_seed_same_patches() -> None:
    def run(seed: int) -> list[np.ndarray]:
        tf = training_transforms(AugmentationConfig(elastic_prob=0.5), patch_size=(16, 16, 16), num_classes=3,
                                 samples_per_volume=4)
        tf.set_random_state(seed=seed)
        return [p["image"].numpy() for p in tf(_volume())]

    a, b, c = run(11), run(11), run(12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
