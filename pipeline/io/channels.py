"""Multi-channel images: one volume per MR sequence or modality (MSD's BrainTumour, Prostate), stored as one
X x Y x Z x C NIfTI file, channel last, all channels on one grid. The plans name the channels
(``plans["channels"]``, absent for one channel); every stage after ingest loads images through
:func:`load_channels`, so a study with the wrong number of channels fails with the names it needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import GeometryError
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume


def channel_names(plans: Mapping[str, Any]) -> list[str] | None:
    """The plans' channel names (several channels), else None (one channel, 3D images)."""
    channels = plans.get("channels")
    return [str(c["name"]) for c in channels] if channels else None


def channel_count(plans: Mapping[str, Any]) -> int:
    return len(plans.get("channels") or ()) or 1


_BY, _FIX = "the model's plans", "give the images the model was trained on, channels in the same order"


def check_channels(volume: Volume, names: Sequence[str] | None, *, what: str, by: str = _BY,
                   fix: str = _FIX) -> Volume:
    """``volume`` when it holds the channels ``names`` lists (a 3D volume when None); else a GeometryError
    naming ``what`` (the file or study), the channels found and those ``by`` expects, with ``fix``."""
    found = volume.array.shape[3] if volume.array.ndim == 4 else 1
    expected = len(names) if names else 1
    if found != expected:
        wanted = f"{expected} channels ({', '.join(names)}), one volume each along the 4th axis" if names else \
            "a 3D image (one channel)"
        held = f"{found} channels along the 4th axis" if volume.array.ndim == 4 else "one channel (a 3D image)"
        raise GeometryError(f"{what}: {held}, but {by} expect {wanted}; {fix}{_hint(found, names)}",
                            code="channels_mismatch")
    return volume


def _hint(found: int, names: Sequence[str] | None) -> str:
    """How to give images of several channels as files of one each, or a 4D series to a one-channel model."""
    if found == 1:
        return ("; files of one channel each are read as one case when named like nnU-Net v2's (CASE_0000.nii.gz, "
                "CASE_0001.nii.gz, ... in one folder): give that folder")
    if not names:
        return ("; for one prediction per volume of a 4D series (fMRI, dynamics), ingest it with --set "
                "ingest.split_4d=true and give the ingest folder")
    return ""


def load_channels(path: str | Path, names: Sequence[str] | None, *, order: Literal["C", "K"] = "C", by: str = _BY,
                  fix: str = _FIX) -> Volume:
    """:func:`load_nifti` for an image of the channels ``names`` lists (a 3D image when None); ``by`` and ``fix``
    as :func:`check_channels`'."""
    volume = load_nifti(path, allow_4d=bool(names), order=order)
    return check_channels(volume, names, what=Path(path).name, by=by, fix=fix)


def channel_first(array: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) from a 3D (X, Y, Z) or channel-last 4D (X, Y, Z, C) array (a view where possible)."""
    return array[np.newaxis] if array.ndim == 3 else np.moveaxis(array, -1, 0)


def channel_last(array: np.ndarray) -> np.ndarray:
    """What a NIfTI file stores of a (C, X, Y, Z) array: (X, Y, Z) for one channel, else (X, Y, Z, C)."""
    return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)


def _grid(volume: Volume) -> str:
    return (f"shape {list(volume.spatial_shape)}, spacing {[round(s, 4) for s in volume.spacing]}, origin "
            f"{[round(float(v), 3) for v in volume.affine[:3, 3]]} mm")


def stack_channels(volumes: Sequence[Volume], names: Sequence[str]) -> Volume:
    """3D volumes, one per channel (files ``names``), as one 4D volume, channel last. They must share one grid
    (GeometryError ``channel_grid_mismatch`` naming the file that differs); never resampled here."""
    first = volumes[0]
    for volume, name in zip(volumes[1:], names[1:], strict=True):
        if not volume.same_grid(first):
            raise GeometryError(f"{name}: grid ({_grid(volume)}) differs from {names[0]}'s ({_grid(first)}); the "
                                "channels of a case must share one grid: resample them onto the first",
                                code="channel_grid_mismatch")
    kept = all(v.array.dtype == np.dtype(v.meta.get("source_dtype", v.array.dtype)) for v in volumes)  # no rescale
    array = np.stack([v.array for v in volumes], axis=-1)
    return Volume(array, first.affine, meta={"source_dtype": str(array.dtype) if kept else "float32"})


def resample_onto(volume: Volume, reference: Volume) -> np.ndarray:
    """``volume``'s voxels (3D) trilinearly interpolated at the centres of ``reference``'s voxels, through both
    affines (world positions, so the two must share a Frame of Reference); 0 outside ``volume``. float32."""
    from scipy import ndimage

    source = np.asarray(volume.array, dtype=np.float32)
    to_source = np.linalg.inv(volume.affine) @ reference.affine
    nx, ny, nz = reference.spatial_shape
    i, j = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij")
    out = np.empty((nx, ny, nz), dtype=np.float32)
    for k in range(nz):  # a slice at a time: the coordinates of a whole CT would take gigabytes
        points = np.stack([i.ravel(), j.ravel(), np.full(i.size, float(k)), np.ones(i.size)])
        coords = (to_source @ points)[:3]
        out[:, :, k] = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0,
                                               output=np.float32).reshape(nx, ny)
    return out


def load_case(path: str | Path | Sequence[str | Path], names: Sequence[str] | None, *, by: str = _BY) -> Volume:
    """An input image of the channels ``names`` lists: one file (3D, or 4D channel last), or a sequence of 3D
    files, one per channel in order (nnU-Net v2's CASE_0000.nii.gz, CASE_0001.nii.gz, ...), stacked."""
    if isinstance(path, str | Path):
        return load_channels(path, names, by=by)
    volume = stack_channels([load_channels(p, None) for p in path], [Path(p).name for p in path])
    return check_channels(volume, names, what=f"{Path(path[0]).name} and the other channel files", by=by)

