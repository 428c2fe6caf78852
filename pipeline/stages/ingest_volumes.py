"""``ingest.split_4d``: a study per volume of a 4D source (fMRI, dynamic or repeated acquisitions), each recorded
as volume N of M in the manifest. DICOM series are split by ``pipeline.io.dicom_split`` (parts ``tNNNN``, in
acquisition order); a 4D NIfTI image by the 4th axis of its data, whose header is read at discovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.io.dicom import DicomScan
from pipeline.io.dicom_split import split_volume
from pipeline.io.nifti import declared_shape


def volume_specs(spec: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """``ingest.split_4d``: a study per volume of a 4D NIfTI image (its header read here), else ``spec`` alone."""
    shape = declared_shape(path) or ()
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton axes, as load_nifti squeezes them
        shape = shape[:-1]
    if len(shape) != 4 or shape[3] < 2:
        return [spec]
    return [{**spec, "id_key": f"{spec['id_key']}/t{t:04d}", "volume": t, "volumes": shape[3]}
            for t in range(1, shape[3] + 1)]


def split_parts(scan: DicomScan) -> dict[str, dict[str, int]]:
    """``{"volume", "volumes"}`` by series key, for each volume that ``ingest.split_4d`` made a series of."""
    parts: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for series in scan.series:
        volume = split_volume(series.part)
        if volume is not None:
            parts.setdefault((series.uid, series.part.rpartition("/")[0]), []).append((series.key, volume))
    return {key: {"volume": volume, "volumes": len(members)}
            for members in parts.values() for key, volume in members}
