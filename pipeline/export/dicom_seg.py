"""DICOM SEG export: a label volume on a DICOM series' own grid, written with highdicom, one frame per source slice.

The ingest manifest keeps no paths to source DICOM files (privacy), so the caller names the
series folder. The series is read with ``pipeline.io.dicom`` (the reader ingest uses) and the
labels must lie exactly on its grid: same shape, affine within 1e-3 mm; nothing is guessed or
resampled. Each slice of the label volume is then matched to its source image by that image's
own position and orientation tags, so every SEG frame references, and lies on, a source slice.

The SEG copies the patient and study modules of the source (that is what lets viewers and
archives attach it to the study); nothing of them is logged. UIDs are derived from the source
series UID and the label file's checksum, so one input gives one SEG; pass ``content_datetime``
for byte-identical files (the default is the time of writing).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from pipeline import __version__
from pipeline.errors import GeometryError, StageError
from pipeline.fileio import atomic_path, sha256_bytes, sha256_file
from pipeline.io.dicom import DicomOptions, DicomSeries, decode_series, discover_series, read_series_bytes, skip_reason
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.metrics.segmentation import integer_labels

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GRID_ATOL_MM = 1e-3
_MAX_SEGMENTS = 255


def find_series(folder: Path) -> DicomSeries:
    """The one image series under ``folder`` (StageError when there is none or more than one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{folder}: not a folder; pass the folder holding the source DICOM series",
                         code="seg_no_series")
    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    scan = discover_series(files, root=folder)
    images = [s for s in scan.series if skip_reason(s) is None]
    if len(images) != 1:
        raise StageError(f"{folder}: found {len(images)} image series; pass the folder of exactly one series",
                         code="seg_no_series" if not images else "seg_many_series")
    return images[0]


# Type 2 attributes (present, possibly empty) that the SEG copies; some anonymised series drop them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _source_datasets(blobs: list[bytes], *, series: DicomSeries,
                     missing_uids: Literal["refuse", "generate"]) -> tuple[list[pydicom.Dataset], list[str]]:
    """The parsed source images, repaired in memory where that has one safe meaning, and what was repaired.

    Absent type 2 attributes are added empty; empty SOP UIDs are taken from the file meta. Empty
    Study/Series Instance UIDs (blanked by some anonymisers) make the SEG unable to reference
    the source study and series: refused, or with ``missing_uids="generate"`` replaced by UIDs
    derived from the series (the SEG then matches its source only by SOP Instance UIDs and the
    frame of reference).
    """
    datasets = [pydicom.dcmread(io.BytesIO(blob)) for blob in blobs]
    added: set[str] = set()
    generated = {"StudyInstanceUID": generate_uid(entropy_srcs=[series.key, "medpipe source study"]),
                 "SeriesInstanceUID": generate_uid(entropy_srcs=[series.key, "medpipe source series"])}
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, fallback in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not ds.get(keyword) and meta is not None and meta.get(fallback):
                setattr(ds, keyword, meta.get(fallback))  # one safe meaning: the file meta's copy
                added.add(f"{keyword} (from {fallback})")
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
            raise StageError("a source image has no SOPClassUID or SOPInstanceUID; a SEG cannot reference it",
                             code="seg_source_unsupported")
        for keyword, uid in generated.items():
            if not ds.get(keyword):
                if missing_uids == "refuse":
                    raise StageError(f"the source series has no {keyword} (blanked by an anonymiser?); a SEG could "
                                     "not reference it. Allow generated UIDs (--generate-missing-uids) to export "
                                     "anyway", code="seg_source_uid_missing")
                setattr(ds, keyword, uid)
                added.add(f"{keyword} (generated)")
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
                added.add(keyword)
    return datasets, sorted(added)


def slice_order(datasets: list[pydicom.Dataset], affine: np.ndarray, n_slices: int) -> list[int]:
    """For slice k of the grid, the index of its source image, from each image's own position and orientation tags."""
    inverse = np.linalg.inv(affine)
    owner: dict[int, int] = {}
    for index, ds in enumerate(datasets):
        try:
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
            position = _LPS_TO_RAS @ np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
            row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        except (AttributeError, TypeError, ValueError) as exc:
            raise GeometryError(f"source image {index}: missing or malformed geometry tags ({exc})",
                                code="seg_source_geometry") from None
        along_row = _LPS_TO_RAS @ orientation[:3] * col_spacing  # voxel axis 0: the next column
        along_col = _LPS_TO_RAS @ orientation[3:] * row_spacing  # voxel axis 1: the next row
        if not (np.allclose(affine[:3, 0], along_row, atol=_GRID_ATOL_MM)
                and np.allclose(affine[:3, 1], along_col, atol=_GRID_ATOL_MM)):
            raise GeometryError(f"source image {index}: its orientation or pixel spacing differs from the series grid",
                                code="seg_source_geometry")
        i, j, k = (inverse @ np.append(position, 1.0))[:3]
        if abs(i) > 1e-3 or abs(j) > 1e-3 or abs(k - round(k)) > 1e-3 or not 0 <= round(k) < n_slices:
            raise GeometryError(f"source image {index}: its position lies off the series grid (voxel "
                                f"{i:.3f}, {j:.3f}, {k:.3f})", code="seg_source_geometry")
        if round(k) in owner:
            raise GeometryError(f"source images {owner[round(k)]} and {index} lie on one slice",
                                code="seg_source_geometry")
        owner[int(round(k))] = index
    if sorted(owner) != list(range(n_slices)):
        raise GeometryError(f"{n_slices - len(owner)} slices of the grid have no source image",
                            code="seg_source_geometry")
    return [owner[k] for k in range(n_slices)]


