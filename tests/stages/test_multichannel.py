"""Images of several channels (MSD's BrainTumour layout: one 4D NIfTI per study, channel last), ingest to report.

The reference for every step is the same step run on each channel alone: ingest keeps the voxels,
planning measures each channel as a one-channel dataset would be measured, and preprocessing gives
each channel what one-channel preprocessing gives it under that channel's plans.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import PipelineConfig
from pipeline.config_sections import PreprocessConfig
from pipeline.demo_data import write_demo_dataset
from pipeline.errors import ConfigError, GeometryError, IngestError
from pipeline.export.model_export import export_model
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest
from pipeline.planning import dataset_fingerprint, estimate_training_memory_mb, make_plans, study_fingerprint
from pipeline.plans_file import validate_plans_overrides
from pipeline.stages.evaluate import evaluate
from pipeline.stages.infer import infer
from pipeline.stages.ingest import ingest
from pipeline.stages.ingest_survey import survey, survey_lines
from pipeline.stages.preprocess import preprocess
from pipeline.stages.report import report
from pipeline.stages.train import train
from pipeline.transforms.preprocessing import preprocessing_transforms

CHANNELS = ("FLAIR", "CT")


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five phantoms of two channels (FLAIR-like, CT-like), one stored left-right flipped; read-only."""
    return write_demo_dataset(tmp_path_factory.mktemp("mc") / "Task98_TwoChannel", n=5, seed=11,
                              shape=(24, 28, 20), channels=CHANNELS)


@pytest.fixture(scope="module")
def ingested(two_channel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mc_ingest")
    assert ingest(two_channel, out)["status"] == "complete"
    return out


def test_ingest_keeps_each_channel_voxel_for_voxel_and_names_them(two_channel: Path, ingested: Path) -> None:
    manifest = load_manifest(ingested)
    assert manifest.channels == list(CHANNELS)
    assert len(manifest.studies) == 5 and all(s.status == "ok" for s in manifest.studies)
    for study in manifest.studies:
        source = load_nifti(two_channel / study.source, allow_4d=True)
        image = load_nifti(ingested / study.image, allow_4d=True)
        label = load_nifti(ingested / study.label)
        assert image.array.shape == (*source.spatial_shape, 2) and study.shape == list(source.spatial_shape)
        np.testing.assert_array_equal(image.array, source.array)
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
        assert label.same_grid(image)
    surveyed = survey(two_channel)  # the dry run says so too
    assert {s.channels for s in surveyed} == {2} and [s.id for s in surveyed] == [s.id for s in manifest.studies]
    assert all(line.endswith("; 2 channels") for line in survey_lines(surveyed, two_channel)[2:])


def test_a_study_with_other_channels_fails_alone_and_says_how_many(two_channel: Path, tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    shutil.copytree(two_channel, scan)
    names = sorted(p.name for p in (scan / "imagesTr").iterdir())
    three = load_nifti(two_channel / "imagesTr" / names[0], allow_4d=True)
    save_nifti(three.with_array(np.concatenate([three.array, three.array[..., :1]], axis=-1)),
               scan / "imagesTr" / names[0])
    save_nifti(three.with_array(three.array[..., 0]), scan / "imagesTr" / names[1])
    result = ingest(scan, tmp_path / "out")
    assert result["status"] == "partial"
    by_source = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    three_study, flat_study = by_source[f"imagesTr/{names[0]}"], by_source[f"imagesTr/{names[1]}"]
    assert three_study.status == flat_study.status == "failed"
    assert three_study.error.code == flat_study.error.code == "nifti_channels"
    assert f"imagesTr/{names[0]}: 3 volume(s)" in three_study.error.message
    assert f"imagesTr/{names[1]}: 1 volume(s)" in flat_study.error.message
    assert "names 2 channels" in flat_study.error.message
    assert sum(s.status == "ok" for s in by_source.values()) == 3


def test_dataset_json_channels_must_be_numbered_and_4d_images_without_them_say_how(two_channel: Path,
                                                                                   tmp_path: Path) -> None:
    meta = json.loads((two_channel / "dataset.json").read_text())
    scan = tmp_path / "scan"
    shutil.copytree(two_channel, scan)
    (scan / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "FLAIR", "2": "CT"}}))
    with pytest.raises(IngestError, match="number the image channels 0, 1"):
        ingest(scan, tmp_path / "bad")
    (scan / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "MRI"}}))
    ingest(scan, tmp_path / "one")
    studies = load_manifest(tmp_path / "one").studies
    assert {s.error.code for s in studies} == {"nifti_4d"}
    assert all("name each channel in the 'modality'" in s.error.message for s in studies)
    assert load_manifest(tmp_path / "one").channels is None


