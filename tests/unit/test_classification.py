"""Classification: MedMNIST import, registry, partial loading, freezing, metrics vs sklearn, ECE, temperature,
Grad-CAM, and the train + infer stages on tiny synthetic volumes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from pipeline.classification.calibration import Calibration, fit_temperature
from pipeline.classification.data import augment, to_input
from pipeline.classification.explain import gradcam_map, relevant_slices, save_gradcam_png
from pipeline.classification.medmnist import apply_label_csv, import_medmnist
from pipeline.classification.metrics import classification_metrics, expected_calibration_error, nll
from pipeline.classification.networks import build_classifier, load_partial, pretrained_parameters, set_frozen
from pipeline.config import ConfigError, validate
from pipeline.io.nifti import load_nifti
from pipeline.manifest import load_manifest
from pipeline.training.checkpoints import save_weights

TINY = {"widen_factor": 0.25, "conv1_t_stride": 2}


def _blobs(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half bright-blob volumes (label 1), half dark (label 0), with noise."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)], dtype=np.uint8)
    grid = np.indices((size,) * 3).astype(np.float32)
    images = []
    for label in labels:
        centre = rng.uniform(size * 0.35, size * 0.65, 3)
        blob = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 3.0**2))
        image = (100 + (120 if label else 30) * blob + rng.normal(0, 5, grid.shape[1:])).clip(0, 255)
        images.append(image.astype(np.uint8))
    return np.stack(images), labels[:, None]


@pytest.fixture(scope="module")
def blob_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npz") / "blobs3d.npz"
    train_images, train_labels = _blobs(16, seed=1)
    val_images, val_labels = _blobs(8, seed=2)
    np.savez(path, train_images=train_images, train_labels=train_labels, val_images=val_images,
             val_labels=val_labels)
    return path


def test_import_round_trip(blob_npz: Path, tmp_path: Path) -> None:
    manifest = import_medmnist(blob_npz, tmp_path)
    data = np.load(blob_npz)
    assert len(manifest.studies) == 24 and manifest.classes == {"0": "class_0", "1": "class_1"}
    loaded = load_manifest(tmp_path).by_id()
    study = loaded["val_00003"]
    assert study.class_label == int(data["val_labels"][3, 0])
    volume = load_nifti(tmp_path / str(study.image))
    np.testing.assert_array_equal(volume.array, data["val_images"][3])
    assert study.problems[0].code == "geometry_unknown"
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["validation"][0] == "val_00000" and len(split["train"]) == 16


def test_label_csv(blob_npz: Path, tmp_path: Path) -> None:
    import_medmnist(blob_npz, tmp_path, limit=2)
    (tmp_path / "labels.csv").write_text("study,label\ntrain_00000,tumour\ntrain_00001,normal\n"
                                         "val_00000,normal\nval_00001,tumour\n")
    manifest = apply_label_csv(tmp_path, tmp_path / "labels.csv")
    assert manifest.classes == {"0": "normal", "1": "tumour"}
    assert load_manifest(tmp_path).by_id()["train_00000"].class_label == 1


def test_registry_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        validate({"classify": {"network": "resnet19"}})
    assert validate({"task": "classification"}).classify.network == "resnet18"


def test_partial_loading_and_freezing(tmp_path: Path) -> None:
    source = build_classifier("resnet10", spatial_dims=3, in_channels=1, num_classes=5, kwargs=TINY)
    save_weights(source.state_dict(), tmp_path / "w.pt")
    target = build_classifier("resnet10", spatial_dims=3, in_channels=1, num_classes=2, kwargs=TINY)
    report = load_partial(target, tmp_path / "w.pt")
    assert sorted(report.reshaped) == ["fc.bias", "fc.weight"]
    assert set(report.missing) == {"fc.bias", "fc.weight"}
    assert torch.equal(target.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert len(report.matched) == len(source.state_dict()) - 2
    changed = set_frozen(target, report.matched, True)
    trainable = [n for n, p in target.named_parameters() if p.requires_grad]
    assert changed > 0 and trainable == ["fc.weight", "fc.bias"]
    set_frozen(target, report.matched, False)
    assert all(p.requires_grad for p in target.parameters())
    # same classes: everything matches, yet the head stays trainable at the full learning rate
    same = build_classifier("resnet10", spatial_dims=3, in_channels=1, num_classes=5, kwargs=TINY)
    full = load_partial(same, tmp_path / "w.pt")
    assert not full.reshaped and not full.missing
    set_frozen(same, full.matched, True)
    assert [n for n, p in same.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    pre, new = pretrained_parameters(same, full.matched)
    assert len(new) == 2 and len(pre) == len(list(same.parameters())) - 2


def test_metrics_match_sklearn() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.6, 0.3, 0.55])
    logits = np.log(np.stack([1 - p1, p1], 1))
    m = classification_metrics(labels, logits, operating_point=0.5, bootstrap=200, seed=3)
    pred = (p1 >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, p1))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert m["sensitivity"] == pytest.approx(4 / 5) and m["specificity"] == pytest.approx(4 / 5)
    assert m["confusion_matrix"] == [[4, 1], [1, 4]]
    assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
    assert m == classification_metrics(labels, logits, operating_point=0.5, bootstrap=200, seed=3)
    three = np.array([[2.0, 0.1, 0.1], [0.1, 2.0, 0.3], [0.2, 0.1, 2.0], [1.0, 0.9, 0.1]])
    m3 = classification_metrics(np.array([0, 1, 2, 1]), three, bootstrap=0)
    probs = np.exp(three) / np.exp(three).sum(1, keepdims=True)
    assert m3["auc"] == pytest.approx(skm.roc_auc_score([0, 1, 2, 1], probs, multi_class="ovr"))


def test_ece_known_case() -> None:
    # 4 predictions at confidence 0.9, 2 right: |0.5 - 0.9| = 0.4 in one bin; 4 at 0.6, 3 right: |0.75 - 0.6| = 0.15
    probs = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 4)
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 0])
    ece, table = expected_calibration_error(labels, probs, bins=10)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.15)
    assert [r["count"] for r in table] == [4, 4]


def test_temperature_scaling_reduces_nll() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 1.0
    overconfident = logits * 5
    t = fit_temperature(overconfident, labels)
    scaled, raw = Calibration(t).probabilities(overconfident), Calibration().probabilities(overconfident)
    assert t > 2 and nll(labels, scaled) < nll(labels, raw) - 0.2


def test_gradcam_and_augment(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet10", spatial_dims=3, in_channels=1, num_classes=2, kwargs=TINY)
    image = to_input(_blobs(1)[0][0], (16, 16, 16), "minmax")
    cam = gradcam_map(model, image, class_index=1)
    assert cam.shape == (16, 16, 16) and np.isfinite(cam).all() and cam.max() > cam.min()
    assert len(relevant_slices(cam, 3)) == 3
    flat = np.zeros((4, 4, 6))
    content = np.zeros((4, 4, 6))
    content[1:3, 1:3, 3:5] = 1
    assert relevant_slices(flat, 2, content) == [3, 4]
    png = save_gradcam_png(image[0].numpy(), cam, tmp_path / "cam.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    batch = torch.rand(4, 1, 16, 16, 16)
    a = augment(batch, generator=torch.Generator().manual_seed(1))
    b = augment(batch, generator=torch.Generator().manual_seed(1))
    assert a.shape == batch.shape and torch.equal(a, b) and not torch.equal(a, batch)
    assert augment(torch.rand(2, 1, 8, 8), generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_2d_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet18", spatial_dims=2, in_channels=1, num_classes=3, kwargs={"widen_factor": 0.25})
    image = to_input(np.random.default_rng(0).integers(0, 255, (28, 28, 1)), (16, 16), "zscore")
    assert image.shape == (1, 16, 16) and abs(float(image.mean())) < 0.05
    assert model.eval()(image[None]).shape == (1, 3)
    cam = gradcam_map(model, image, class_index=2)
    assert cam.shape == (16, 16)
    assert save_gradcam_png(image[0].numpy(), cam, tmp_path / "cam2d.png").is_file()


def test_train_and_infer_stages(blob_npz: Path, tmp_path: Path) -> None:
    from pipeline.stages.infer import infer
    from pipeline.stages.train import train

    import_medmnist(blob_npz, tmp_path / "imp")
    config = validate({"task": "classification", "classify": {
        "network": "resnet10", "network_kwargs": TINY, "input_size": [16, 16, 16], "epochs": 2,
        "batch_size": 4, "learning_rate": 0.01, "augment": False, "device": "cpu", "threads": 1}})
    record = train(tmp_path / "imp", tmp_path / "train", config=config)
    assert record["status"] == "complete"
    history = list(csv.DictReader((tmp_path / "train" / "history.csv").open()))
    assert len(history) == 2 and max(float(r["val_auc"]) for r in history) > 0.9
    meta = json.loads((tmp_path / "train" / "model" / "model.json").read_text())
    assert meta["task"] == "classification" and meta["num_classes"] == 2
    # resume: asking for 3 epochs continues from the checkpoint of epoch 2
    more = validate({**config.model_dump(mode="json"), "classify": {**config.classify.model_dump(mode="json"),
                                                                  "epochs": 3}})
    record = train(tmp_path / "imp", tmp_path / "train", config=more)
    assert record["resumed_from_epoch"] == 2 and record["epochs_run"] == 3

    result = infer(tmp_path / "train" / "model", tmp_path / "imp", tmp_path / "infer", config=config)
    assert result["status"] == "complete"
    rows = list(csv.DictReader((tmp_path / "infer" / "predictions.csv").open()))
    assert len(rows) == 24 and set(rows[0]) == {"study", "prob_class_0", "prob_class_1", "predicted"}
    for row in rows:
        assert float(row["prob_class_0"]) + float(row["prob_class_1"]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "infer" / "explanations" / "val_00000.png").is_file()
    assert json.loads((tmp_path / "infer" / "metrics.json").read_text())["auc"] > 0.9

    # a folder of images: two share a name (one id, one explanation file: both refused), a link leaves it
    images = sorted((tmp_path / "imp" / "images").glob("*.nii.gz"))
    folder = tmp_path / "new"
    for rel, source in (("a/x.nii.gz", images[0]), ("b/x.nii.gz", images[1]), ("y.nii.gz", images[2])):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / rel)
    (folder / "z.nii.gz").symlink_to(images[3])
    result = infer(tmp_path / "train" / "model", folder, folder / "out", config=config)
    assert result["status"] == "partial"
    assert [r["study"] for r in csv.DictReader((folder / "out" / "predictions.csv").open())] == ["y"]
    failed = json.loads((folder / "out" / "classification.json").read_text())["failed"]
    assert [(f["id"], f["code"]) for f in failed] == [
        ("a/x.nii.gz", "duplicate_name"), ("b/x.nii.gz", "duplicate_name"), ("z.nii.gz", "link_outside_root")]


def test_cli_import_medmnist(blob_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["import-medmnist", str(blob_npz), "--out", str(tmp_path), "--limit", "3", "-q"]) == 0
    assert "6 studies" in capsys.readouterr().out
    assert len(load_manifest(tmp_path).studies) == 6


def test_predictions_csv_keeps_every_digit() -> None:
    """Saturated probabilities stay distinct in predictions.csv (6 decimals would tie them and move the AUC)."""
    from pipeline.classification.inference import _csv_text

    probs = [np.array([3e-9, 1 - 3e-9]), np.array([1e-9, 1 - 1e-9]), np.array([0.25, 0.75])]
    text = _csv_text([{"id": f"s{i}", "probs": p, "predicted": "b"} for i, p in enumerate(probs)], ["a", "b"])
    rows = list(csv.DictReader(text.splitlines()))
    assert [float(r["prob_b"]) for r in rows] == [float(p[1]) for p in probs]
    assert [float(r["prob_a"]) for r in rows] == [float(p[0]) for p in probs]


def test_a_time_budget_stops_before_the_epoch_that_would_overrun_it(blob_npz: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs of 60 s on a fake clock and 150 s of budget: two epochs (120 s), not a third ending at 180 s."""
    import types

    import pipeline.classification.trainer as trainer
    from pipeline.stages.train import train

    clock = {"now": 0.0}
    predict = trainer.predict_logits

    def slow_predict(*args: object, **kwargs: object) -> np.ndarray:
        clock["now"] += 60.0  # once per epoch (its validation), once after training
        return predict(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(trainer, "predict_logits", slow_predict)
    import_medmnist(blob_npz, tmp_path / "imp")
    config = validate({"task": "classification", "classify": {
        "network": "resnet10", "network_kwargs": TINY, "input_size": [16, 16, 16], "epochs": 10, "max_minutes": 2.5,
        "batch_size": 4, "learning_rate": 0.01, "augment": False, "device": "cpu", "threads": 1}})
    record = train(tmp_path / "imp", tmp_path / "train", config=config)
    assert record["stopped_by"] == "max_minutes" and record["epochs_run"] == 2
    assert record["train_minutes"] == 2.0  # within the 2.5 minutes
