"""``medpipe export-seg --scan SCAN --predictions PRED --out OUT``: every prediction of an infer folder as a DICOM
SEG on the series it came from, found again by ingest's ids; read back by ingest as the series' labels."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.export.dicom_seg_batch import export_predictions_as_seg
from pipeline.fileio import read_json, write_json_atomic
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series


@pytest.fixture
def predicted(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A scan of three series (one named after a patient), ingested, and an infer-like folder predicting two of
    them on their grids, one off its grid, and one study that is not in the scan."""
    scan = tmp_path / "scan"
    for index, folder in enumerate(("Doe^Jane/SE1", "b/SE2", "c/SE3")):
        write_series(scan / folder, small_stored(index, (6, 5, 4)), series_tag=f"s{index}", shuffle_seed=index)
    ingest(scan, tmp_path / "ingest")
    pred = tmp_path / "infer"
    entries, truth = [], {}
    for study in load_manifest(tmp_path / "ingest").studies:
        image = load_nifti(tmp_path / "ingest" / str(study.image))
        label = np.zeros(image.spatial_shape, np.uint8)
        label[1:4, 1:3, 1:3] = 1
        label[4:, 3:, 2:] = 2
        grid = image
        if study.source == "c/SE3":  # a prediction on another grid: refused by name, the others go on
            grid = type(image)(image.array, image.affine @ np.diag([2.0, 1.0, 1.0, 1.0]))
        save_nifti(grid.with_array(label), pred / "predictions" / f"{study.id}.nii.gz")
        entries.append({"id": study.id, "prediction": f"predictions/{study.id}.nii.gz"})
        truth[study.id] = label
    save_nifti(grid.with_array(label), pred / "predictions" / "case_elsewhere.nii.gz")
    entries.append({"id": "case_elsewhere", "prediction": "predictions/case_elsewhere.nii.gz"})
    write_json_atomic(pred / "predictions.json", {"schema_version": 1, "predictions": entries, "failed": [],
                                                  "model": {"labels": {"0": "background", "1": "core", "2": "rim"}}})
    return scan, pred, truth


def test_each_prediction_becomes_a_seg_on_its_series_and_reads_back_as_its_label(predicted, tmp_path: Path) -> None:
    scan, pred, truth = predicted
    out = tmp_path / "segs"
    assert main(["export-seg", "--scan", str(scan), "--predictions", str(pred), "--out", str(out)]) == 3
    summary = read_json(out / "export.json")
    sources = sorted(e["source"] for e in summary["exported"])
    assert sources[0] == "b/SE2" and re.fullmatch(r"phi-[0-9a-f]{8}/SE1", sources[1])  # scrubbed as ingest does
    assert summary["not_in_scan"] == ["case_elsewhere"]
    (failed,) = summary["failed"]
    assert failed["code"] == "seg_grid" and failed["message"].startswith(f"{failed['id']}.nii.gz: the labels' grid")
    assert "spacing [1.2, 0.8, 2.0] mm" in failed["message"]  # what differs is shown (0.6 in the series)
    assert "Doe" not in (out / "export.json").read_text()  # sources scrubbed as ingest scrubs them
    # the SEGs, put beside their series, are ingested as those series' labels, voxel for voxel
    exported = {e["id"]: e for e in summary["exported"]}
    for entry in exported.values():
        shutil.copy(out / entry["seg"], scan / f"{entry['id']}.dcm")
    ingest(scan, tmp_path / "again")
    manifest = load_manifest(tmp_path / "again")
    assert manifest.labels == {"0": "background", "1": "core", "2": "rim"}
    for study in manifest.studies:
        if study.id in exported:
            label = load_nifti(tmp_path / "again" / str(study.label))
            assert np.array_equal(label.array, truth[study.id]), study.source
        else:
            assert study.label is None


def test_another_pseudonym_key_matches_no_series_and_says_so(predicted, tmp_path: Path) -> None:
    scan, pred, _ = predicted
    config = load_config(None, overrides=["ingest.pseudonym_key=not-the-one-ingest-used"])
    with pytest.raises(StageError, match="is ingest.pseudonym_key the one ingest used") as caught:
        export_predictions_as_seg(scan, pred, tmp_path / "segs", config=config)
    assert caught.value.code == "seg_no_match"