def _channel_fingerprints(image: np.ndarray, label: np.ndarray, affine: np.ndarray):
    return [study_fingerprint("s", Volume(image[..., c], affine), Volume(label, affine)) for c in range(2)]


def test_each_channel_is_fingerprinted_and_planned_as_if_alone(rng: np.random.Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.planning

    planned_with: list[int] = []
    plan = pipeline.planning.plan_patch_and_batch
    monkeypatch.setattr(pipeline.planning, "plan_patch_and_batch",
                        lambda **kw: planned_with.append(kw["in_channels"]) or plan(**kw))
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    studies, alone = [], [[], []]
    for number in range(3):
        label = np.zeros((10, 12, 8), np.uint8)
        label[2:7, 3:9, 2:6] = 1 + number % 2
        image = np.stack([rng.normal(300, 40, label.shape), rng.normal(-200, 300, label.shape)], -1)
        image = image.astype(np.float32)
        image[..., 0][label == 0] = 0.0  # the first channel is zero outside one box: the crop follows the other
        studies.append(study_fingerprint(str(number), Volume(image, affine), Volume(label, affine)))
        for channel, fp in enumerate(_channel_fingerprints(image, label, affine)):
            alone[channel].append(fp)
    fingerprint = dataset_fingerprint(studies)
    for channel in range(2):
        assert fingerprint["channel_intensity"][channel] == dataset_fingerprint(alone[channel])["intensity"]
    assert fingerprint["median_cropped_shape"] == dataset_fingerprint(alone[1])["median_cropped_shape"]

    plans = make_plans(fingerprint, config=PreprocessConfig(), channels=CHANNELS)
    assert "intensity" not in plans and plans["normalization"] == "per_channel" and plans["modality"] is None
    assert [(c["name"], c["normalization"]) for c in plans["channels"]] == [("FLAIR", "zscore"), ("CT", "ct")]
    ct_alone = dataset_fingerprint(alone[1])["intensity"]
    assert plans["channels"][1]["intensity"] == {k: ct_alone[k] for k in ("mean", "std", "p005", "p995")}
    memory = estimate_training_memory_mb(plans["patch_size"], plans["batch_size"], plans["network"], in_channels=2,
                                         num_classes=plans["num_classes"])
    assert plans["fingerprint"]["estimated_memory_mb"] == round(memory, 1)
    assert planned_with == [2]  # the memory of a batch of two-channel patches (the input, the first convolution)
    zscore = make_plans(fingerprint, config=PreprocessConfig(normalization="zscore"), channels=CHANNELS)
    assert zscore["normalization"] == "zscore" and {c["normalization"] for c in zscore["channels"]} == {"zscore"}

    edited = validate_plans_overrides(
        {"normalization": "per_channel", "channels": [{"name": "FLAIR", "normalization": "none"},
                                                      {"name": "CT", "normalization": "ct",
                                                       "intensity": {"mean": 1, "std": 2, "p005": -5, "p995": 9}}]},
        source="plans.json")
    replanned = make_plans(fingerprint, config=PreprocessConfig(), channels=CHANNELS, overrides=edited)
    assert replanned["channels"][0]["normalization"] == "none"
    assert replanned["channels"][1]["intensity"] == {"mean": 1.0, "std": 2.0, "p005": -5.0, "p995": 9.0}
    with pytest.raises(ConfigError, match="this dataset's channels are"):
        make_plans(fingerprint, config=PreprocessConfig(), channels=("T1", "CT"), overrides=edited)
    with pytest.raises(ConfigError, match="give them per channel"):
        make_plans(fingerprint, config=PreprocessConfig(), channels=CHANNELS,
                   overrides={"intensity": {"mean": 0, "std": 1, "p005": 0, "p995": 1}})
    with pytest.raises(ConfigError, match="several channels"):
        make_plans(dataset_fingerprint(alone[0]), config=PreprocessConfig(), overrides=edited)
    with pytest.raises(ConfigError, match="plans key 'channels'"):
        validate_plans_overrides({"channels": [{"name": "FLAIR", "normalization": "minmax"}]}, source="p")


def test_preprocessing_gives_each_channel_what_it_gets_alone(ingested: Path, tmp_path: Path) -> None:
    manifest = load_manifest(ingested)
    study = next(s for s in manifest.studies if s.orientation != "RAS")  # the flipped one: reoriented too
    ct = {"mean": 150.0, "std": 120.0, "p005": -20.0, "p995": 320.0}
    common = {"orientation": "RAS", "target_spacing": [1.5, 1.25, 0.8], "crop_foreground": False, "num_classes": 3}
    plans = {**common, "modality": None, "normalization": "per_channel",
             "channels": [{"name": "FLAIR", "normalization": "zscore", "intensity": ct},
                          {"name": "CT", "normalization": "ct", "intensity": ct}]}
    both = preprocessing_transforms(plans)({"image": str(ingested / study.image), "label": str(ingested / study.label)})
    assert both["image"].shape[0] == 2
    image = load_nifti(ingested / study.image, allow_4d=True)
    for channel, single in enumerate(({"normalization": "zscore"}, {"normalization": "ct", "intensity": ct})):
        path = tmp_path / f"channel{channel}.nii.gz"
        save_nifti(image.with_array(image.array[..., channel]), path)
        alone = preprocessing_transforms({**common, **single})({"image": str(path),
                                                                "label": str(ingested / study.label)})
        np.testing.assert_array_equal(np.asarray(both["image"][channel]), np.asarray(alone["image"][0]))
        np.testing.assert_array_equal(np.asarray(both["image"].affine), np.asarray(alone["image"].affine))
        np.testing.assert_array_equal(np.asarray(both["label"]), np.asarray(alone["label"]))
    assert abs(float(both["image"][1].min()) - (ct["p005"] - ct["mean"]) / ct["std"]) < 1e-5  # clipped air
    with pytest.raises(RuntimeError) as caught:  # MONAI's Compose wraps what a transform raises
        preprocessing_transforms(plans)({"image": str(tmp_path / "channel0.nii.gz"),
                                         "label": str(ingested / study.label)})
    assert isinstance(caught.value.__cause__, GeometryError) and caught.value.__cause__.code == "channels_mismatch"
    assert "channel0.nii.gz: one channel (a 3D image)" in str(caught.value.__cause__)


def _tiny(tiny_config: PipelineConfig) -> PipelineConfig:
    return tiny_config.model_copy(update={"preprocess": tiny_config.preprocess.model_copy(
        update={"patch_size": (16, 16, 16)})})


def test_two_channels_train_predict_and_report_and_a_one_channel_image_is_refused(
        ingested: Path, tmp_path: Path, tiny_config: PipelineConfig) -> None:
    config = _tiny(tiny_config)
    assert preprocess(ingested, tmp_path / "pre", config=config)["status"] == "complete"
    plans = json.loads((tmp_path / "pre/plans.json").read_text())
    assert [c["name"] for c in plans["channels"]] == list(CHANNELS)
    first = json.loads((tmp_path / "pre/dataset.json").read_text())["studies"][0]
    assert nib.load(tmp_path / "pre" / first["image"]).shape[3] == 2
    assert train(tmp_path / "pre", tmp_path / "train", config=config)["status"] == "complete"
    meta = json.loads((tmp_path / "train/model/model.json").read_text())
    assert meta["in_channels"] == 2 and meta["channels"] == list(CHANNELS)
    exported = export_model(tmp_path / "train/model", tmp_path / "export", formats=("torchscript",))
    assert exported["input"]["channels"] == 2 and exported["input"]["channel_names"] == list(CHANNELS)
    assert exported["parity"]["checks"]  # the exported network ran on two-channel inputs and matched

    assert infer(tmp_path / "train", ingested, tmp_path / "infer", config=config)["status"] == "complete"
    manifest = load_manifest(ingested)
    for study in manifest.studies:
        prediction = load_nifti(tmp_path / "infer/predictions" / f"{study.id}.nii.gz")
        assert prediction.same_grid(load_nifti(ingested / study.label), atol=1e-5)
    evaluate(tmp_path / "infer", ingested, tmp_path / "eval", config=config)
    report(tmp_path / "eval", tmp_path / "report", predictions=tmp_path / "infer", ingest=ingested, config=config)
    page = json.loads((tmp_path / "report/studies" / f"{manifest.studies[0].id}.json").read_text())
    assert "image: channel FLAIR of FLAIR, CT" in json.dumps(page)

    cases = tmp_path / "cases"  # nnU-Net v2's one file per channel: a case each, predicted like its 4D image
    image = load_nifti(ingested / manifest.studies[0].image, allow_4d=True)
    for number in range(2):
        save_nifti(image.with_array(image.array[..., number]), cases / "sub" / f"brain_{number:04d}.nii.gz")
    save_nifti(image.with_array(image.array[..., 0]), cases / "half_0000.nii.gz")
    result = infer(tmp_path / "train", cases, tmp_path / "infer_cases", config=config)
    assert result["status"] == "partial"
    index = json.loads((tmp_path / "infer_cases/predictions.json").read_text())
    assert [(p["id"], p["image"]) for p in index["predictions"]] == [("brain", "sub/brain")]
    assert [(f["id"], f["code"]) for f in index["failed"]] == [("half", "channel_files")]
    assert "half_0001 missing" in index["failed"][0]["message"]
    np.testing.assert_array_equal(
        load_nifti(tmp_path / "infer_cases/predictions/brain.nii.gz").array,
        load_nifti(tmp_path / "infer/predictions" / f"{manifest.studies[0].id}.nii.gz").array)

    flat = tmp_path / "flat"
    save_nifti(image.with_array(image.array[..., 0]), flat / "one.nii.gz")
    result = infer(tmp_path / "train", flat, tmp_path / "infer_flat", config=config)
    assert result["status"] == "failed"
    record = json.loads((tmp_path / "infer_flat/record.json").read_text())
    (failure,) = record["studies"]
    assert failure["code"] == "channels_mismatch"
    assert "one.nii.gz: one channel (a 3D image), but the model's plans expect 2 channels (FLAIR, CT)" \
        in failure["message"]


def test_zscore_nonzero_keeps_the_zero_background_and_scales_the_rest(tmp_path: Path,
                                                                      rng: np.random.Generator) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    brain = np.zeros((12, 10, 8), bool)
    brain[2:9, 3:8, 1:7] = True
    first = np.where(brain, rng.normal(500, 80, brain.shape), 0.0).astype(np.float32)  # skull-stripped: 0 outside
    second = np.where(brain, rng.normal(90, 20, brain.shape), 0.0).astype(np.float32)
    save_nifti(Volume(np.stack([first, second], -1), affine), tmp_path / "two.nii.gz")
    save_nifti(Volume(first, affine), tmp_path / "one.nii.gz")
    common = {"orientation": "RAS", "target_spacing": [1.0, 1.0, 2.0], "crop_foreground": False, "num_classes": 2}
    channels = [{"name": "T1", "normalization": "zscore_nonzero"}, {"name": "FLAIR", "normalization": "zscore"}]
    two = preprocessing_transforms({**common, "channels": channels}, keys=("image",))(
        {"image": str(tmp_path / "two.nii.gz")})["image"]
    one = preprocessing_transforms({**common, "normalization": "zscore_nonzero"}, keys=("image",))(
        {"image": str(tmp_path / "one.nii.gz")})["image"]
    inside = first[brain]
    expected = np.where(brain, (first - inside.mean()) / inside.std(), 0.0)
    for image in (np.asarray(two[0]), np.asarray(one[0])):
        np.testing.assert_allclose(image, expected, atol=1e-4)
        assert np.all(image[~brain] == 0.0)
    whole = (second - second.mean()) / second.std()  # plain zscore: the background counts, and moves
    np.testing.assert_allclose(np.asarray(two[1]), whole, atol=1e-4)
    assert validate_plans_overrides({"normalization": "zscore_nonzero"}, source="p") == {
        "normalization": "zscore_nonzero"}
