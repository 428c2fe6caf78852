"""Training-time transforms: cacheable head, patch sampling and nnU-Net's random augmentations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai import transforms as mt

from pipeline.config import AugmentationConfig
from pipeline.transforms.sampling import ClassIndicesd, RandPatchSamplerd, SamplingMode, spatial_margin
from pipeline.transforms.spatial_augmentation import RandSpatialPatchd

INVERTED_GAMMA_SHARE = 1.0 / 3.0  # inverted gamma runs with gamma_prob / 3 (nnU-Net: 0.1 next to 0.3)
ELASTIC_MARGIN = 3  # extra crop voxels per side for elastic displacements (a few voxels at nnU-Net's settings)


def _split_keys(keys: Sequence[str]) -> tuple[list[str], str]:
    """Image keys (all but the last) and the label key (the last)."""
    keys = list(keys)
    if len(keys) < 2:
        raise ValueError("training transforms need at least one image key followed by the label key")
    return keys[:-1], keys[-1]


def _spatial_enabled(augmentation: AugmentationConfig) -> bool:
    return augmentation.enabled and (
        (augmentation.rotate_prob > 0 and augmentation.rotate_deg > 0)
        or (augmentation.scale_prob > 0 and augmentation.scale_range > 0)
        or (augmentation.elastic_prob > 0 and augmentation.elastic_magnitude[1] > 0))


def crop_margin(augmentation: AugmentationConfig, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Voxels per side by which patches are cropped larger, so rotation/scaling never shows empty corners."""
    if not _spatial_enabled(augmentation):
        return tuple(0 for _ in patch_size)
    return spatial_margin(
        patch_size,
        rotate_deg=augmentation.rotate_deg if augmentation.rotate_prob > 0 else 0.0,
        scale_range=augmentation.scale_range if augmentation.scale_prob > 0 else 0.0,
        extra=ELASTIC_MARGIN if augmentation.elastic_prob > 0 else 0,
    )


def sampling_transforms(
    *,
    patch_size: Sequence[int],
    num_classes: int,
    samples_per_volume: int,
    sampling: SamplingMode = "foreground",
    foreground_fraction: float = 0.33,
    margin: Sequence[int] = (0, 0, 0),
    keys: Sequence[str] = ("image", "label"),
) -> list[mt.Transform]:
    """Deterministic head (float32 tensors, zero-padding to the patch, class indices), then the patch sampler."""
    _, label_key = _split_keys(keys)
    size = tuple(int(s) for s in patch_size)
    return [
        mt.EnsureTyped(keys=list(keys), dtype=np.float32, track_meta=False),
        mt.SpatialPadd(keys=list(keys), spatial_size=size, mode="constant", value=0),
        ClassIndicesd(label_key, num_classes=num_classes, include_background=sampling == "classes"),
        RandPatchSamplerd(keys=list(keys), label_key=label_key, patch_size=size, num_samples=samples_per_volume,
                          mode=sampling, foreground_fraction=foreground_fraction, margin=margin),
    ]


def spatial_transforms(
    augmentation: AugmentationConfig,
    *,
    patch_size: Sequence[int],
    keys: Sequence[str] = ("image", "label"),
) -> list[mt.Transform]:
    """Rotation, scaling and elastic deformation in one resampling of the enlarged crop (labels: nearest)."""
    if not _spatial_enabled(augmentation):
        return []
    images, label = _split_keys(keys)
    return [RandSpatialPatchd(
        keys=[*images, label], modes=["bilinear"] * len(images) + ["nearest"], patch_size=patch_size,
        margin=crop_margin(augmentation, patch_size), rotate_deg=augmentation.rotate_deg,
        rotate_prob=augmentation.rotate_prob, scale_range=augmentation.scale_range,
        scale_prob=augmentation.scale_prob, elastic_prob=augmentation.elastic_prob,
        elastic_sigma=augmentation.elastic_sigma, elastic_magnitude=augmentation.elastic_magnitude,
    )]


