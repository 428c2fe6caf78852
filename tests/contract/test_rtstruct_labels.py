"""An RT structure set beside the series it outlines becomes that series' label once the ROIs to convert are listed:
contours filled on the series' slices (voxel centres inside, holes kept), values in the listed order."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.export.dicom_seg import export_dicom_seg
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series
from tests.fixtures.rtstruct_writer import square, write_structure_set

ANGLE = math.radians(20)
OBLIQUE = {"row_cosine": (math.cos(ANGLE), math.sin(ANGLE), 0.0), "col_cosine": (0.0, 0.0, -1.0)}


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, Path, Volume]:
    """An oblique series (files shuffled), one of its files, and the image ingest makes of it."""
    scan = tmp_path / "scan"
    written = write_series(scan / "CT", small_stored(1, (6, 5, 5)), shuffle_seed=3, **OBLIQUE)
    ingest(scan, tmp_path / "plain")
    (study,) = load_manifest(tmp_path / "plain").studies
    return scan, written.files[0], load_nifti(tmp_path / "plain" / str(study.image))


def _config(*rois: str):
    return load_config(None, overrides=[f"ingest.rtstruct_rois={list(rois)}"])


def test_listed_rois_become_the_label_in_their_order(series: tuple[Path, Path, Volume], tmp_path: Path) -> None:
    scan, first, image = series
    write_structure_set(scan / "RS.dcm", first, image, {
        "Outer": [square((0.5, 4.5), (0.5, 3.5), 1), square((1.5, 2.5), (1.5, 2.5), 1),  # a hole at (2, 2)
                  square((0.5, 4.5), (2.3, 2.3), 4)],  # flat: its points on a line outline nothing
        "Core": [square((2.5, 5.5), (1.5, 2.5), 1), square((2.5, 5.5), (1.5, 2.5), 3)],
        "Body": [square((-0.5, 5.5), (-0.5, 4.5), k) for k in range(5)],  # not listed: left out
    }, open_contours={"Core": 1})
    record = ingest(scan, tmp_path / "out", config=_config("outer", "co*", "Spleen"))
    manifest = load_manifest(tmp_path / "out")
    (study,) = manifest.studies  # the structure set is the series' label, not an entry of its own
    assert record["counts"] == {"ok": 1, "failed": 0, "skipped": 0} and study.label_source == "RS.dcm"
    assert manifest.labels == {"0": "background", "1": "outer", "2": "co*", "3": "Spleen"}
    expected = np.zeros(image.spatial_shape, np.uint8)
    expected[1:5, 1:4, 1] = 1
    expected[2, 2, 1] = 0
    expected[3:6, 2, 1] = 2  # voxels 3 and 4 of row 2 lie in Outer too: Core, listed later, takes them
    expected[3:6, 2, 3] = 2
    label = load_nifti(tmp_path / "out" / str(study.label))
    assert label.same_grid(image) and np.array_equal(label.array, expected)
    problems = {p.code: p.message for p in study.problems}
    assert [p.code for p in study.problems] == ["rtstruct_open_contour", "rtstruct_open_contour", "rtstruct_overlap",
                                                "rtstruct_roi_missing"]  # Outer's flat contour, Core's point
    assert problems["rtstruct_overlap"].startswith("RS.dcm: 2 voxels of 'co*' lie in ROIs listed before it")
    assert "no ROI matches 'Spleen' (its ROIs: Body, Core, Outer)" in problems["rtstruct_roi_missing"]
    assert ingest(scan, tmp_path / "out", config=_config("outer", "co*", "Spleen"), force=True)["reused_studies"] == 1
    ingest(scan, tmp_path / "out", config=_config("core"))  # other ROIs: the label is made again
    assert np.array_equal(load_nifti(tmp_path / "out" / str(study.label)).array, (expected == 2).astype(np.uint8))


def test_without_a_list_of_rois_the_structure_set_is_accounted_for(series: tuple[Path, Path, Volume],
                                                                  tmp_path: Path) -> None:
    scan, first, image = series
    write_structure_set(scan / "RS.dcm", first, image, {"Liver": [square((0.5, 2.5), (0.5, 2.5), 2)]})
    ingest(scan, tmp_path / "out")
    studies = {s.status: s for s in load_manifest(tmp_path / "out").studies}
    assert studies["ok"].label is None
    (problem,) = studies["skipped"].problems
    assert problem.code == "dicom_rtstruct" and problem.message == (
        "RS.dcm: an RT structure set; it outlines series CT (ROIs: Liver); to make it the series' label, list the "
        "ROIs to convert in ingest.rtstruct_rois (the n-th is value n)")


def test_rtstruct_label_pattern_chooses_among_the_structure_sets_of_a_series(series: tuple[Path, Path, Volume],
                                                                             tmp_path: Path) -> None:
    scan, first, image = series
    write_structure_set(scan / "plans/RS_a.dcm", first, image, {"Liver": [square((0.5, 2.5), (0.5, 2.5), 2)]},
                        label="Physician")
    write_structure_set(scan / "plans/RS_b.dcm", first, image, {"Liver": [square((2.5, 4.5), (1.5, 3.5), 3)]},
                        label="Dosimetrist")
    a, b = np.zeros(image.spatial_shape, np.uint8), np.zeros(image.spatial_shape, np.uint8)
    a[1:3, 1:3, 2] = 1
    b[3:5, 2:4, 3] = 1

    def run(out: str, *pattern: str) -> dict[str, object]:
        overrides = ["ingest.rtstruct_rois=[liver]", *(f"ingest.rtstruct_label_pattern={p}" for p in pattern)]
        ingest(scan, tmp_path / out, config=load_config(None, overrides=overrides))
        studies = load_manifest(tmp_path / out).studies  # a skipped structure set by its file, the series by name
        return {s.problems[0].message.partition(":")[0] if s.status == "skipped" else s.source: s for s in studies}

    for out, pattern, chosen, mask in (("label", "'physician*'", "plans/RS_a.dcm", a),
                                       ("name", "rs_b.dcm", "plans/RS_b.dcm", b)):
        studies = run(out, pattern)
        other = "plans/RS_b.dcm" if chosen.endswith("a.dcm") else "plans/RS_a.dcm"
        assert studies["CT"].label_source == chosen
        assert np.array_equal(load_nifti(tmp_path / out / str(studies["CT"].label)).array, mask)
        assert studies[other].status == "skipped" and studies[other].problems[0].message == (
            f"{other}: an RT structure set; a structure set of series CT that ingest.rtstruct_label_pattern does not "
            f"match; the one it matches, {chosen}, is the series' label")
    for out, pattern, matched in (("none", (), ""), ("both", ("'*'",), " (ingest.rtstruct_label_pattern matches 2)")):
        studies = run(out, *pattern)
        assert studies["CT"].label is None
        message = studies["plans/RS_a.dcm"].problems[0].message
        assert f"one of 2 structure sets of series CT; which one is its label is not known{matched}, so none" in message
        assert "set ingest.rtstruct_label_pattern to a glob" in message


def test_a_contour_between_slices_is_refused(series: tuple[Path, Path, Volume], tmp_path: Path) -> None:
    scan, first, image = series
    write_structure_set(scan / "RS.dcm", first, image, {"Liver": [square((0.5, 2.5), (0.5, 2.5), 1.5)]})
    ingest(scan, tmp_path / "out", config=_config("liver"))
    (study,) = load_manifest(tmp_path / "out").studies
    assert study.status == "failed" and study.error is not None and study.error.code == "rtstruct_off_grid"
    assert "0.50 voxels from the nearest slice" in study.error.message and "RS.dcm: ROI 'Liver'" in study.error.message


@pytest.mark.parametrize(("rois", "labels"), [(["liver"], {"0": "background", "1": "liver"}), (["spleen"], None)])
def test_seg_and_rtstruct_labels_of_one_folder_declare_names_only_when_they_agree(
        series: tuple[Path, Path, Volume], tmp_path: Path, rois: list[str], labels: dict[str, str] | None) -> None:
    scan, first, image = series
    write_structure_set(scan / "RS.dcm", first, image, {"Liver": [square((0.5, 2.5), (0.5, 2.5), 2)],
                                                        "Spleen": [square((2.5, 4.5), (0.5, 2.5), 2)]})
    write_series(scan / "MR", small_stored(2, (6, 5, 5)), series_tag="second")
    ingest(scan, tmp_path / "plain")
    (mr,) = [s for s in load_manifest(tmp_path / "plain").studies if s.source == "MR"]
    mr_image = load_nifti(tmp_path / "plain" / str(mr.image))
    export_dicom_seg(scan / "MR", mr_image.with_array((mr_image.array > mr_image.array.mean()).astype(np.uint8)),
                     scan / "MR.seg.dcm", label_names={"1": "liver"})
    ingest(scan, tmp_path / "out", config=_config(*rois))
    manifest = load_manifest(tmp_path / "out")
    assert sorted(str(s.label_source) for s in manifest.studies) == ["MR.seg.dcm", "RS.dcm"]
    assert manifest.labels == labels
    mixed = [s.id for s in manifest.studies if "label_kinds_mixed" in [p.code for p in s.problems]]
    assert len(mixed) == (2 if labels is None else 0)
