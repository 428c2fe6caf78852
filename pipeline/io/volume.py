"""The Volume type: a voxel array that always travels with its affine (voxel index -> RAS mm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import GeometryError
from pipeline.io import nib


@dataclass(frozen=True)
class Volume:
    """A 3D (or 4D, last axis = time/volume) array on a grid given by a 4x4 RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise GeometryError(f"affine must be 4x4, got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise GeometryError("affine holds NaN or infinite values")
        if not np.allclose(affine[3], [0, 0, 0, 1]):
            raise GeometryError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise GeometryError("affine is singular (a zero voxel size or collapsed axes)")
        if self.array.ndim not in (3, 4):
            raise GeometryError(f"expected a 3D or 4D array, got {self.array.ndim}D")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return int(s[0]), int(s[1]), int(s[2])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def orientation(self) -> str:
        """Three-letter RAS axis code (e.g. ``RAS``, ``LPS``) of the array axes."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    def same_grid(self, other: Volume, *, atol: float = 1e-3) -> bool:
        """True when both volumes share spatial shape and affine (within ``atol`` mm)."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.affine, other.affine, atol=atol)
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other voxels (the spatial shape must match)."""
        if tuple(array.shape[:3]) != self.spatial_shape:
            raise GeometryError(f"array shape {array.shape[:3]} does not match grid {self.spatial_shape}")
        return Volume(array=array, affine=self.affine, meta=dict(self.meta))


def shear_magnitude(affine: np.ndarray) -> float:
    """Largest |cosine| between two different voxel axes (0 for an orthogonal grid)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0, keepdims=True)
    gram = np.abs(unit.T @ unit - np.eye(3))
    return float(gram.max())
