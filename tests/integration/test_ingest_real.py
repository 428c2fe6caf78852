"""Ingest on real data: the hippocampus DICOM series and the Task04 MSD dataset from ../shared/data."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from pipeline.io.nifti import load_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.shared_data import shared_data


def _headers_by_folder(root: Path) -> dict[str, list[pydicom.Dataset]]:
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(root.rglob("*.dcm")):
        series[path.parent.relative_to(root).as_posix()].append(pydicom.dcmread(str(path), stop_before_pixels=True))
    return series


def test_hippocampus_dicom_matches_its_headers(tmp_path: Path) -> None:
    root = shared_data("hippocampus_dicom")
    record = ingest(root, tmp_path / "out")
    assert record["status"] == "complete" and record["counts"]["ok"] == 3
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    headers = _headers_by_folder(root)
    assert set(studies) == set(headers)
    for folder, datasets in headers.items():
        study = studies[folder]
        first = datasets[0]
        iop = np.array(first.ImageOrientationPatient, float)
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        along = sorted(float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in datasets)
        step = (along[-1] - along[0]) / (len(along) - 1)
        assert study.status == "ok" and study.modality == str(first.Modality)
        assert study.shape == [int(first.Columns), int(first.Rows), len(datasets)]
        spacing = [float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), step]
        assert np.allclose(study.spacing, spacing, atol=1e-4)
        # axis codes from the IOP: each voxel axis points along an LPS direction, flipped to RAS
        ras_axes = [np.diag([-1, -1, 1]) @ v for v in (row, col, normal)]
        codes = "".join("RAS"[int(np.argmax(np.abs(v)))] if v[int(np.argmax(np.abs(v)))] > 0 else
                        "LPI"[int(np.argmax(np.abs(v)))] for v in ras_axes)
        assert study.orientation == codes
        volume = load_nifti(tmp_path / "out" / study.image)
        lowest = min(datasets, key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
        ipp = np.array(lowest.ImagePositionPatient, float)
        np.testing.assert_allclose(volume.affine[:3, 3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-4)
        slope = float(getattr(lowest, "RescaleSlope", 1) or 1)
        intercept = float(getattr(lowest, "RescaleIntercept", 0) or 0)
        pixels = pydicom.dcmread(lowest.filename).pixel_array.astype(np.float64) * slope + intercept
        np.testing.assert_array_equal(volume.array[:, :, 0], pixels.T.astype(np.float32))


def test_task04_hippocampus_all_studies_with_labels(tmp_path: Path) -> None:
    root = shared_data("Task04_Hippocampus")
    record = ingest(root, tmp_path / "out")
    assert record["status"] == "complete"
    assert record["counts"] == {"ok": 210, "failed": 0, "skipped": 0}
    manifest = load_manifest(tmp_path / "out")
    assert manifest.labels == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert all(s.label is not None and s.status == "ok" for s in manifest.studies)
    sample = manifest.studies[0]
    source = nib.load(str(root / sample.source))
    assert sample.shape == list(source.shape)
    assert sample.orientation == "".join(nib.aff2axcodes(source.affine))
    np.testing.assert_allclose(sample.affine, source.affine, atol=1e-5)
