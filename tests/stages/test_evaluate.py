"""The evaluate stage end to end on phantom pairs with known Dice; pairing, grid mismatch, determinism."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.fileio import read_json, write_json_atomic
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Study, save_manifest
from pipeline.stages.evaluate import evaluate

SHAPE = (20, 18, 16)
SPACING = (0.8, 1.0, 1.5)
AFFINE = np.diag([*SPACING, 1.0])
LABELS = {"0": "background", "1": "core", "2": "shell"}


def labelled(*boxes: tuple[int, tuple[int, int, int], tuple[int, int, int]], affine: np.ndarray = AFFINE,
             shape: tuple[int, int, int] = SHAPE) -> Volume:
    arr = np.zeros(shape, dtype=np.uint8)
    for value, lo, hi in boxes:
        arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return Volume(arr, affine)


CORE_REF = (1, (2, 2, 2), (8, 8, 8))  # 216 voxels
CORE_SHIFT = (1, (4, 2, 2), (10, 8, 8))  # 216 voxels, overlap 4*6*6 = 144 -> dice 2/3
SHELL = (2, (10, 10, 10), (14, 15, 13))  # 4*5*3 = 60 voxels


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    """An ingest folder with 4 labelled studies and a plain prediction folder covering 3 of them (+1 stray)."""
    ingest, preds = tmp_path / "01_ingest", tmp_path / "preds"
    refs = {"case_a": labelled(CORE_REF, SHELL), "case_b": labelled(CORE_REF, SHELL),
            "case_c": labelled(CORE_REF), "case_d": labelled(CORE_REF)}
    predictions = {
        "case_a": labelled(CORE_SHIFT, SHELL),  # core 2/3, shell 1
        "case_b": labelled(CORE_REF),  # core 1, shell missed (dice 0, hd NaN)
        "case_c": labelled(CORE_REF, affine=np.diag([1.0, 1.0, 1.0, 1.0])),  # other grid -> fails alone
        "stray": labelled(CORE_REF),
    }
    studies = []
    for sid, vol in refs.items():
        save_nifti(vol, ingest / "labels" / f"{sid}.nii.gz")
        studies.append(Study(id=sid, source=f"{sid}.nii.gz", format="nifti", status="ok",
                             image=f"images/{sid}.nii.gz", label=f"labels/{sid}.nii.gz"))
    save_manifest(Manifest(dataset="phantoms", labels=LABELS, studies=studies), ingest)
    for sid, vol in predictions.items():
        save_nifti(vol, preds / f"{sid}.nii.gz")
    return preds, ingest


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_known_dice_pairs_unpaired_and_grid_failure(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    preds, ingest = cohort
    out = tmp_path / "05_evaluate"
    record = evaluate(preds, ingest, out)
    assert record["status"] == "partial"
    rows = read_rows(out / "per_study.csv")
    assert list(rows[0]) == ["study", "class", "class_name", "dice", "iou", "hd95", "volume_ref_ml", "volume_pred_ml"]
    assert [(r["study"], r["class"]) for r in rows] == [("case_a", "1"), ("case_a", "2"), ("case_b", "1"),
                                                         ("case_b", "2")]
    a_core, a_shell, b_core, b_shell = rows
    assert a_core["dice"] == "0.666667" and a_core["iou"] == f"{144 / 288:.6f}"
    assert a_core["hd95"] == "1.600000"  # 2 voxels along x at 0.8 mm
    assert a_core["volume_ref_ml"] == f"{216 * 0.8 * 1.5 / 1000:.6f}" and a_core["class_name"] == "core"
    assert (a_shell["dice"], a_shell["hd95"]) == ("1.000000", "0.000000")
    assert b_core["dice"] == "1.000000"
    assert (b_shell["dice"], b_shell["hd95"], b_shell["volume_pred_ml"]) == ("0.000000", "", "0.000000")

    summary = read_json(out / "summary.json")
    assert summary["studies"] == ["case_a", "case_b"]
    assert summary["unpaired"] == {"predictions_without_reference": ["stray"],
                                   "references_without_prediction": ["case_d"]}
    assert [f["id"] for f in summary["failed"]] == ["case_c"]
    assert summary["failed"][0]["code"] == "grid_mismatch" and "grid" in summary["failed"][0]["message"]
    core = summary["classes"]["1"]
    assert core["name"] == "core" and core["n"] == 2
    assert core["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    assert core["dice"]["min"] == pytest.approx(2 / 3, abs=1e-6) and core["dice"]["max"] == 1.0
    shell = summary["classes"]["2"]
    assert shell["dice"]["mean"] == 0.5 and shell["dice"]["std"] == 0.5
    assert shell["hd95"]["n"] == 1 and shell["hd95"]["n_nan"] == 1
    assert shell["empty"] == {"both": 0, "ref_empty": 0, "pred_empty": 1}
    status = {s["id"]: s["status"] for s in record["studies"]}
    assert status == {"case_a": "ok", "case_b": "ok", "case_c": "failed"}


def test_outputs_are_byte_identical_on_rerun(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    preds, ingest = cohort
    out = tmp_path / "eval"
    evaluate(preds, ingest, out)
    first = [(out / n).read_bytes() for n in ("per_study.csv", "summary.json")]
    evaluate(preds, ingest, out, force=True)
    assert [(out / n).read_bytes() for n in ("per_study.csv", "summary.json")] == first


def test_plain_folders_use_union_of_present_classes(tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    save_nifti(labelled(CORE_REF, (3, (10, 10, 10), (12, 12, 12))), ref / "x.nii.gz")
    save_nifti(labelled(CORE_REF), pred / "x.nii")
    save_nifti(labelled(CORE_REF), ref / "y.nii.gz")
    save_nifti(labelled(CORE_SHIFT), pred / "y.nii.gz")
    evaluate(pred, ref, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "per_study.csv")
    assert [(r["study"], r["class"], r["class_name"]) for r in rows] == [
        ("x", "1", "class_1"), ("x", "3", "class_3"), ("y", "1", "class_1"), ("y", "3", "class_3")]
    assert rows[1]["dice"] == "0.000000" and rows[1]["hd95"] == ""  # x: class 3 missed
    assert rows[3]["dice"] == "1.000000" and rows[3]["hd95"] == "0.000000"  # y: class 3 in neither


def test_infer_folder_pairs_by_id_and_uses_model_labels(tmp_path: Path) -> None:
    infer_dir, ref = tmp_path / "04_infer", tmp_path / "ref"
    save_nifti(labelled(CORE_SHIFT), infer_dir / "predictions" / "case_z.nii.gz")
    write_json_atomic(infer_dir / "predictions.json", {
        "schema_version": 1, "model": {"labels": {"0": "background", "1": "tumour"}},
        "predictions": [{"id": "case_z", "image": "images/case_z.nii.gz",
                         "prediction": "predictions/case_z.nii.gz"}], "failed": []})
    save_nifti(labelled(CORE_REF), ref / "case_z.nii.gz")
    evaluate(infer_dir, ref, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "per_study.csv")
    assert [(r["study"], r["class_name"], r["dice"]) for r in rows] == [("case_z", "tumour", "0.666667")]
    summary = read_json(tmp_path / "out" / "summary.json")
    assert math.isclose(summary["classes"]["1"]["hd95"]["mean"], 1.6)
