"""The evaluate stage end to end on phantom pairs with known Dice; pairing, grid mismatch, determinism."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.fileio import read_json, write_json_atomic
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Study, save_manifest
from pipeline.metrics.segmentation import class_metrics
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
    config = load_config(None, overrides=["evaluate.nsd_tolerance_mm={core: 1.0, default: 3.0}",
                                          "evaluate.bootstrap=500", "evaluate.worst_cases=1"])
    record = evaluate(preds, ingest, out, config=config)
    assert record["status"] == "partial"
    rows = read_rows(out / "per_study.csv")
    assert list(rows[0]) == ["study", "class", "dice", "iou", "hd95", "assd", "nsd", "volume_ref_ml", "volume_pred_ml",
                             "class_name", "rel_volume_error", "nsd_tolerance_mm"]
    assert [(r["study"], r["class"]) for r in rows] == [("case_a", "1"), ("case_a", "2"), ("case_b", "1"),
                                                         ("case_b", "2")]
    a_core, a_shell, b_core, b_shell = rows
    assert a_core["dice"] == "0.666667" and a_core["iou"] == f"{144 / 288:.6f}"
    assert a_core["hd95"] == "1.600000"  # 2 voxels along x at 0.8 mm
    assert a_core["volume_ref_ml"] == f"{216 * 0.8 * 1.5 / 1000:.6f}" and a_core["class_name"] == "core"
    expected = class_metrics(labelled(CORE_SHIFT).array == 1, labelled(CORE_REF).array == 1, label=1,
                             spacing=SPACING, nsd_tolerance_mm=1.0)
    assert (a_core["assd"], a_core["nsd"]) == (f"{expected.assd:.6f}", f"{expected.nsd:.6f}")
    assert 0 < expected.nsd < 1 and a_core["nsd_tolerance_mm"] == "1.000000"
    assert a_core["rel_volume_error"] == "0.000000"
    assert (a_shell["dice"], a_shell["hd95"]) == ("1.000000", "0.000000")
    assert b_core["dice"] == "1.000000"
    assert (b_shell["dice"], b_shell["hd95"], b_shell["volume_pred_ml"]) == ("0.000000", "", "0.000000")
    assert (b_shell["assd"], b_shell["nsd"], b_shell["rel_volume_error"]) == ("", "0.000000", "-1.000000")
    assert b_shell["nsd_tolerance_mm"] == "3.000000"  # by class name

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
    assert shell["assd"]["n_nan"] == 1 and shell["nsd"]["mean"] == 0.5
    assert core["dice"]["ci_low"] == pytest.approx(2 / 3, abs=1e-6) and core["dice"]["ci_high"] == 1.0
    assert core["dice"]["iqr"] == pytest.approx((1 - 2 / 3) / 2, abs=1e-6)
    assert [w["study"] for w in core["worst"]] == ["case_a"] and [w["study"] for w in shell["worst"]] == ["case_b"]
    assert summary["worst_studies"] == [{"study": "case_b", "mean_dice": 0.5}]
    assert summary["task"] == "segmentation" and summary["schema_version"] == 2
    definitions = summary["definitions"]
    assert definitions["nsd_tolerance_mm"] == {"1": 1.0, "2": 3.0} and "both empty" in definitions["empty_policy"]
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


def test_plain_folders_never_pair_one_of_two_files_sharing_a_name(tmp_path: Path) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    save_nifti(labelled(CORE_REF), ref / "site1" / "x.nii.gz")
    save_nifti(labelled(CORE_SHIFT), ref / "site2" / "x.nii.gz")  # which one is x's reference: unknowable
    save_nifti(labelled(CORE_REF), ref / "y.nii.gz")
    save_nifti(labelled(CORE_REF), pred / "x.nii.gz")
    save_nifti(labelled(CORE_REF), pred / "y.nii.gz")
    record = evaluate(pred, ref, tmp_path / "out")
    assert record["status"] == "partial"
    assert {r["study"] for r in read_rows(tmp_path / "out" / "per_study.csv")} == {"y"}
    summary = read_json(tmp_path / "out" / "summary.json")
    assert sorted((f["id"], f["code"]) for f in summary["failed"]) == [
        ("site1/x.nii.gz", "duplicate_name"), ("site2/x.nii.gz", "duplicate_name")]
    assert all(f["message"].startswith("reference: ") for f in summary["failed"])
    assert summary["unpaired"]["predictions_without_reference"] == ["x"]


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


def test_folders_that_pair_nothing_are_refused_not_evaluated_as_empty(cohort: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """A mistyped folder used to give a 'complete' evaluation of no study, with exit status 0."""
    preds, ingest = cohort
    save_nifti(labelled(CORE_REF), tmp_path / "other" / "elsewhere.nii.gz")
    with pytest.raises(StageError, match=r"predictions are named like case_a, case_b, references like elsewhere"):
        evaluate(preds, tmp_path / "other", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no predictions found"):
        evaluate(tmp_path / "empty", ingest, tmp_path / "out")
    unlabelled = tmp_path / "unlabelled"
    save_manifest(Manifest(studies=[Study(id="case_a", source="a.nii.gz", format="nifti", status="ok",
                                          image="images/case_a.nii.gz")]), unlabelled)
    with pytest.raises(StageError, match="its studies carry no labels") as caught:
        evaluate(preds, unlabelled, tmp_path / "out")
    assert caught.value.code == "no_pairs" and not (tmp_path / "out" / "summary.json").exists()
    failed = tmp_path / "04_infer"
    write_json_atomic(failed / "predictions.json", {"schema_version": 1, "model": {}, "predictions": [],
                                                     "failed": [{"id": "case_a", "code": "x", "message": "x"}]})
    with pytest.raises(StageError, match=r"every prediction failed \(1;"):
        evaluate(failed, ingest, tmp_path / "out")
    assert main(["evaluate", "--pred", str(preds), "--ref", str(tmp_path / "other"), "--out",
                 str(tmp_path / "out")]) == 1


def test_missing_nsd_tolerance_for_a_class_fails_before_any_work(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    preds, ingest = cohort
    config = load_config(None, overrides=["evaluate.nsd_tolerance_mm={core: 1.0}"])
    with pytest.raises(StageError, match=r"no tolerance for class 2 \(shell\)"):
        evaluate(preds, ingest, tmp_path / "out", config=config)
    assert not (tmp_path / "out" / "per_study.csv").exists()


def test_cli_evaluate_on_plain_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_nifti(labelled(CORE_REF, SHELL), tmp_path / "ref" / "p1.nii.gz")
    save_nifti(labelled(CORE_SHIFT, SHELL), tmp_path / "pred" / "p1.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(out)]) == 0
    header = (out / "per_study.csv").read_text().splitlines()[0]
    assert header.startswith("study,class,dice,iou,hd95,assd,nsd,volume_ref_ml,volume_pred_ml")
    assert "evaluate: complete (1 ok" in capsys.readouterr().out


# ---- paired comparison of two models ---------------------------------------------------------


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    """Eight studies: model A shifts the core by 2 voxels everywhere; model B is exact on six and 1 voxel off on
    two; both get the shell right. A ninth study only model A predicted."""
    refs, pred_a, pred_b = tmp_path / "ref", tmp_path / "pred_a", tmp_path / "pred_b"
    for i in range(9):
        save_nifti(labelled(CORE_REF, SHELL), refs / f"case_{i}.nii.gz")
        save_nifti(labelled(CORE_SHIFT, SHELL), pred_a / f"case_{i}.nii.gz")
        if i < 8:
            core_b = CORE_REF if i < 6 else (1, (3, 2, 2), (9, 8, 8))
            save_nifti(labelled(core_b, SHELL), pred_b / f"case_{i}.nii.gz")
    config = load_config(None, overrides=["evaluate.bootstrap=1000"])
    evaluate(pred_a, refs, tmp_path / "eval_a", config=config)
    evaluate(pred_b, refs, tmp_path / "eval_b", config=config)
    return tmp_path / "eval_a", tmp_path / "eval_b"


def test_paired_comparison_of_two_models(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    from scipy import stats

    from pipeline.stages.compare import compare

    eval_a, eval_b = two_models
    out = tmp_path / "cmp"
    config = load_config(None, overrides=["evaluate.bootstrap=1000"])
    record = compare(eval_a, eval_b, out, names=("old", "new"), config=config)
    assert record["status"] == "complete" and record["counts"]["ok"] == 8
    result = read_json(out / "comparison.json")
    assert (result["a"], result["b"], result["only_in_a"], result["only_in_b"]) == ("old", "new", ["case_8"], [])
    diffs = np.array([1 / 3] * 6 + [2 * 180 / 432 - 2 / 3] * 2)  # Dice B - A per study
    dice = result["classes"]["1"]["metrics"]["dice"]
    assert dice["n"] == 8 and dice["mean_diff"] == pytest.approx(diffs.mean(), abs=1e-5)
    assert dice["p_value"] == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-5) and dice["p_value"] < 0.05
    assert dice["ci_low"] > 0 and dice["better"] == "b"
    hd95 = result["classes"]["1"]["metrics"]["hd95"]
    assert hd95["mean_diff"] == pytest.approx((6 * -1.6 + 2 * -0.8) / 8, abs=1e-5) and hd95["better"] == "b"
    shell = result["classes"]["2"]["metrics"]["dice"]
    assert (shell["mean_diff"], shell["p_value"], shell["n_nonzero"], shell["better"]) == (0.0, 1.0, 0, None)
    lines = (out / "comparison.csv").read_text().splitlines()
    assert lines[0].startswith("class,class_name,metric,n,") and len(lines) == 1 + 2 * 5
    first = {n: (out / n).read_bytes() for n in ("comparison.json", "comparison.csv", "comparison.html")}
    assert compare(eval_a, eval_b, out, names=("old", "new"), config=config).get("skipped") is True
    compare(eval_a, eval_b, out, names=("old", "new"), config=config, force=True)
    assert {n: (out / n).read_bytes() for n in first} == first


def test_cli_compare(two_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eval_a, eval_b = two_models
    out = tmp_path / "cmp_cli"
    assert main(["compare", str(eval_a), str(eval_b), "--out", str(out), "--names", "old", "new"]) == 0
    assert "compare: complete (8 ok" in capsys.readouterr().out and (out / "comparison.html").is_file()
