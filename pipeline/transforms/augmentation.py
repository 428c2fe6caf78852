"""Training-time transforms: padding, label-balanced patch sampling and random spatial/intensity augmentation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from monai import transforms as mt

from pipeline.config import AugmentationConfig

INDICES_POSTFIX = "_class_indices"


def sampling_transforms(
    *,
    patch_size: Sequence[int],
    num_classes: int,
    samples_per_volume: int,
    keys: Sequence[str] = ("image", "label"),
) -> list[mt.Transform]:
    """Pad to the patch size, index voxels by class (cacheable), then crop patches centred on each class equally."""
    label_key = keys[1]
    size = tuple(int(s) for s in patch_size)
    return [
        mt.EnsureTyped(keys=list(keys), dtype=np.float32, track_meta=False),
        mt.SpatialPadd(keys=list(keys), spatial_size=size, mode="constant", value=0),
        mt.ClassesToIndicesd(keys=label_key, indices_postfix=INDICES_POSTFIX, num_classes=num_classes),
        mt.RandCropByLabelClassesd(
            keys=list(keys),
            label_key=label_key,
            spatial_size=size,
            num_classes=num_classes,
            num_samples=samples_per_volume,
            indices_key=f"{label_key}{INDICES_POSTFIX}",
            warn=False,
        ),
        mt.DeleteItemsd(keys=f"{label_key}{INDICES_POSTFIX}"),
    ]


def augmentation_transforms(
    augmentation: AugmentationConfig,
    *,
    keys: Sequence[str] = ("image", "label"),
) -> list[mt.Transform]:
    """Random flips, one combined rotation+scaling affine, intensity scale/shift and Gaussian noise (image only)."""
    if not augmentation.enabled:
        return []
    keys = list(keys)
    image_key = keys[0]
    steps: list[mt.Transform] = []
    if augmentation.flip_prob > 0:
        steps.extend(mt.RandFlipd(keys=keys, prob=augmentation.flip_prob, spatial_axis=axis) for axis in range(3))
    rotate = math.radians(augmentation.rotate_deg) if augmentation.rotate_prob > 0 else 0.0
    scale = augmentation.scale_range if augmentation.scale_prob > 0 else 0.0
    if rotate > 0 or scale > 0:
        # one resampling for both, applied when either would be: P = 1 - (1 - p_rot)(1 - p_scale)
        prob = 1.0 - (1.0 - (augmentation.rotate_prob if rotate else 0.0)) * (
            1.0 - (augmentation.scale_prob if scale else 0.0))
        steps.append(mt.RandAffined(
            keys=keys,
            prob=prob,
            rotate_range=(rotate, rotate, rotate) if rotate else None,
            scale_range=(scale, scale, scale) if scale else None,
            mode=["bilinear" if k == image_key else "nearest" for k in keys],
            padding_mode="zeros",
        ))
    if augmentation.intensity_prob > 0 and augmentation.intensity_scale > 0:
        steps.append(mt.RandScaleIntensityd(keys=image_key, factors=augmentation.intensity_scale,
                                            prob=augmentation.intensity_prob))
    if augmentation.intensity_prob > 0 and augmentation.intensity_shift > 0:
        steps.append(mt.RandShiftIntensityd(keys=image_key, offsets=augmentation.intensity_shift,
                                            prob=augmentation.intensity_prob))
    if augmentation.noise_prob > 0 and augmentation.noise_std > 0:
        steps.append(mt.RandGaussianNoised(keys=image_key, prob=augmentation.noise_prob, std=augmentation.noise_std))
    return steps


def training_transforms(
    augmentation: AugmentationConfig,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    samples_per_volume: int = 1,
    keys: Sequence[str] = ("image", "label"),
) -> mt.Compose:
    """The whole training pipeline over in-memory ``{"image", "label"}`` arrays (channel first).

    Everything before the first random transform (typing, padding, class indices) is
    deterministic, so a ``CacheDataset`` caches it once per volume.
    """
    steps = [
        *sampling_transforms(patch_size=patch_size, num_classes=num_classes, samples_per_volume=samples_per_volume,
                             keys=keys),
        *augmentation_transforms(augmentation, keys=keys),
        mt.EnsureTyped(keys=list(keys), dtype=np.float32, track_meta=False),
    ]
    return mt.Compose(steps)
