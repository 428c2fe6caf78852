"""Training patch sampling: cached per-class voxel indices and nnU-Net style foreground oversampling."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

INDICES_POSTFIX = "_class_indices"
MIN_LOCATIONS = 10_000  # per class, as nnU-Net: at least this many voxels ...
MIN_COVERAGE = 0.01  # ... or this fraction of the class, whichever is more, are kept as candidate centres

SamplingMode = Literal["foreground", "classes"]


def class_locations(label: np.ndarray, *, num_classes: int, include_background: bool) -> list[np.ndarray]:
    """Flat voxel indices of each class ``0..num_classes-1`` of a spatial label array (background empty
    unless ``include_background``), deterministically subsampled to max(10000, 1 %) per class."""
    flat = np.asarray(label).reshape(-1)
    out: list[np.ndarray] = []
    for c in range(num_classes):
        if c == 0 and not include_background:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        where = np.flatnonzero(flat == c)
        keep = max(MIN_LOCATIONS, math.ceil(MIN_COVERAGE * where.size))
        if where.size > keep:  # fixed seed: the cached head stays deterministic
            where = np.sort(where[np.random.default_rng(c).choice(where.size, size=keep, replace=False)])
        out.append(where.astype(np.int64, copy=False))
    return out


class ClassIndicesd(MapTransform):
    """Deterministic (cacheable): store the candidate centre voxels of every class under
    ``<label_key>_class_indices`` (a list indexed by class)."""

    def __init__(self, label_key: str, *, num_classes: int, include_background: bool = False) -> None:
        super().__init__(keys=label_key)
        self.label_key = label_key
        self.num_classes = int(num_classes)
        self.include_background = include_background

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        d[f"{self.label_key}{INDICES_POSTFIX}"] = class_locations(
            array[0], num_classes=self.num_classes, include_background=self.include_background)
        return d


def spatial_margin(patch_size: Sequence[int], *, rotate_deg: float, scale_range: float,
                   extra: int = 0) -> tuple[int, ...]:
    """Voxels to add on each side of a patch so that rotating it by up to ``rotate_deg`` about every
    axis and scaling it by up to ``1 + scale_range`` still samples inside the enlarged crop."""
    patch = np.asarray(patch_size, dtype=np.float64)
    if rotate_deg <= 0 and scale_range <= 0:
        return tuple(int(extra) for _ in patch)
    half = (patch - 1) / 2 * (1.0 + scale_range)
    reach = half.copy()
    if rotate_deg > 0:
        angles = np.radians(np.linspace(-min(rotate_deg, 180.0), min(rotate_deg, 180.0), 7))
        for a in angles:
            for b in angles:
                for c in angles:
                    reach = np.maximum(reach, np.abs(rotation_matrix((a, b, c))) @ half)
    needed = 2 * np.ceil(reach) + 2  # +2: the interpolation neighbours of the outermost sample
    return tuple(int(max(0, math.ceil((n - p) / 2)) + extra) for n, p in zip(needed, patch, strict=True))


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation by ``angles`` (radians) about axes 0, 1 and 2, applied in that order."""
    a, b, c = (float(v) for v in angles)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def crop_with_zeros(array: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """A new (C, *size) tensor holding ``array[:, start:start+size]``; parts outside the array are zero."""
    out = torch.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for lo, n, dim in zip(start, size, array.shape[1:], strict=True):
        a, b = max(lo, 0), min(lo + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


class RandPatchSamplerd(Randomizable, MapTransform):
    """Crop ``num_samples`` patches (a list of dicts) using the cached class indices.

    ``mode="foreground"`` (nnU-Net oversampling): each patch independently, with probability
    ``foreground_fraction``, is centred on a random voxel of a random class present in the label
    (background excluded), otherwise placed uniformly at random. ``mode="classes"``: centred on a
    random voxel of a class drawn uniformly among the classes present, background included (as
    MONAI's ``RandCropByLabelClassesd``). The patch always lies inside the (padded) volume; with
    ``margin`` the crop is enlarged by that many voxels per side (zero outside the volume) for a
    later rotation/scaling. Crops are copies: the cached volume is never modified.
    """

    def __init__(self, keys: KeysCollection, *, label_key: str, patch_size: Sequence[int], num_samples: int = 1,
                 mode: SamplingMode = "foreground", foreground_fraction: float = 0.33,
                 margin: Sequence[int] = (0, 0, 0)) -> None:
        super().__init__(keys)
        if mode not in ("foreground", "classes"):
            raise ValueError(f"sampling mode must be 'foreground' or 'classes', not {mode!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], not {foreground_fraction}")
        self.label_key = label_key
        self.indices_key = f"{label_key}{INDICES_POSTFIX}"
        self.patch_size = tuple(int(v) for v in patch_size)
        self.num_samples = int(num_samples)
        self.mode = mode
        self.foreground_fraction = float(foreground_fraction)
        self.margin = tuple(int(v) for v in margin)
        self.centred: list[bool] = []  # per patch of the last call: centred on a chosen class voxel?

    def randomize(self, shape: Sequence[int], indices: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
        """Patch start corners for one volume of spatial ``shape``; fills ``self.centred``."""
        starts, self.centred = [], []
        present = [c for c, idx in enumerate(indices) if len(idx) > 0 and (c > 0 or self.mode == "classes")]
        high = [max(s - p, 0) for s, p in zip(shape, self.patch_size, strict=True)]
        for _ in range(self.num_samples):
            draw = self.R.random_sample()  # always drawn: one patch's decision never shifts the next's
            if self.mode == "classes":
                centred = bool(present)
            else:
                centred = bool(present) and draw < self.foreground_fraction
            if centred:
                cls = present[self.R.randint(len(present))]
                voxel = np.unravel_index(int(indices[cls][self.R.randint(len(indices[cls]))]), tuple(shape))
                start = tuple(int(min(max(v - p // 2, 0), h))
                              for v, p, h in zip(voxel, self.patch_size, high, strict=True))
            else:
                start = tuple(int(self.R.randint(h + 1)) for h in high)
            starts.append(start)
            self.centred.append(centred)
        return starts

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        indices = d.pop(self.indices_key, None)
        if indices is None:
            raise KeyError(f"{self.indices_key} missing: put ClassIndicesd before RandPatchSamplerd")
        shape = tuple(d[self.label_key].shape[1:])
        size = tuple(p + 2 * m for p, m in zip(self.patch_size, self.margin, strict=True))
        out = []
        for start in self.randomize(shape, indices):
            corner = tuple(s - m for s, m in zip(start, self.margin, strict=True))
            item = dict(d)
            for key in self.key_iterator(d):
                item[key] = crop_with_zeros(torch.as_tensor(d[key]), corner, size)
            out.append(item)
        return out
