"""Random rotation, scaling and elastic deformation of an enlarged crop, resampled once to the patch."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from pipeline.transforms.sampling import rotation_matrix


def _centred_grid(size: Sequence[int]) -> torch.Tensor:
    """(3, *size) voxel coordinates relative to the centre of an array of ``size``."""
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth_noise(rng: np.random.RandomState, size: Sequence[int], sigma: float) -> torch.Tensor:
    """(3, *size) uniform(-1, 1) noise smoothed by a Gaussian of ``sigma`` voxels (zero outside).

    The field is so smooth that it is drawn on a grid ``sigma // 3`` times coarser (noise scaled to
    keep the smoothed variance) and interpolated back: ~100x cheaper than full-size filtering.
    """
    sigma = max(float(sigma), 0.01)  # sigma 0: (practically) unsmoothed noise
    step = max(1, int(sigma // 3))
    coarse = [math.ceil((n - 1) / step) + 1 for n in size]
    noise = rng.uniform(-1.0, 1.0, (3, *coarse)).astype(np.float32) * step ** -1.5
    field = torch.from_numpy(noise)[None]
    kernel = _gaussian_kernel(sigma / step)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = kernel.numel() // 2
        weight = kernel.reshape(1, 1, *shape).repeat(3, 1, 1, 1, 1)
        field = F.conv3d(field, weight, padding=tuple(padding), groups=3)
    if step > 1:
        full = [(n - 1) * step + 1 for n in coarse]
        field = F.interpolate(field, size=full, mode="trilinear", align_corners=True)
    return field[0, :, :size[0], :size[1], :size[2]].contiguous()


class RandSpatialPatchd(Randomizable, MapTransform):
    """Turn an enlarged crop (patch + ``margin`` per side) into a patch of ``patch_size``.

    Independently: rotation about each axis by U(-rotate_deg, rotate_deg) with ``rotate_prob``,
    isotropic scaling by U(1 - scale_range, 1 + scale_range) with ``scale_prob``, and an elastic
    deformation (uniform noise smoothed by a Gaussian of sigma in ``elastic_sigma``, times a
    magnitude in ``elastic_magnitude``, in voxels) with ``elastic_prob``. When any applies, every
    key is resampled once on the same grid about the crop centre (``modes`` per key: "bilinear" for
    images, "nearest" for labels; zeros outside); otherwise the central patch is cut out unchanged.
    """

    def __init__(self, keys: KeysCollection, *, modes: Sequence[str], patch_size: Sequence[int],
                 margin: Sequence[int], rotate_deg: float = 0.0, rotate_prob: float = 0.0,
                 scale_range: float = 0.0, scale_prob: float = 0.0, elastic_prob: float = 0.0,
                 elastic_sigma: tuple[float, float] = (9.0, 13.0),
                 elastic_magnitude: tuple[float, float] = (0.0, 900.0)) -> None:
        super().__init__(keys)
        self.modes = tuple(modes)
        if len(self.modes) != len(self.keys):
            raise ValueError("RandSpatialPatchd needs one interpolation mode per key")
        self.patch_size = tuple(int(v) for v in patch_size)
        self.margin = tuple(int(v) for v in margin)
        self.rotate = math.radians(rotate_deg)
        self.rotate_prob = float(rotate_prob) if rotate_deg > 0 else 0.0
        self.scale_range = float(scale_range)
        self.scale_prob = float(scale_prob) if scale_range > 0 else 0.0
        self.elastic_prob = float(elastic_prob) if elastic_magnitude[1] > 0 else 0.0
        self.elastic_sigma = tuple(float(v) for v in elastic_sigma)
        self.elastic_magnitude = tuple(float(v) for v in elastic_magnitude)
        self._grid = _centred_grid(self.patch_size)
        self.params: dict[str, Any] = {}  # what the last call drew (for tests and logging)

    def randomize(self, data: Any = None) -> None:
        u_rot, u_scale, u_elastic = self.R.random_sample(3)
        angles = self.R.uniform(-self.rotate, self.rotate, size=3) if self.rotate > 0 else np.zeros(3)
        scale = self.R.uniform(1.0 - self.scale_range, 1.0 + self.scale_range)
        sigma = self.R.uniform(*self.elastic_sigma)
        magnitude = self.R.uniform(*self.elastic_magnitude)
        self.params = {
            "angles": angles if u_rot < self.rotate_prob else None,
            "scale": scale if u_scale < self.scale_prob else None,
            "elastic": (sigma, magnitude) if u_elastic < self.elastic_prob else None,
        }

    def _sampling_grid(self, in_size: Sequence[int]) -> torch.Tensor:
        """The (1, *patch, 3) grid_sample grid mapping patch voxels into the enlarged crop."""
        coords = self._grid
        if self.params["elastic"] is not None:
            sigma, magnitude = self.params["elastic"]
            coords = coords + smooth_noise(self.R, self.patch_size, sigma) * magnitude
        matrix = np.eye(3)
        if self.params["angles"] is not None:
            matrix = rotation_matrix(self.params["angles"]) @ matrix
        if self.params["scale"] is not None:
            matrix = matrix * self.params["scale"]
        coords = torch.einsum("ij,j...->i...", torch.as_tensor(matrix, dtype=torch.float32), coords)
        size = torch.as_tensor([float(n) for n in in_size]).reshape(3, 1, 1, 1)
        normalised = coords * (2.0 / (size - 1).clamp(min=1.0))  # align_corners=True, centred
        return normalised.flip(0).permute(1, 2, 3, 0)[None]  # grid_sample wants (z, y, x) order last

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        transform = any(v is not None for v in self.params.values())
        grid = None
        for key, mode in self.key_iterator(d, self.modes):
            image = torch.as_tensor(d[key])
            if not transform:
                d[key] = image[(slice(None), *(slice(m, m + p) for m, p in zip(self.margin, self.patch_size,
                                                                              strict=True)))].contiguous()
                continue
            if grid is None:
                grid = self._sampling_grid(image.shape[1:])
            out = F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)
            d[key] = out[0].to(image.dtype)
        return d