def _check_grid(labels: Volume, grid: Volume, what: str) -> None:
    if labels.array.ndim != 3 or grid.array.ndim != 3:
        raise GeometryError(f"{what}: DICOM SEG export needs a 3D label volume and a 3D series", code="seg_grid")
    if not labels.same_grid(grid, atol=_GRID_ATOL_MM):
        raise GeometryError(f"{what}: the labels' grid ({_grid_text(labels)}) is not the series' grid "
                            f"({_grid_text(grid)}); predict on the image ingested from this series", code="seg_grid")


def _grid_text(volume: Volume) -> str:
    spacing = [round(v, 4) for v in volume.spacing]
    return (f"shape {volume.spatial_shape}, {volume.orientation}, spacing {spacing} mm, origin "
            f"{np.round(volume.affine[:3, 3], 3).tolist()}")


def segment_descriptions(values: list[int], names: Mapping[str, str] | None) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="medpipe", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=(names or {}).get(str(value), f"label {value}")[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, value in enumerate(values, start=1)]


def _pin(seg: pydicom.Dataset, *, when: datetime, dimension_uid: str) -> None:
    """Replace what highdicom takes from the clock or a random source, so one input gives one file."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    seg.ContentDate, seg.ContentTime = date, time
    seg.SeriesDate, seg.SeriesTime = date, time
    seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = date + time
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dimension_uid


def export_dicom_seg(
    series: Path | DicomSeries,
    labels: Path | Volume,
    out: Path,
    *,
    label_names: Mapping[str, str] | None = None,
    series_description: str = "medpipe segmentation",
    series_number: int = 9901,
    content_datetime: datetime | None = None,
    missing_uids: Literal["refuse", "generate"] = "refuse",
) -> dict[str, Any]:
    """Write the label volume ``labels`` (a NIfTI path or a Volume) as a binary DICOM SEG referencing ``series``: the
    one series in a folder, or a series already found (one of a scan folder's, as ingest groups them). Label value v
    becomes segment n (1, 2, ... in increasing v; names from ``label_names``). ``missing_uids`` says what to do with
    a source whose Study/Series Instance UIDs are blank."""
    series = series if isinstance(series, DicomSeries) else find_series(Path(series))
    out = Path(out)
    odd = sorted({h.layout for h in series.headers} - {"single"})
    if odd:  # the folder as given when the series is the whole of it
        where = series.folder if series.folder != "." else Path(series.headers[0].path).parent
        raise StageError(f"{where}: a {', '.join(odd)} series; DICOM SEG export supports single-frame image series",
                         code="seg_source_unsupported")
    _, blobs = read_series_bytes(series)
    try:
        grid = decode_series(series, blobs, options=DicomOptions(gantry_tilt="refuse", irregular_slices="refuse"))
    except GeometryError as exc:
        raise GeometryError(f"{exc}. A SEG must lie on the source slices, and this series' slices do not form one "
                            "regular grid, so no label volume can be mapped onto them exactly",
                            code=exc.code) from None
    volume = load_nifti(labels) if isinstance(labels, str | Path) else labels
    what = Path(labels).name if isinstance(labels, str | Path) else "labels"
    _check_grid(volume, grid, what)
    array = integer_labels(np.asarray(volume.array), what=what)
    values = sorted(int(v) for v in np.unique(array) if v != 0)
    if not values:
        raise StageError(f"{what}: no foreground label; a DICOM SEG needs at least one segment", code="seg_empty")
    if len(values) > _MAX_SEGMENTS:
        raise StageError(f"{what}: {len(values)} label values; at most {_MAX_SEGMENTS} segments", code="seg_too_many")
    datasets, added = _source_datasets(blobs, series=series, missing_uids=missing_uids)
    order = slice_order(datasets, grid.affine, grid.spatial_shape[2])
    numbers = np.zeros(int(array.max()) + 1, dtype=np.uint8)
    numbers[values] = np.arange(1, len(values) + 1, dtype=np.uint8)
    frames = np.ascontiguousarray(np.transpose(numbers[array], (2, 1, 0)))  # (slice, row, column)
    digest = sha256_file(labels) if isinstance(labels, str | Path) else sha256_bytes(
        array.tobytes() + np.asarray(volume.affine).tobytes())
    entropy = [series.uid, digest, __version__]

    import highdicom as hd

    seg = hd.seg.Segmentation(
        source_images=[datasets[i] for i in order], pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(values, label_names),
        series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]), series_number=series_number,
        sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]), instance_number=1,
        manufacturer="medpipe", manufacturer_model_name="medpipe", software_versions=__version__,
        device_serial_number="0", series_description=series_description[:64], omit_empty_frames=True)
    _pin(seg, when=content_datetime or datetime.now(UTC),
         dimension_uid=generate_uid(entropy_srcs=[*entropy, "dimension organization"]))
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    log.info("wrote a DICOM SEG with %d segment(s) over %d slice(s)", len(values), len(order))
    if any("generated" in a for a in added):
        log.warning("the source series has blank Study/Series Instance UIDs; the SEG references generated ones")
    return {"out": out, "segments": {str(n): v for n, v in enumerate(values, start=1)},
            "frames": int(seg.NumberOfFrames), "slices": len(order), "source_repairs": added,
            "sop_instance_uid": str(seg.SOPInstanceUID), "series_instance_uid": str(seg.SeriesInstanceUID)}
