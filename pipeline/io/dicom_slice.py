"""The geometry tags of one DICOM image, as numbers: what discovery keeps of each file's header.

Its own module, free of numpy, so that reading headers (``pipeline.io.dicom_header``) imports no
numpy; the checks on a stack of them are in ``pipeline.io.dicom_geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry tags of one single-frame image, already parsed into numbers (None when absent)."""

    name: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
