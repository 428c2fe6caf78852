"""DICOM SEG export on real series: references the source, lies on its slices, reads back with highdicom to the same
masks; refusals for other grids, empty labels, several series and blank UIDs; the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.errors import GeometryError, StageError
from pipeline.export.dicom_seg import export_dicom_seg, find_series
from pipeline.fileio import write_json_atomic
from pipeline.io.dicom import decode_series, read_series_bytes
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from tests.shared_data import shared_data

WHEN = datetime(2024, 5, 17, 12, 30, 0, tzinfo=UTC)
NAMES = {"1": "bright", "2": "middle"}


def series_volume(folder: Path) -> Volume:
    series = find_series(folder)
    return decode_series(series, read_series_bytes(series)[1])


def thresholded(image: Volume) -> Volume:
    """A two-class 'prediction' on the image's grid: the brightest 10 % -> 1, the next 20 % -> 2."""
    hi, mid = np.percentile(image.array, [90, 70])
    labels = np.zeros(image.spatial_shape, np.uint8)
    labels[image.array > mid] = 2
    labels[image.array > hi] = 1
    return image.with_array(labels)


def source_datasets(folder: Path) -> dict[str, pydicom.Dataset]:
    """Source images by SOP Instance UID (taken from the file meta where the data set's copy is blank)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID] = ds
    return out


def check_round_trip(seg_path: Path, folder: Path, labels: Volume, *, source_series_uid: str | None) -> None:
    """The SEG read back with highdicom: references, frame positions on source slices, and the same masks."""
    seg = hd.seg.segread(seg_path)
    sources = source_datasets(folder)
    first = next(iter(sources.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)
    if source_series_uid is not None:
        assert referenced.SeriesInstanceUID == source_series_uid and seg.StudyInstanceUID == first.StudyInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bright", "middle"]
    # every frame lies on the source slice it references
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [float(v) for v in first.ImageOrientationPatient],
                               atol=1e-6)
    # the masks: slice k of the label volume is the source image at grid position k
    inverse = np.linalg.inv(labels.affine)
    by_slice = {}
    for uid, ds in sources.items():
        ras = np.diag([-1.0, -1.0, 1.0]) @ np.array([float(v) for v in ds.ImagePositionPatient])
        by_slice[int(round((inverse @ np.append(ras, 1.0))[2]))] = uid
    uids = [by_slice[k] for k in range(labels.spatial_shape[2])]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                              assert_missing_frames_are_empty=True)
    back = masks[..., 0].astype(np.uint8) * 1 + masks[..., 1].astype(np.uint8) * 2  # (slice, row, column)
    np.testing.assert_array_equal(np.transpose(back, (2, 1, 0)), labels.array)
    assert masks[..., 0].sum() > 0 and masks[..., 1].sum() > 0 and not (masks[..., 0] & masks[..., 1]).any()


@pytest.mark.parametrize("study", ["Study1", "Study2", "Study3"])
def test_hippocampus_series_round_trip(study: str, tmp_path: Path) -> None:
    (folder,) = sorted(p for p in shared_data("hippocampus_dicom", study).iterdir() if p.is_dir())
    labels = thresholded(series_volume(folder))
    save_nifti(labels, tmp_path / "pred.nii.gz", dtype=np.uint8)
    result = export_dicom_seg(folder, tmp_path / "pred.nii.gz", tmp_path / "seg.dcm", label_names=NAMES,
                              content_datetime=WHEN)
    assert result["segments"] == {"1": 1, "2": 2} and result["slices"] == labels.spatial_shape[2]
    uid = next(iter(source_datasets(folder).values())).SeriesInstanceUID
    check_round_trip(tmp_path / "seg.dcm", folder, labels, source_series_uid=uid)


def test_ct_with_blank_uids_is_refused_by_default_and_round_trips_with_generated_ones(tmp_path: Path) -> None:
    folder = shared_data("dicom_qa", "totalsegmentator_ct", "example_ct_dicom")
    image = series_volume(folder)
    assert image.spatial_shape == (512, 512, 20)
    labels = thresholded(image)
    save_nifti(labels, tmp_path / "pred.nii.gz", dtype=np.uint8)
    with pytest.raises(StageError, match="no StudyInstanceUID") as info:
        export_dicom_seg(folder, tmp_path / "pred.nii.gz", tmp_path / "refused.dcm", label_names=NAMES)
    assert info.value.code == "seg_source_uid_missing" and not (tmp_path / "refused.dcm").exists()
    result = export_dicom_seg(folder, tmp_path / "pred.nii.gz", tmp_path / "seg.dcm", label_names=NAMES,
                              content_datetime=WHEN, missing_uids="generate")
    assert "StudyInstanceUID (generated)" in result["source_repairs"]
    assert "SOPInstanceUID (from MediaStorageSOPInstanceUID)" in result["source_repairs"]
    check_round_trip(tmp_path / "seg.dcm", folder, labels, source_series_uid=None)


def test_prediction_on_the_ingested_image_exports_and_output_is_deterministic(tmp_path: Path) -> None:
    """The real workflow: ingest the series, predict on the ingested image's grid, export."""
    from pipeline.manifest import load_manifest
    from pipeline.stages.ingest import ingest

    folder = shared_data("hippocampus_dicom", "Study2")
    ingest(folder, tmp_path / "ingest")
    (study,) = load_manifest(tmp_path / "ingest").studies
    labels = thresholded(load_nifti(tmp_path / "ingest" / study.image))
    save_nifti(labels, tmp_path / "pred.nii.gz", dtype=np.uint8)
    (series_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    first = export_dicom_seg(series_dir, tmp_path / "pred.nii.gz", tmp_path / "a.dcm", label_names=NAMES,
                             content_datetime=WHEN)
    second = export_dicom_seg(series_dir, tmp_path / "pred.nii.gz", tmp_path / "b.dcm", label_names=NAMES,
                              content_datetime=WHEN)
    assert first["sop_instance_uid"] == second["sop_instance_uid"]
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    check_round_trip(tmp_path / "a.dcm", series_dir, labels, source_series_uid=None)


def test_labels_off_the_series_grid_empty_labels_and_several_series_are_refused(tmp_path: Path) -> None:
    root = shared_data("hippocampus_dicom")
    (folder,) = sorted(p for p in (root / "Study1").iterdir() if p.is_dir())
    labels = thresholded(series_volume(folder))
    shifted = labels.affine.copy()
    shifted[:3, 3] += labels.affine[:3, 2]  # one slice further along
    flipped = labels.affine @ np.diag([-1.0, 1, 1, 1])  # the same voxels in another order: still not the grid
    flipped[:3, 3] = labels.affine[:3, 3] + labels.affine[:3, 0] * (labels.spatial_shape[0] - 1)
    for name, volume in (("shifted", Volume(labels.array, shifted)),
                         ("flipped", Volume(labels.array[::-1].copy(), flipped))):
        save_nifti(volume, tmp_path / f"{name}.nii.gz", dtype=np.uint8)
        with pytest.raises(GeometryError, match="is not the series' grid") as info:
            export_dicom_seg(folder, tmp_path / f"{name}.nii.gz", tmp_path / "x.dcm")
        assert info.value.code == "seg_grid"
    save_nifti(labels.with_array(np.zeros(labels.spatial_shape, np.uint8)), tmp_path / "empty.nii.gz")
    with pytest.raises(StageError, match="no foreground") as info:
        export_dicom_seg(folder, tmp_path / "empty.nii.gz", tmp_path / "x.dcm")
    assert info.value.code == "seg_empty"
    with pytest.raises(StageError, match="found 3 image series") as info:
        export_dicom_seg(root, tmp_path / "empty.nii.gz", tmp_path / "x.dcm")
    assert info.value.code == "seg_many_series" and not (tmp_path / "x.dcm").exists()


def test_cli_export_seg_with_label_names_from_a_model_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder,) = sorted(p for p in shared_data("hippocampus_dicom", "Study3").iterdir() if p.is_dir())
    labels = thresholded(series_volume(folder))
    save_nifti(labels, tmp_path / "pred.nii.gz", dtype=np.uint8)
    write_json_atomic(tmp_path / "model.json", {"labels": {"0": "background", **NAMES}})
    out = tmp_path / "out" / "seg.dcm"
    code = main(["export-seg", "--dicom", str(folder), "--labels", str(tmp_path / "pred.nii.gz"), "--out", str(out),
                 "--label-names", str(tmp_path / "model.json")])
    assert code == 0 and out.is_file()
    assert "segments 1 <- label 1, 2 <- label 2" in capsys.readouterr().out
    assert [s.SegmentLabel for s in hd.seg.segread(out).SegmentSequence] == ["bright", "middle"]
    assert main(["export-seg", "--dicom", str(folder), "--labels", str(tmp_path / "missing.nii.gz"), "--out",
                 str(tmp_path / "y.dcm")]) != 0
