"""Classifiers of images of several channels: a DICOM study's T2 and ADC series (``ingest.channels``) as one
two-channel input, through ``medpipe run`` (ingest, train, infer, evaluate, report).

The class shows only in the ADC channel (a bright or a dark blob); the T2 channel is noise alike in both
classes, so a classifier that saw one channel, or the T2 alone, would score at chance. The references:
each channel normalised alone, and the same predictions from nnU-Net v2 case files (one per channel).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classification.data import load_labelled, to_input
from pipeline.config import validate
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.layout import RunLayout
from pipeline.manifest import load_manifest
from pipeline.runner import run_pipeline
from pipeline.stages.infer import infer
from tests.fixtures.dicom_writer import write_series

N, SIZE = 18, 10


def _study(folder: Path, i: int, label: int, rng: np.random.Generator) -> None:
    grid = np.indices((SIZE,) * 3).astype(np.float32)
    centre = rng.uniform(SIZE * 0.35, SIZE * 0.65, 3)
    blob = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / 6)
    adc = 800 + (600 if label else -600) * blob + rng.normal(0, 20, grid.shape[1:])
    t2 = rng.normal(400, 60, grid.shape[1:])
    for name, values, description in (("t2", t2, "T2 TSE ax"), ("adc", adc, "dADC map")):
        def identify(ds, _k: int, description: str = description) -> None:
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = f"1.2.826.7.{i}", f"1.2.826.7.{i}.1"
            ds.SeriesDescription = description

        write_series(folder / f"P{i:02d}" / name, values.round().astype(np.int16), series_tag=f"{i}{name}",
                     pixel_spacing=(1.5, 1.5), step=1.5, edit=identify)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLayout, dict]:
    root = tmp_path_factory.mktemp("cls_channels")
    rng = np.random.default_rng(4)
    lines = ["study,label"]
    for i in range(N):
        _study(root / "scans", i, i % 2, rng)
        lines.append(f"P{i:02d}/t2,{'high' if i % 2 else 'low'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = validate({
        "name": "two-channel-cls", "task": "classification", "seed": 1,
        "data": {"root": str(root / "scans"), "labels_csv": str(root / "labels.csv")},
        "ingest": {"memory_limit_mb": None, "timeout_s": None, "channels": {"T2": "*t2*", "ADC": "*adc*"}},
        "classify": {"network": "resnet10", "network_kwargs": {"widen_factor": 0.25, "conv1_t_stride": 2},
                     "input_size": [SIZE] * 3, "epochs": 4, "batch_size": 4, "learning_rate": 0.01,
                     "augment": False, "device": "cpu", "threads": 1, "val_fraction": 0.34},
        "infer": {"device": "cpu"}, "evaluate": {"bootstrap": 100}})
    layout = RunLayout(root / "run")
    return layout, run_pipeline(config, layout.root)


def test_each_channel_is_normalised_alone() -> None:
    rng = np.random.default_rng(0)
    t2, adc = rng.normal(400, 60, (6, 5, 4)), rng.normal(0.001, 0.0002, (6, 5, 4))
    both = to_input(np.stack([t2, adc], axis=-1), (6, 5, 4), "zscore")
    assert both.shape == (2, 6, 5, 4)
    for k, alone in enumerate((t2, adc)):
        torch.testing.assert_close(both[k], to_input(alone, (6, 5, 4), "zscore")[0])
        assert abs(float(both[k].mean())) < 1e-5 and float(both[k].std(unbiased=False)) == pytest.approx(1, abs=1e-4)


def test_a_two_channel_classifier_learns_from_the_channel_that_holds_the_class(run: tuple[RunLayout, dict]) -> None:
    layout, records = run
    assert all(r["status"] == "complete" for r in records.values())
    manifest = load_manifest(layout.ingest)
    assert manifest.channels == ["T2", "ADC"] and len(manifest.ok_studies()) == N
    data, _ = load_labelled(layout.ingest, input_size=(SIZE,) * 3, normalization="zscore")
    assert tuple(data.images.shape) == (N, 2, SIZE, SIZE, SIZE)

    meta = json.loads((layout.train / "model/model.json").read_text())
    assert meta["in_channels"] == 2 and meta["channels"] == ["T2", "ADC"]
    weights = torch.load(layout.train / "model/model.pt", weights_only=True)
    assert weights["conv1.weight"].shape[1] == 2
    summary = json.loads((layout.evaluate / "summary.json").read_text())
    assert summary["metrics"]["auc"] == 1.0  # the ADC blob decides; T2 alone would be a coin toss


def test_case_files_of_one_channel_each_give_the_same_probabilities(run: tuple[RunLayout, dict],
                                                                   tmp_path: Path) -> None:
    layout, _ = run
    studies = load_manifest(layout.ingest).ok_studies()[:4]
    cases = tmp_path / "cases"
    cases.mkdir()
    for study in studies:
        image = load_nifti(layout.ingest / str(study.image), allow_4d=True)
        for k in range(2):
            save_nifti(Volume(image.array[..., k], image.affine), cases / f"{study.id}_{k:04d}.nii.gz")
    save_nifti(Volume(image.array[..., 0], image.affine), tmp_path / "t2_only.nii.gz")
    model = layout.train / "model"
    assert infer(model, cases, tmp_path / "out")["status"] == "complete"
    assert infer(model, layout.ingest, tmp_path / "ref", studies=[s.id for s in studies])["status"] == "complete"
    by_case = {r["study"]: r for r in csv.DictReader((tmp_path / "out/predictions.csv").open())}
    reference = {r["study"]: r for r in csv.DictReader((tmp_path / "ref/predictions.csv").open())}
    assert sorted(by_case) == sorted(reference) == sorted(s.id for s in studies)
    for study_id, row in by_case.items():
        assert float(row["prob_high"]) == pytest.approx(float(reference[study_id]["prob_high"]), abs=1e-6)

    result = infer(model, tmp_path / "t2_only.nii.gz", tmp_path / "t2_out")
    assert result["status"] == "failed"
    (failed,) = json.loads((tmp_path / "t2_out/classification.json").read_text())["failed"]
    assert failed["code"] == "channels_mismatch"
    assert failed["message"].startswith("t2_only.nii.gz: one channel (a 3D image), but the classifier's channels "
                                        "expect 2 channels (T2, ADC)")


def test_colour_medmnist_images_keep_their_three_channels_and_the_colour_decides(tmp_path: Path) -> None:
    """2D colour images whose classes differ only in hue (red or blue, the same grey): kept as red, green and
    blue channels, a 2D classifier tells them apart; averaged to grey they would be one picture."""
    from pipeline.classification.medmnist import import_medmnist
    from pipeline.stages.train import train

    rng = np.random.default_rng(2)

    def pictures(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        images = rng.integers(90, 110, (n, 16, 16, 3))
        for image, label in zip(images, labels, strict=True):
            x, y = rng.integers(3, 9, 2)
            image[x:x + 5, y:y + 5] = (180, 30, 60) if label else (60, 30, 180)  # same sum: same grey
        return images.astype(np.uint8), labels[:, None]

    (train_images, train_labels), (val_images, val_labels) = pictures(24), pictures(12)
    npz = tmp_path / "colour.npz"
    np.savez(npz, train_images=train_images, train_labels=train_labels, val_images=val_images, val_labels=val_labels)
    manifest = import_medmnist(npz, tmp_path / "imp")
    assert manifest.channels == ["red", "green", "blue"]
    study = manifest.by_id()["val_00004"]
    image = load_nifti(tmp_path / "imp" / str(study.image), allow_4d=True)
    assert study.shape == [16, 16, 1] and image.array.shape == (16, 16, 1, 3)
    np.testing.assert_array_equal(image.array[:, :, 0, :], val_images[4])

    config = validate({"task": "classification", "seed": 0, "data": {"split_file": str(tmp_path / "imp/split.json")},
                       "classify": {"network": "resnet10", "network_kwargs": {"widen_factor": 0.25},
                                    "input_size": [16, 16], "epochs": 3, "batch_size": 6, "learning_rate": 0.01,
                                    "augment": False, "device": "cpu", "threads": 1}})
    assert train(tmp_path / "imp", tmp_path / "train", config=config)["status"] == "complete"
    meta = json.loads((tmp_path / "train/model/model.json").read_text())
    assert meta["in_channels"] == 3 and meta["channels"] == ["red", "green", "blue"]
    history = list(csv.DictReader((tmp_path / "train/history.csv").open()))
    assert max(float(r["val_auc"]) for r in history) == 1.0
