"""Siemens mosaics: the CSA header, tile geometry (dcm2niix's position correction) and untiling pixels."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.io.dicom_tags import Tags

if TYPE_CHECKING:
    import numpy as np

    from pipeline.io.dicom_header import FrameInfo

_MR_HEADER_CREATOR, _CSA_CREATOR = 0x00190010, 0x00290010
_IMAGES_IN_MOSAIC, _CSA_IMAGE = 0x0019100A, 0x00291010
_CSA_TAG_BYTES = 84  # name[64], vm, vr[4], syngodt, n_items, marker (int32 each)
_NORMAL_TOL = 1e-3


class CsaError(ValueError):
    """The CSA header cannot be read."""


def parse_csa(data: bytes) -> dict[str, list[str]]:
    """Name -> item strings of a Siemens CSA2 ("SV10") header."""
    if len(data) < 16 or data[:4] != b"SV10":
        raise CsaError("not a CSA2 (SV10) header")
    n_tags = struct.unpack_from("<I", data, 8)[0]
    if not 0 < n_tags <= 1000:
        raise CsaError(f"implausible tag count {n_tags}")
    pos, out = 16, {}
    for _ in range(n_tags):
        if pos + _CSA_TAG_BYTES > len(data):
            raise CsaError("truncated tag")
        name = data[pos:pos + 64].split(b"\0", 1)[0].decode("latin-1")
        n_items = struct.unpack_from("<i", data, pos + 76)[0]
        pos += _CSA_TAG_BYTES
        if not 0 <= n_items <= 10000:
            raise CsaError(f"implausible item count for {name}")
        items = []
        for _ in range(n_items):
            if pos + 16 > len(data):
                raise CsaError("truncated item")
            length = struct.unpack_from("<i", data, pos + 4)[0]
            pos += 16
            if length < 0 or pos + length > len(data):
                raise CsaError(f"bad item length in {name}")
            value = data[pos:pos + length].split(b"\0", 1)[0].decode("latin-1").strip()
            if value:
                items.append(value)
            pos += (length + 3) // 4 * 4
        out[name] = items
    return out


def _private(tags: Tags, creator_tag: int, creator: str) -> bool:
    return (tags.text(creator_tag) or "").strip().upper() == creator


def _images_in_mosaic(tags: Tags, csa: dict[str, list[str]]) -> int | None:
    if _private(tags, _MR_HEADER_CREATOR, "SIEMENS MR HEADER"):
        raw = tags.raw_bytes(_IMAGES_IN_MOSAIC)
        value = struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else tags.number(_IMAGES_IN_MOSAIC)
        if value:
            return int(value)
    items = csa.get("NumberOfImagesInMosaic", [])
    try:
        return int(float(items[0])) if items else None
    except ValueError:
        return None


def mosaic_frames(tags: Tags, frame: FrameInfo, *, rel: str) -> tuple[FrameInfo, ...]:
    """One FrameInfo per tile of a mosaic file, placed like dcm2niix places them.

    ImagePositionPatient of a mosaic is the corner of the whole mosaic; the first tile's corner
    lies half the mosaic-minus-tile extent along the row and column directions from it. Tile k
    sits k slice spacings along the CSA SliceNormalVector (which may point either way).
    """
    base = frame.geometry

    def failed(message: str) -> tuple[FrameInfo, ...]:
        return (replace(frame, geometry_error=f"{rel}: Siemens mosaic: {message}", error_code="dicom_bad_mosaic"),)

    csa: dict[str, list[str]] = {}
    blob = tags.raw_bytes(_CSA_IMAGE) if _private(tags, _CSA_CREATOR, "SIEMENS CSA HEADER") else None
    if blob is not None:
        try:
            csa = parse_csa(blob)
        except CsaError as exc:
            return failed(f"unreadable CSA image header ({exc})")
    count = _images_in_mosaic(tags, csa)
    if not count or count < 1:
        return failed("NumberOfImagesInMosaic is missing; cannot cut the mosaic into slices")
    per_side = math.ceil(math.sqrt(count))
    if base.rows % per_side or base.columns % per_side:
        return failed(f"{base.rows}x{base.columns} pixels do not split into {per_side}x{per_side} tiles")
    tile_rows, tile_cols = base.rows // per_side, base.columns // per_side
    normal_items = csa.get("SliceNormalVector", [])
    if len(normal_items) != 3:
        return failed("the CSA header has no SliceNormalVector, so the slice order is unknown")
    if frame.geometry_error or base.position is None or base.orientation is None or base.pixel_spacing is None:
        return (frame,)  # the geometry error (or missing tag) is reported when the series is decoded
    try:
        normal = [float(v) for v in normal_items]
    except ValueError:
        return failed(f"SliceNormalVector {normal_items} is not numeric")
    row, col = base.orientation[:3], base.orientation[3:]
    if abs(math.sqrt(_dot(normal, normal)) - 1) > _NORMAL_TOL or abs(_dot(normal, row)) > _NORMAL_TOL or abs(
            _dot(normal, col)) > _NORMAL_TOL:
        return failed(f"SliceNormalVector {normal} is not a unit normal of the image plane")
    step = base.spacing_between_slices or base.slice_thickness
    if count > 1 and (step is None or step <= 0):
        return failed("needs SpacingBetweenSlices or SliceThickness to place its slices")
    row_spacing, col_spacing = base.pixel_spacing
    corner = [p + r * col_spacing * (base.columns - tile_cols) / 2 + c * row_spacing * (base.rows - tile_rows) / 2
              for p, r, c in zip(base.position, row, col, strict=True)]
    frames = []
    for k in range(count):
        position = tuple(p + n * (step or 0.0) * k for p, n in zip(corner, normal, strict=True))
        geometry = replace(base, rows=tile_rows, columns=tile_cols, position=position)
        frames.append(replace(frame, index=k, geometry=geometry))
    return tuple(frames)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def untile(pixels: np.ndarray, *, count: int, tile_rows: int, tile_cols: int) -> np.ndarray:
    """(rows, cols) mosaic -> (count, tile_rows, tile_cols) slices, row-major tile order."""
    rows, cols = pixels.shape
    grid = pixels.reshape(rows // tile_rows, tile_rows, cols // tile_cols, tile_cols).swapaxes(1, 2)
    return grid.reshape(-1, tile_rows, tile_cols)[:count]
