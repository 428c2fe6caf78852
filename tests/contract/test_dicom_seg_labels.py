"""A DICOM SEG beside the series it segments becomes that series' label, voxel for voxel on its grid; a SEG that
cannot be one is accounted for with the reason (another series', one of several, segments that overlap)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.config import load_config
from pipeline.errors import GeometryError
from pipeline.export.dicom_seg import export_dicom_seg
from pipeline.io.dicom_seg_label import seg_label
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Study, load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series

ANGLE = math.radians(20)
OBLIQUE = {"row_cosine": (math.cos(ANGLE), math.sin(ANGLE), 0.0), "col_cosine": (0.0, 0.0, -1.0)}


@pytest.fixture
def series_and_label(tmp_path: Path) -> tuple[Path, Volume]:
    """An oblique series (its files shuffled) and a label volume of two classes on its grid, on slices 1 and 3
    of its 5 (the SEG's frames cover only those)."""
    scan = tmp_path / "scan"
    write_series(scan / "SE1", small_stored(1, (6, 5, 5)), shuffle_seed=3, **OBLIQUE)
    ingest(scan, tmp_path / "plain")
    (study,) = load_manifest(tmp_path / "plain").studies
    image = load_nifti(tmp_path / "plain" / str(study.image))
    label = np.zeros(image.spatial_shape, np.uint8)
    label[1:4, 1:3, 1] = 1
    label[2:5, 2:4, 3] = 2  # slice 2 between them holds nothing: the SEG has no frame there
    return scan, image.with_array(label)


def test_a_seg_of_a_series_in_the_scan_is_its_label_voxel_for_voxel(series_and_label: tuple[Path, Volume],
                                                                    tmp_path: Path) -> None:
    scan, label = series_and_label
    export_dicom_seg(scan / "SE1", label, scan / "SEG" / "seg.dcm", label_names={"1": "core", "2": "rim"})
    record = ingest(scan, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    (study,) = manifest.studies  # the SEG is the series' label, not an entry of its own
    assert record["counts"] == {"ok": 1, "failed": 0, "skipped": 0}
    assert study.label_source == "SEG/seg.dcm" and manifest.labels == {"0": "background", "1": "core", "2": "rim"}
    assert [p.code for p in study.problems] == ["dicom_seg_from_medpipe"]  # export-seg wrote it: a prediction?
    ingested = load_nifti(tmp_path / "out" / str(study.label))
    assert ingested.same_grid(label) and np.array_equal(ingested.array, label.array)
    assert ingest(scan, tmp_path / "out", force=True)["reused_studies"] == 1
    export_dicom_seg(scan / "SE1", label.with_array((label.array == 2).astype(np.uint8)), scan / "SEG" / "seg.dcm",
                     label_names={"1": "rim"})  # the SEG changed: the study is converted again
    record = ingest(scan, tmp_path / "out")
    assert record["reused_studies"] == 0 and load_manifest(tmp_path / "out").labels == {"0": "background", "1": "rim"}
    assert np.array_equal(load_nifti(tmp_path / "out" / str(study.label)).array, label.array == 2)


def test_a_seg_that_cannot_be_the_label_is_accounted_for_with_the_reason(series_and_label: tuple[Path, Volume],
                                                                         tmp_path: Path) -> None:
    scan, label = series_and_label
    other = tmp_path / "other"
    write_series(other / "SE9", small_stored(2, (6, 5, 5)), series_tag="other", **OBLIQUE)
    export_dicom_seg(other / "SE9", label, scan / "of_another.dcm")  # the series it segments is elsewhere
    ingest(scan, tmp_path / "out")
    studies = {s.status: s for s in load_manifest(tmp_path / "out").studies}
    assert studies["ok"].label is None and "not an image series ingested from this scan folder" in (
        studies["skipped"].problems[0].message)
    assert studies["skipped"].problems[0].message.startswith("of_another.dcm: a DICOM SEG object")


def test_a_seg_in_another_frame_of_reference_is_not_the_label(series_and_label: tuple[Path, Volume],
                                                              tmp_path: Path) -> None:
    """Its voxels may still land on the series' grid, but its positions are in another coordinate system."""
    scan, label = series_and_label
    export_dicom_seg(scan / "SE1", label, scan / "seg.dcm")
    ds = pydicom.dcmread(scan / "seg.dcm")
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(scan / "seg.dcm")
    ingest(scan, tmp_path / "out")
    studies = {s.status: s for s in load_manifest(tmp_path / "out").studies}
    assert studies["ok"].label is None and studies["ok"].label_source is None
    (problem,) = studies["skipped"].problems
    assert problem.code == "dicom_segmentation" and "Frame of Reference UID differs from the series'" in (
        problem.message)


def _reader_seg(series: Path, label: Volume, path: Path, *, description: str = "") -> None:
    """A SEG of ``label`` on ``series`` as another tool would write it (not medpipe's)."""
    export_dicom_seg(series, label, path, label_names={"1": "core", "2": "rim"})
    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.SeriesDescription = "a reader's workstation", description
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # export-seg's UIDs follow its inputs: a reader's do not
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)


def test_a_prediction_written_back_beside_the_scan_does_not_hide_the_reference_seg(
        series_and_label: tuple[Path, Volume], tmp_path: Path) -> None:
    scan, label = series_and_label
    _reader_seg(scan / "SE1", label, scan / "reference.dcm")
    predicted = label.with_array((label.array > 0).astype(np.uint8))
    export_dicom_seg(scan / "SE1", predicted, scan / "SEG" / "prediction.dcm", label_names={"1": "core", "2": "rim"})
    ingest(scan, tmp_path / "out")
    studies = {s.status: s for s in load_manifest(tmp_path / "out").studies}
    assert studies["ok"].label_source == "reference.dcm" and studies["ok"].problems == []
    assert np.array_equal(load_nifti(tmp_path / "out" / str(studies["ok"].label)).array, label.array)
    assert "that medpipe export-seg wrote (a prediction); the series' other SEG, reference.dcm, is its label" in (
        studies["skipped"].problems[0].message)
    # two SEGs that are not medpipe's: which one is the label is not known again, so none is (nor the prediction)
    _reader_seg(scan / "SE1", label, scan / "second_reader.dcm")
    ingest(scan, tmp_path / "out2")
    manifest = load_manifest(tmp_path / "out2")
    assert [s.label for s in manifest.studies if s.status == "ok"] == [None]
    skipped = [s.problems[0].message for s in manifest.studies if s.status == "skipped"]
    assert len(skipped) == 3 and all("one of 3 segmentations of series SE1" in message for message in skipped)


def test_seg_label_pattern_chooses_the_label_among_several_segs(series_and_label: tuple[Path, Volume],
                                                                tmp_path: Path) -> None:
    """Two readers' SEGs and a prediction of one series: ``ingest.seg_label_pattern`` picks the label by the SEG's
    series description or file name; a pattern matching several leaves the series without one, and says so."""
    scan, label = series_and_label
    second = label.with_array((label.array > 0).astype(np.uint8))  # reader 2 drew one structure
    _reader_seg(scan / "SE1", label, scan / "a.dcm", description="Reader 1 adrenal")
    _reader_seg(scan / "SE1", second, scan / "b" / "b.dcm", description="Reader 2 adrenal")
    export_dicom_seg(scan / "SE1", label, scan / "prediction.dcm")

    def run(out: str, pattern: str) -> tuple[Study, list[str]]:
        ingest(scan, tmp_path / out, config=load_config(None, overrides=[f"ingest.seg_label_pattern={pattern}"]))
        studies = load_manifest(tmp_path / out).studies
        (ok,) = [s for s in studies if s.status == "ok"]
        return ok, sorted(s.problems[0].message for s in studies if s.status == "skipped")

    ok, skipped = run("by_description", "reader 2*")
    assert ok.label_source == "b/b.dcm" and len(skipped) == 2
    assert np.array_equal(load_nifti(tmp_path / "by_description" / str(ok.label)).array, second.array)
    assert all("that ingest.seg_label_pattern does not match; the one it matches, b/b.dcm, is the series' label"
               in message for message in skipped)
    ok, _ = run("by_description", "A.DCM")  # the file name, any case; the study is converted again
    assert ok.label_source == "a.dcm"
    assert np.array_equal(load_nifti(tmp_path / "by_description" / str(ok.label)).array, label.array)
    ok, skipped = run("several", "reader*")
    assert ok.label is None and len(skipped) == 3
    assert all("one of 3 segmentations of series SE1; which one is its label is not known (ingest.seg_label_pattern "
               "matches 2 of them), so none is used" in message for message in skipped)


def test_a_seg_off_the_series_grid_is_refused(series_and_label: tuple[Path, Volume]) -> None:
    scan, label = series_and_label
    label = label.with_array((label.array == 1).astype(np.uint8))  # one slice deep: placed by its position alone
    export_dicom_seg(scan / "SE1", label, scan / "seg.dcm")
    assert np.array_equal(seg_label(str(scan / "seg.dcm"), label, rel="seg.dcm"), label.array)
    shifted = Volume(np.zeros(label.spatial_shape, np.int16), label.affine @ np.diag([0.5, 1.0, 1.0, 1.0]))
    with pytest.raises(GeometryError, match="do not lie on the series' voxels") as caught:
        seg_label(str(scan / "seg.dcm"), shifted, rel="seg.dcm")
    assert caught.value.code == "dicom_seg_grid"
    moved = Volume(np.zeros(label.spatial_shape, np.int16), label.affine @ _translation(0, 0, 3))
    with pytest.raises(GeometryError, match="reaches beyond the series"):
        seg_label(str(scan / "seg.dcm"), moved, rel="seg.dcm")


def _translation(*voxels: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = voxels
    return matrix


def test_segs_that_number_the_same_names_differently_give_one_value_per_name(series_and_label: tuple[Path, Volume],
                                                                             tmp_path: Path) -> None:
    """A SEG numbers only the segments it holds: a study without the core has the rim as segment 1. Values follow
    the names of the SEG that names every structure, so one value means one structure in every study."""
    scan, label = series_and_label
    write_series(scan / "SE2", small_stored(2, (6, 5, 5)), series_tag="second", **OBLIQUE)
    write_series(scan / "SE3", small_stored(3, (6, 5, 5)), series_tag="third", **OBLIQUE)
    rim_only = label.with_array(np.where(label.array == 2, 2, 0).astype(np.uint8))
    export_dicom_seg(scan / "SE1", label, scan / "SE1.seg.dcm", label_names={"1": "core", "2": "rim"})
    export_dicom_seg(scan / "SE2", label, scan / "SE2.seg.dcm", label_names={"1": "Rim", "2": "core"})
    export_dicom_seg(scan / "SE3", rim_only, scan / "SE3.seg.dcm", label_names={"2": "rim"})  # segment 1: rim
    ingest(scan, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.labels == {"0": "background", "1": "core", "2": "rim"}
    studies = {s.label_source: s for s in manifest.studies}
    arrays = {name: load_nifti(tmp_path / "out" / str(s.label)).array for name, s in studies.items()}
    assert np.array_equal(arrays["SE1.seg.dcm"], label.array)
    assert np.array_equal(arrays["SE2.seg.dcm"], np.choose(label.array, [0, 2, 1]))  # its "Rim" was 1
    assert np.array_equal(arrays["SE3.seg.dcm"], rim_only.array)
    assert [p.code for p in studies["SE1.seg.dcm"].problems] == ["dicom_seg_from_medpipe"]
    for name, shown in (("SE2.seg.dcm", "Rim 1 -> 2, core 2 -> 1"), ("SE3.seg.dcm", "rim 1 -> 2")):
        assert [p.code for p in studies[name].problems] == ["dicom_seg_from_medpipe", "dicom_seg_renumbered"]
        assert studies[name].problems[1].message.endswith(f"the label's values follow the segment names: {shown}")
    assert ingest(scan, tmp_path / "out", force=True)["reused_studies"] == 3  # reused, renumbering included
    (scan / "SE1.seg.dcm").unlink()  # SE2's numbering is the reference now: every label changes
    record = ingest(scan, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.labels == {"0": "background", "1": "Rim", "2": "core"} and record["reused_studies"] == 0
    studies = {s.label_source: s for s in manifest.studies}
    assert np.array_equal(load_nifti(tmp_path / "out" / str(studies["SE3.seg.dcm"].label)).array, rim_only.array > 0)
    assert [p.code for p in studies["SE3.seg.dcm"].problems] == ["dicom_seg_from_medpipe"]


def test_segs_that_name_their_segments_differently_declare_no_label_names(series_and_label: tuple[Path, Volume],
                                                                           tmp_path: Path) -> None:
    scan, label = series_and_label
    write_series(scan / "SE2", small_stored(2, (6, 5, 5)), series_tag="second", **OBLIQUE)
    export_dicom_seg(scan / "SE1", label, scan / "SE1.seg.dcm", label_names={"1": "core", "2": "rim"})
    export_dicom_seg(scan / "SE2", label, scan / "SE2.seg.dcm", label_names={"1": "kern", "2": "rand"})
    ingest(scan, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.labels is None and [s.label_source for s in manifest.studies] == ["SE1.seg.dcm", "SE2.seg.dcm"]
    assert [[p.code for p in s.problems] for s in manifest.studies] == [
        ["dicom_seg_from_medpipe", "dicom_seg_names_differ"]] * 2
    assert "this one: 1 kern, 2 rand" in manifest.studies[1].problems[1].message
    assert np.array_equal(load_nifti(tmp_path / "out" / str(manifest.studies[1].label)).array, label.array)
