"""Classification inputs: labelled studies of a manifest as normalised, resized tensors; batch augmentation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ManifestError
from pipeline.io.channels import channel_first, load_channels
from pipeline.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """Studies as one tensor (N, C, *input_size), C channels, with their ids and integer labels (-1: unknown)."""

    ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    def subset(self, ids: list[str]) -> LabelledSet:
        index = {s: i for i, s in enumerate(self.ids)}
        rows = torch.tensor([index[s] for s in ids], dtype=torch.long)
        return LabelledSet(list(ids), self.images[rows], self.labels[rows])


def normalise(array: np.ndarray, mode: str) -> np.ndarray:
    """minmax: to [0, 1] per volume; zscore: zero mean, unit std per volume; none: as is (float32)."""
    array = array.astype(np.float32, copy=False)
    if mode == "minmax":
        lo, hi = float(array.min()), float(array.max())
        return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if mode == "zscore":
        std = float(array.std())
        return (array - float(array.mean())) / std if std > 0 else array - float(array.mean())
    return array


def to_input(array: np.ndarray, input_size: tuple[int, ...], normalization: str) -> torch.Tensor:
    """One volume (X, Y, Z), or one of several channels (X, Y, Z, C, channel last) -> (C, *input_size), each
    channel normalised alone (its own range or mean and std). A 2D size takes the volume's single slice (Z = 1)."""
    channels = channel_first(array)  # (C, X, Y, Z)
    if len(input_size) == 2:
        if channels.shape[3] != 1:
            raise ManifestError(f"a 2D classifier (input_size {list(input_size)}) needs 2D images; got shape "
                                f"{list(array.shape)}; give a 3-value classify.input_size")
        channels = channels[..., 0]
    normalised = np.stack([normalise(channel, normalization) for channel in channels])
    tensor = torch.from_numpy(np.ascontiguousarray(normalised))[None]
    if tuple(tensor.shape[2:]) != tuple(input_size):
        shrink = all(s >= t for s, t in zip(tensor.shape[2:], input_size, strict=True))
        mode = "area" if shrink else ("bilinear" if len(input_size) == 2 else "trilinear")
        kwargs = {} if mode == "area" else {"align_corners": False}
        tensor = F.interpolate(tensor, size=tuple(input_size), mode=mode, **kwargs)
    return tensor[0]


def load_labelled(folder: str | Path, *, input_size: tuple[int, ...], normalization: str,
                  require_labels: bool = True, labelled_only: bool = False) -> tuple[LabelledSet, Manifest]:
    """Every ok study of the manifest in ``folder`` (an ingest/import folder) as a LabelledSet: one channel per
    volume of the manifest's ``channels`` (MR sequences of one study), a study holding others failing by name.

    ``require_labels``: every study must have a class label; ``labelled_only``: unlabelled
    studies are left out (and at least one labelled study is needed).
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    studies = [s for s in manifest.ok_studies() if s.image]
    unlabelled = [s.id for s in studies if s.class_label is None]
    fix = ("set data.labels_csv to a CSV of study,label rows and run ingest again, or import MedMNIST with "
           "'medpipe import-medmnist'")
    if require_labels and unlabelled:
        raise ManifestError(f"{folder / 'manifest.json'}: {len(unlabelled)} stud(ies) have no class_label "
                            f"(e.g. {unlabelled[0]}); {fix}")
    if labelled_only:
        studies = [s for s in studies if s.class_label is not None]
        if not studies:
            raise ManifestError(f"{folder / 'manifest.json'}: no ok study has a class_label; {fix}")
        if unlabelled:
            log.info("%d unlabelled stud(ies) left out of training (inference only)", len(unlabelled))
    if not studies:
        raise ManifestError(f"{folder / 'manifest.json'}: no ok studies with an image")
    names = manifest.channels
    by, fix = f"{folder / 'manifest.json'}'s channels", "ingest the scans again into a new folder"
    tensors = [to_input(load_channels(folder / str(s.image), names, by=by, fix=fix).array, input_size,
                        normalization) for s in studies]
    labels = torch.tensor([-1 if s.class_label is None else int(s.class_label) for s in studies], dtype=torch.long)
    log.info("loaded %d studies from %s at %s", len(studies), folder, list(input_size))
    return LabelledSet([s.id for s in studies], torch.stack(tensors), labels), manifest


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians -> (B, 3, 3) rotation matrices (x, then y, then z)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def affine_grid(theta: torch.Tensor, shape: torch.Size | list[int]) -> torch.Tensor:
    """``F.affine_grid(theta, shape, align_corners=False)`` for 2D (B, 2, 3) and 3D (B, 3, 4) ``theta``, summed
    axis by axis over the shared 1D coordinates (equal to float rounding). torch's builds B copies of the
    homogeneous base grid and multiplies them by theta through a batched matmul of inner size 3 or 4, which took
    more than half of the augmentation's time on a 32^3 batch on the CPU."""
    spatial = list(shape)[2:]
    dims = len(spatial)

    def centres(n: int) -> torch.Tensor:  # voxel centres in [-1, 1], as align_corners=False places them
        return (torch.arange(n, dtype=theta.dtype, device=theta.device) * 2 + 1) / n - 1

    view = [theta.shape[0], *([1] * dims), dims]
    grid = theta[..., dims].view(view)
    for column, n in enumerate(reversed(spatial)):  # the grid's last axis runs x (width), y, z
        axis_shape = [1] * (dims + 2)
        axis_shape[dims - column] = n
        grid = grid + theta[..., column].view(view) * centres(n).view(axis_shape)
    return grid


def augment(batch: torch.Tensor, *, generator: torch.Generator | None = None, rotate_deg: float = 10.0,
            scale: float = 0.1, shift: float = 0.05, intensity: float = 0.1) -> torch.Tensor:
    """Random flips on every axis, a small rotation/scale/translation and an intensity scale/shift per sample.

    Works on (B, C, *spatial) for 2D and 3D; the draws come from ``generator`` (seeded runs repeat).
    """
    b, dims = batch.shape[0], batch.ndim - 2
    g = generator

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    out = batch
    for axis in range(dims):
        flip = torch.rand(b, generator=g) < 0.5
        if flip.any():
            out = torch.where(flip.view(-1, *([1] * (dims + 1))), out.flip(2 + axis), out)
    angles = uniform(b, 3) * math.radians(rotate_deg)
    if dims == 2:
        angles[:, :2] = 0
    matrix = _rotation(angles) * (1 + uniform(b, 1, 1) * scale)
    theta = torch.cat([matrix, uniform(b, 3, 1) * shift], dim=2)
    if dims == 2:
        theta = theta[:, :2][:, :, [0, 1, 3]]
    grid = affine_grid(theta.to(out.dtype), out.shape)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1 + uniform(b, *([1] * (dims + 1))) * intensity
    offset = uniform(b, *([1] * (dims + 1))) * intensity
    return out * gain + offset
