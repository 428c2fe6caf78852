"""Deterministic preprocessing (load, channel first, orientation, spacing, normalisation, crop) from plans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from pipeline.errors import ConfigError, GeometryError
from pipeline.io.channels import channel_names, load_channels
from pipeline.io.nifti import load_nifti
from pipeline.planning import resolve_normalization


def normalization_transform(plans: dict[str, Any], *, key: str = "image") -> list[mt.MapTransform]:
    """Intensity normalisation by plans (``auto`` resolves by the plans' modality, as planning does).

    ``zscore``: per image, (x - mean) / std over all voxels; ``zscore_nonzero``: over the voxels that are
    not 0, which alone change (the rest stays 0). ``ct`` (nnU-Net's CT scheme): clip to
    the foreground 0.5/99.5 percentiles of the training set (``intensity.p005``/``p995``), then
    subtract the foreground mean and divide by the foreground std of the training set. ``none``:
    unchanged. Plans of several channels normalise each channel by its own entry in ``channels``.
    """
    if plans.get("channels"):
        return [ChannelNormalized(keys=key, channels=plans["channels"])]
    method = resolve_normalization(plans.get("normalization", "zscore"), plans.get("modality"))
    if method in ("zscore", "zscore_nonzero"):
        return [mt.NormalizeIntensityd(keys=key, nonzero=method == "zscore_nonzero", channel_wise=True)]
    if method == "ct":
        lo, hi, mean, std = _ct_values(plans["intensity"])
        clip = [mt.ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True)] if hi > lo else []
        return [*clip, mt.NormalizeIntensityd(keys=key, subtrahend=mean, divisor=std)]
    if method == "none":
        return []
    raise ConfigError(f"unknown normalization {method!r} in the plans; use zscore, zscore_nonzero, ct, none or auto")


def _ct_values(stats: dict[str, Any]) -> tuple[float, float, float, float]:
    """(clip low, clip high, mean, std) of ``ct`` normalisation."""
    return float(stats["p005"]), float(stats["p995"]), float(stats["mean"]), max(float(stats["std"]), 1e-6)


def _channel_steps(channel: dict[str, Any]) -> list[Any]:
    """The array transforms normalising one channel (C = 1) as ``normalization_transform`` does a whole image."""
    method = resolve_normalization(str(channel.get("normalization", "zscore")), str(channel.get("name")))
    if method in ("zscore", "zscore_nonzero"):
        return [mt.NormalizeIntensity(nonzero=method == "zscore_nonzero", channel_wise=True)]
    if method == "ct":
        lo, hi, mean, std = _ct_values(channel["intensity"])
        clip = [mt.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True)] if hi > lo else []
        return [*clip, mt.NormalizeIntensity(subtrahend=mean, divisor=std)]
    if method == "none":
        return []
    raise ConfigError(f"unknown normalization {method!r} for channel {channel.get('name')!r} in the plans; use "
                      "zscore, zscore_nonzero, ct, none or auto")


class ChannelNormalized(mt.MapTransform):
    """Normalise each channel of a channel-first image by its own plans entry (``name``, ``normalization``,
    ``intensity``): a FLAIR channel by its z-score beside a CT channel clipped and scaled in HU."""

    def __init__(self, keys: str | Sequence[str], *, channels: Sequence[dict[str, Any]]) -> None:
        super().__init__(keys)
        self.names = [str(c.get("name")) for c in channels]
        self.steps = [_channel_steps(c) for c in channels]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if image.shape[0] != len(self.steps):
                raise GeometryError(f"{key}: {image.shape[0]} channel(s), but the plans normalise "
                                    f"{len(self.steps)} ({', '.join(self.names)})", code="channels_mismatch")
            values = torch.as_tensor(image).as_subclass(torch.Tensor)
            normalised = values.clone()
            for number, steps in enumerate(self.steps):
                part = values[number:number + 1]
                for step in steps:
                    part = torch.as_tensor(step(part))
                normalised[number:number + 1] = part
            out[key] = MetaTensor(normalised, meta=image.meta, applied_operations=image.applied_operations) \
                if isinstance(image, MetaTensor) else normalised
        return out


class LoadVolumed(mt.MapTransform):
    """Load NIfTI paths with ``load_nifti`` (geometry-validated) into MetaTensors carrying their affine.

    Used instead of ``LoadImaged`` so preprocessing refuses the same broken headers as ingest
    (qform/sform disagreement, shear, no orientation) and never guesses a grid. ``file_order``:
    the tensor keeps the file's (Fortran) voxel order as strides, sparing the transposing copy
    (about 1 s for a 512 x 512 x 300 CT); only for transforms whose results do not depend on the
    order in which voxels are summed (see ``preprocessing_transforms``).
    """

    def __init__(self, keys: Sequence[str], *, file_order: bool = False, channels: Sequence[str] | None = None) -> None:
        super().__init__(keys)
        self.file_order = file_order
        self.channels = list(channels) if channels else None  # the first key's: a 4D image of these, channel last

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for number, key in enumerate(self.key_iterator(out)):
            path = str(out[key])
            order: Literal["C", "K"] = "K" if self.file_order else "C"
            volume = load_channels(path, self.channels, order=order) if number == 0 else load_nifti(path, order=order)
            affine = torch.as_tensor(volume.affine, dtype=torch.float64)
            meta = {
                "filename_or_obj": path,
                "original_affine": affine.clone(),
                "spatial_shape": np.asarray(volume.spatial_shape),
                "original_channel_dim": -1 if volume.array.ndim == 4 else "no_channel",
                "space": "RAS",
            }
            array = volume.array if self.file_order else np.ascontiguousarray(volume.array)
            out[key] = MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)
        return out


def preprocessing_transforms(
    plans: dict[str, Any],
    *,
    keys: Sequence[str] = ("image", "label"),
    crop_foreground: bool | None = None,
    load: bool = True,
    file_order: bool = False,
) -> mt.Compose:
    """Load NIfTI files named in a dict and bring them to the plans' orientation, spacing and intensities.

    ``keys`` lists the image first (4D, channel last, where the plans name several ``channels``); a
    ``label`` key is resampled with nearest neighbour.
    ``crop_foreground`` overrides the plans (inference keeps the whole field of view).
    ``load=False`` starts from MetaTensors already loaded (with their affine) instead of paths.
    ``file_order``: load in the files' voxel order where the normalisation uses fixed statistics
    (``ct``, ``none``), so that every output value is computed as from C-ordered data; a per-image
    ``zscore`` sums the voxels, whose rounding would follow their order, so it loads C-ordered.
    """
    keys = list(keys)
    modes = ["nearest" if k == "label" else "bilinear" for k in keys]
    names = channel_names(plans)
    methods = [c["normalization"] for c in plans["channels"]] if names else [plans.get("normalization", "zscore")]
    fixed = all(resolve_normalization(m, plans.get("modality")) in ("ct", "none") for m in methods)
    steps: list[mt.MapTransform] = [LoadVolumed(keys=keys, file_order=file_order and fixed, channels=names)] \
        if load else []
    steps += [
        mt.EnsureChannelFirstd(keys=keys[0], channel_dim=-1 if names else "no_channel"),  # channel last in files
        *([mt.EnsureChannelFirstd(keys=keys[1:], channel_dim="no_channel")] if keys[1:] else []),
        mt.EnsureTyped(keys=keys, dtype=np.float32),
        mt.Orientationd(keys=keys, axcodes=plans.get("orientation", "RAS"),
                        labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if plans.get("target_spacing"):
        steps.append(mt.Spacingd(keys=keys, pixdim=tuple(plans["target_spacing"]), mode=modes))
    crop = plans.get("crop_foreground", False) if crop_foreground is None else crop_foreground
    if crop:
        steps.append(mt.CropForegroundd(keys=keys, source_key=keys[0], allow_smaller=True))
    steps.extend(normalization_transform(plans, key=keys[0]))
    return mt.Compose(steps)
