"""``medpipe run`` with ``task: classification`` on tiny labelled NIfTI volumes: ingest with a labels CSV, train,
infer, evaluate, report; cross-validation; MedMNIST as the run's input; reruns."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.classification.calibration import Calibration
from pipeline.classification.metrics import softmax
from pipeline.cli import main
from pipeline.config import PipelineConfig, validate
from pipeline.errors import ConfigError, StageError
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.layout import RunLayout
from pipeline.manifest import load_manifest, save_manifest
from pipeline.runner import run_pipeline, run_stage
from pipeline.stages.evaluate import evaluate

PHI = ("DOE", "JOHN")
N_SCANS, N_LABELLED = 14, 12


def _blob(label: int, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    grid = np.indices((size,) * 3).astype(np.float32)
    centre = rng.uniform(size * 0.35, size * 0.65, 3)
    blob = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / 8)
    return (100 + (120 if label else 20) * blob + rng.normal(0, 5, grid.shape[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """14 scans (two named after a patient), 12 of them labelled normal/tumour in labels.csv (by path or stem)."""
    root = tmp_path_factory.mktemp("cls")
    folder = root / "scans"
    rng = np.random.default_rng(0)
    lines = ["study,label"]
    for i in range(N_SCANS):
        label = i % 2
        name = f"DOE_JOHN_{i:02d}.nii.gz" if i < 2 else f"sub/scan_{i:02d}.nii.gz"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_nifti(Volume(_blob(label, rng), np.diag([1.5, 1.5, 2.0, 1.0])), folder / name)
        if i < N_LABELLED:
            lines.append(f"{name if i % 3 else name.split('/')[-1].split('.')[0]},{'tumour' if label else 'normal'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, root / "labels.csv"


def _config(scan_dir: Path, labels_csv: Path | None, **classify: Any) -> PipelineConfig:
    return validate({
        "name": "tiny-cls", "task": "classification",
        "data": {"root": str(scan_dir), "labels_csv": str(labels_csv) if labels_csv else None},
        "ingest": {"memory_limit_mb": None, "timeout_s": None},
        "classify": {"network": "resnet10", "network_kwargs": {"widen_factor": 0.25, "conv1_t_stride": 2},
                     "input_size": [12, 12, 12], "epochs": 2, "batch_size": 4, "learning_rate": 0.01,
                     "augment": False, "device": "cpu", "threads": 1, "val_fraction": 0.34, **classify},
        "infer": {"device": "cpu"}, "evaluate": {"bootstrap": 200}})


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def single_run(scans: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLayout, dict]:
    config = _config(*scans)
    layout = RunLayout(tmp_path_factory.mktemp("run") / "run")
    return layout, run_pipeline(config, layout.root)


def test_run_chains_the_classification_stages(single_run: tuple[RunLayout, dict]) -> None:
    layout, records = single_run
    assert list(records) == ["ingest", "train", "infer", "evaluate", "report"]  # no preprocess for classification
    assert all(r["status"] == "complete" for r in records.values())
    assert not layout.preprocess.exists()
    manifest = load_manifest(layout.ingest)
    assert manifest.classes == {"0": "normal", "1": "tumour"}
    by_source = {s.source: s.class_label for s in manifest.studies}
    assert by_source["DOE_JOHN_00.nii.gz"] == 0 and by_source["sub/scan_05.nii.gz"] == 1
    assert by_source["sub/scan_13.nii.gz"] is None
    unlabelled = {s.id for s in manifest.studies if s.class_label is None}
    assert len(unlabelled) == N_SCANS - N_LABELLED

    split = json.loads((layout.train / "split.json").read_text())
    assert len(split["train"]) + len(split["validation"]) == N_LABELLED and not unlabelled & set(split["train"])
    labels = {s.id: s.class_label for s in manifest.studies}
    assert sorted(labels[i] for i in split["validation"]) == [0, 0, 1, 1]  # stratified hold-out
    predictions = _csv_rows(layout.infer / "predictions.csv")
    assert {r["study"] for r in predictions} == set(split["validation"]) | unlabelled

    # the summary's figures are scikit-learn's on the probabilities infer wrote
    summary = json.loads((layout.evaluate / "summary.json").read_text())
    scored = [r for r in predictions if labels[r["study"]] is not None]
    y = [labels[r["study"]] for r in scored]
    p1 = [float(r["prob_tumour"]) for r in scored]
    metrics = summary["metrics"]
    assert metrics["auc"] == pytest.approx(skm.roc_auc_score(y, p1), abs=1e-9)
    predicted = [int(p >= 0.5) for p in p1]
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted))
    assert metrics["confusion_matrix"] == skm.confusion_matrix(y, predicted, labels=[0, 1]).tolist()
    assert metrics["auc_ci"][0] <= metrics["auc"] <= metrics["auc_ci"][1] and "ece" in metrics
    assert sorted(summary["unlabelled"]) == sorted(unlabelled)
    assert sorted(summary["studies"]) == sorted(split["validation"])
    assert (layout.evaluate / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert len(_csv_rows(layout.evaluate / "per_study.csv")) == len(predictions)


def test_report_shows_metrics_and_gradcam_and_no_phi(single_run: tuple[RunLayout, dict]) -> None:
    layout, _ = single_run
    index = (layout.report / "index.html").read_text()
    summary = json.loads((layout.evaluate / "summary.json").read_text())
    assert f"{summary['metrics']['auc']:.3f}" in index and "Confusion matrix" in index and "Calibration" in index
    reliability = base64.b64encode((layout.evaluate / "reliability.png").read_bytes()).decode()
    assert reliability in index
    predictions = {r["study"]: r for r in _csv_rows(layout.infer / "predictions.csv")}
    for sid, row in predictions.items():
        page = (layout.report / "studies" / f"{sid}.html").read_text()
        gradcam = base64.b64encode((layout.infer / "explanations" / f"{sid}.png").read_bytes()).decode()
        assert f"data:image/png;base64,{gradcam}" in page and "Grad-CAM" in page
        assert f"{float(row['prob_tumour']):.4f}" in page
        document = json.loads((layout.report / "studies" / f"{sid}.json").read_text())
        assert document["classification"]["probabilities"]["tumour"] == pytest.approx(float(row["prob_tumour"]))
        assert f'href="studies/{sid}.html"' in index
    for stage in (layout.train, layout.infer, layout.evaluate, layout.report):
        for path in stage.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert not any(word.encode() in content for word in PHI), path


def test_evaluate_with_nothing_to_score_fails_and_names_the_cause(single_run: tuple[RunLayout, dict],
                                                                  tmp_path: Path) -> None:
    """A wrong folder, a manifest without class labels or an infer run whose every prediction failed is an error
    (exit 1), not a "complete" evaluation of nothing."""
    layout, _ = single_run
    manifest = load_manifest(layout.ingest)
    stranger = tmp_path / "stranger"
    save_manifest(manifest.model_copy(update={"studies": [s.model_copy(update={"id": f"other_{i}"})
                                                          for i, s in enumerate(manifest.studies)]}), stranger)
    with pytest.raises(StageError, match=r"no prediction in .* is a study of .*named like case_.*studies like other_0")\
            as caught:
        evaluate(layout.infer, stranger, tmp_path / "out")
    assert caught.value.code == "no_pairs" and not (tmp_path / "out").exists()

    unlabelled = tmp_path / "unlabelled"
    save_manifest(manifest.model_copy(update={"classes": None, "studies": [
        s.model_copy(update={"class_label": None}) for s in manifest.studies]}), unlabelled)
    with pytest.raises(StageError, match=r"none of the \d+ predicted studies has a class label"):
        evaluate(layout.infer, unlabelled, tmp_path / "out")

    failed = tmp_path / "infer_failed"
    failed.mkdir()
    header = (layout.infer / "predictions.csv").read_text().splitlines()[0]
    (failed / "predictions.csv").write_text(header + "\n")
    info = json.loads((layout.infer / "classification.json").read_text())
    (failed / "classification.json").write_text(json.dumps({**info, "failed": [
        {"id": "case_x", "code": "nifti_corrupt", "message": "x"}]}))
    with pytest.raises(StageError, match=r"every prediction failed \(1;"):
        evaluate(failed, layout.ingest, tmp_path / "out")
    assert main(["evaluate", "--pred", str(layout.infer), "--ref", str(stranger), "--out",
                 str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "summary.json").exists()


def test_rerun_skips_every_stage(single_run: tuple[RunLayout, dict], scans: tuple[Path, Path]) -> None:
    layout, first = single_run
    again = run_pipeline(_config(*scans), layout.root)
    assert all(r.get("skipped") for r in again.values())
    assert json.loads((layout.evaluate / "record.json").read_text())["outputs"] == first["evaluate"]["outputs"]
    with pytest.raises(ConfigError, match="no preprocess stage"):
        run_stage("preprocess", _config(*scans), layout)


def test_edited_labels_csv_reruns_ingest(scans: tuple[Path, Path], tmp_path: Path) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(scans[1].read_text())
    config = _config(scans[0], labels_csv)
    layout = RunLayout(tmp_path / "run")
    run_pipeline(config, layout.root, stages=("ingest",))
    assert run_pipeline(config, layout.root, stages=("ingest",))["ingest"].get("skipped")
    labels_csv.write_text(scans[1].read_text().replace("DOE_JOHN_00,normal", "DOE_JOHN_00,cyst"))
    record = run_pipeline(config, layout.root, stages=("ingest",))["ingest"]
    assert not record.get("skipped") and record["counts"]["ok"] == N_SCANS
    manifest = load_manifest(layout.ingest)
    assert manifest.classes == {"0": "cyst", "1": "normal", "2": "tumour"}
    assert {s.source: s.class_label for s in manifest.studies}["DOE_JOHN_00.nii.gz"] == 0
    # without a labels CSV the class labels of the previous run are not kept
    run_pipeline(_config(scans[0], None), layout.root, stages=("ingest",))
    assert load_manifest(layout.ingest).classes is None


def test_cross_validation_run(scans: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(*scans, fold="all", num_folds=2, epochs=1)
    layout = RunLayout(tmp_path / "run")
    records = run_pipeline(config, layout.root)
    assert all(r["status"] == "complete" for r in records.values())
    manifest = load_manifest(layout.ingest)
    labelled = {s.id: s.class_label for s in manifest.studies if s.class_label is not None}
    folds = [json.loads((layout.train / f"fold_{k}" / "split.json").read_text()) for k in range(2)]
    assert set(folds[0]["validation"]).isdisjoint(folds[1]["validation"])
    assert set(folds[0]["validation"]) | set(folds[1]["validation"]) == set(labelled)
    assert all(sorted(labelled[i] for i in f["validation"]) == [0, 0, 0, 1, 1, 1] for f in folds)

    cv = json.loads((layout.train / "cv.json").read_text())
    pooled_y, pooled_logits, pooled_probs = [], [], []
    for k, fold in enumerate(cv["folds"]):
        rows = _csv_rows(layout.train / f"fold_{k}" / "validation_predictions.csv")
        assert {r["study"] for r in rows} == set(folds[k]["validation"])
        y = [int(r["label"]) for r in rows]
        logits = np.array([[float(r["logit_0"]), float(r["logit_1"])] for r in rows])
        probs = Calibration(fold["temperature"], tuple(fold["logit_bias"] or ())).probabilities(logits)
        assert fold["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
        pooled_y += y
        pooled_logits.append(logits)
        pooled_probs.append(probs)
    uncalibrated = softmax(np.concatenate(pooled_logits))[:, 1]
    assert cv["pooled"]["auc"] == pytest.approx(skm.roc_auc_score(pooled_y, uncalibrated))
    assert cv["pooled"]["n"] == N_LABELLED and cv["pooled"]["auc_ci"] is not None
    calibrated_auc = skm.roc_auc_score(pooled_y, np.concatenate(pooled_probs)[:, 1])
    assert cv["pooled_calibrated"]["auc"] == pytest.approx(calibrated_auc)

    # inference predicts each labelled study with the fold that held it out (out-of-fold), the rest with both
    info = json.loads((layout.infer / "classification.json").read_text())
    assert info["out_of_fold"] is True
    for k, fold in enumerate(folds):
        assert all(info["predicted_by"][sid] == [f"fold_{k}"] for sid in fold["validation"])
    unlabelled = [s.id for s in manifest.studies if s.class_label is None]
    assert all(info["predicted_by"][sid] == ["fold_0", "fold_1"] for sid in unlabelled)
    summary = json.loads((layout.evaluate / "summary.json").read_text())
    assert summary["out_of_fold"] and summary["metrics"]["auc"] == pytest.approx(calibrated_auc, abs=1e-6)
    assert all(r.get("skipped") for r in run_pipeline(config, layout.root).values())


def test_seed_ensemble_run(scans: tuple[Path, Path], tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    records = run_pipeline(_config(*scans, seeds=2, epochs=1), layout.root)
    assert all(r["status"] == "complete" for r in records.values())
    split = json.loads((layout.train / "split.json").read_text())
    members = [layout.train / f"seed_{s}" for s in (0, 1)]
    for member in members:  # one split for every member, each its own seed
        assert {k: v for k, v in json.loads((member / "split.json").read_text()).items() if k != "seed"} == \
            {k: v for k, v in split.items() if k != "seed"}
    infos = [json.loads((m / "model" / "model.json").read_text()) for m in members]
    assert [i["seed"] for i in infos] == [0, 1] and infos[0]["sha256"] != infos[1]["sha256"]
    model = json.loads((layout.train / "model" / "model.json").read_text())
    assert model["ensemble"] == ["../seed_0/model", "../seed_1/model"] and model["seeds"] == [0, 1]
    assert not (layout.train / "model" / "model.pt").exists()

    # the ensemble's validation AUC is scikit-learn's on the mean of the members' calibrated probabilities ...
    probs, ids, y = [], None, None
    for member, info in zip(members, infos, strict=True):
        rows = _csv_rows(member / "validation_predictions.csv")
        ids, y = [r["study"] for r in rows], [int(r["label"]) for r in rows]
        logits = np.array([[float(r["logit_0"]), float(r["logit_1"])] for r in rows])
        probs.append(Calibration(info["temperature"], tuple(info["logit_bias"] or ())).probabilities(logits)[:, 1])
    mean = np.mean(probs, axis=0)
    assert sorted(ids) == split["validation"]
    metrics = json.loads((layout.train / "validation_metrics.json").read_text())
    assert metrics["calibrated"]["auc"] == pytest.approx(skm.roc_auc_score(y, mean))
    assert [m["seed"] for m in metrics["members"]] == [0, 1]
    assert metrics["members"][1]["auc"] == pytest.approx(skm.roc_auc_score(y, probs[1]))
    # ... and those are the probabilities infer writes for the validation studies
    predicted = {r["study"]: float(r["prob_tumour"]) for r in _csv_rows(layout.infer / "predictions.csv")}
    assert [predicted[i] for i in ids] == pytest.approx(mean.tolist(), abs=1e-5)
    info = json.loads((layout.infer / "classification.json").read_text())
    assert [m["name"] for m in info["models"]] == ["seed_0", "seed_1"]

    # a third seed trains only the new member
    before = [(m / "model" / "model.pt").stat().st_mtime_ns for m in members]
    record = run_pipeline(_config(*scans, seeds=3, epochs=1), layout.root, stages=("train",))["train"]
    assert record["status"] == "complete" and record["seeds"] == [0, 1, 2]
    assert [(m / "model" / "model.pt").stat().st_mtime_ns for m in members] == before
    assert json.loads((layout.train / "model" / "model.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="classify.seeds"):
        _config(*scans, seeds=2, fold="all")


def test_medmnist_npz_is_the_runs_ingest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.array([[i % 2] for i in range(6)], dtype=np.uint8)
    images = np.stack([_blob(int(v), rng, size=8).clip(0, 255).astype(np.uint8) for v in labels[:, 0]])
    npz = tmp_path / "tiny3d.npz"
    np.savez(npz, train_images=images[:4], train_labels=labels[:4], val_images=images[4:], val_labels=labels[4:])
    config = _config(npz, None)
    layout = RunLayout(tmp_path / "run")
    record = run_pipeline(config, layout.root, stages=("ingest",))["ingest"]
    assert record["status"] == "complete" and record["counts"]["ok"] == 6
    manifest = load_manifest(layout.ingest)
    assert [s.class_label for s in manifest.studies] == [0, 1, 0, 1, 0, 1]
    assert json.loads((layout.ingest / "split.json").read_text())["validation"] == ["val_00000", "val_00001"]
    assert run_pipeline(config, layout.root, stages=("ingest",))["ingest"].get("skipped")
    relabel = tmp_path / "labels.csv"
    relabel.write_text("study,label\ntrain_00000,b\ntrain_00001,a\n")
    manifest_after = run_pipeline(_config(npz, relabel), layout.root, stages=("ingest",))
    assert not manifest_after["ingest"].get("skipped")
    studies = load_manifest(layout.ingest).by_id()
    assert studies["train_00000"].class_label == 1 and studies["val_00000"].class_label is None