def augmentation_transforms(
    augmentation: AugmentationConfig,
    *,
    keys: Sequence[str] = ("image", "label"),
) -> list[mt.Transform]:
    """The intensity augmentations (images only) in nnU-Net's order, then mirroring (images and label).

    Noise (std drawn in [0, noise_std]), Gaussian blur (sigma per axis in ``blur_sigma``),
    multiplicative brightness (x (1 + U(-intensity_scale, intensity_scale))) and additive shift
    (+ U(-intensity_shift, intensity_shift)) with ``intensity_prob`` each, contrast (scaled about
    the mean by a factor in ``contrast_range``, clipped to the original range), simulated low
    resolution (nearest down to a zoom in ``lowres_zoom``, trilinear back up), inverted gamma
    (with ``gamma_prob / 3``) and gamma (``gamma_range``, mean and std kept), mirroring of each
    axis in ``flip_axes`` with ``flip_prob``. A probability of 0 (or an identity range) leaves
    the step out.
    """
    if not augmentation.enabled:
        return []
    images, _ = _split_keys(keys)
    a = augmentation
    steps: list[mt.Transform] = []
    if a.noise_prob > 0 and a.noise_std > 0:
        steps.append(mt.RandGaussianNoised(keys=images, prob=a.noise_prob, std=a.noise_std))
    if a.blur_prob > 0 and a.blur_sigma[1] > 0:
        steps.append(mt.RandGaussianSmoothd(keys=images, sigma_x=a.blur_sigma, sigma_y=a.blur_sigma,
                                            sigma_z=a.blur_sigma, prob=a.blur_prob))
    if a.intensity_prob > 0 and a.intensity_scale > 0:
        steps.append(mt.RandScaleIntensityd(keys=images, factors=a.intensity_scale, prob=a.intensity_prob))
    if a.intensity_prob > 0 and a.intensity_shift > 0:
        steps.append(mt.RandShiftIntensityd(keys=images, offsets=a.intensity_shift, prob=a.intensity_prob))
    if a.contrast_prob > 0 and a.contrast_range != (1.0, 1.0):
        steps.append(mt.RandScaleIntensityFixedMeand(
            keys=images, factors=(a.contrast_range[0] - 1.0, a.contrast_range[1] - 1.0), fixed_mean=True,
            preserve_range=True, prob=a.contrast_prob))
    if a.lowres_prob > 0 and a.lowres_zoom[0] < 1.0:
        steps.append(mt.RandSimulateLowResolutiond(keys=images, prob=a.lowres_prob, zoom_range=a.lowres_zoom,
                                                   downsample_mode="nearest", upsample_mode="trilinear"))
    if a.gamma_prob > 0 and a.gamma_range != (1.0, 1.0):
        steps.append(mt.RandAdjustContrastd(keys=images, gamma=a.gamma_range, invert_image=True, retain_stats=True,
                                            prob=a.gamma_prob * INVERTED_GAMMA_SHARE))
        steps.append(mt.RandAdjustContrastd(keys=images, gamma=a.gamma_range, retain_stats=True, prob=a.gamma_prob))
    if a.flip_prob > 0:
        steps.extend(mt.RandFlipd(keys=list(keys), prob=a.flip_prob, spatial_axis=axis) for axis in a.flip_axes)
    return steps


def training_transforms(
    augmentation: AugmentationConfig,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    samples_per_volume: int = 1,
    sampling: SamplingMode = "foreground",
    foreground_fraction: float = 0.33,
    keys: Sequence[str] = ("image", "label"),
) -> mt.Compose:
    """The whole training pipeline over in-memory channel-first arrays (``keys``: images..., label).

    Everything before the patch sampler (typing, padding, class indices) is deterministic, so a
    ``CacheDataset`` caches it once per volume; each call then returns ``samples_per_volume``
    patch dicts of float32 tensors. ``Compose.set_random_state`` reseeds every random step.
    """
    size = tuple(int(s) for s in patch_size)
    steps = [
        *sampling_transforms(patch_size=size, num_classes=num_classes, samples_per_volume=samples_per_volume,
                             sampling=sampling, foreground_fraction=foreground_fraction,
                             margin=crop_margin(augmentation, size), keys=keys),
        *spatial_transforms(augmentation, patch_size=size, keys=keys),
        *augmentation_transforms(augmentation, keys=keys),
        mt.EnsureTyped(keys=list(keys), dtype=np.float32, track_meta=False),
    ]
    return mt.Compose(steps)
