"""A classifier on a medpipe segmentation model's encoder: same architecture, same weights, same features."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.classification.medmnist import import_medmnist
from pipeline.classification.networks import build_classifier, check_input_size, load_partial
from pipeline.classification.pretrained_files import segmentation_spec, weights_path
from pipeline.config import ConfigError, validate
from pipeline.errors import CheckpointError
from pipeline.fileio import write_json_atomic
from pipeline.models.segmenters import build_segmenter
from tests.unit.test_classification import _blobs

PLANS: dict[str, Any] = {"patch_size": [32, 16, 16], "target_spacing": [1.0, 1.0, 1.0]}
NETWORKS = {
    "dynunet": {"name": "dynunet", "channels": [4, 8, 16], "strides": [2, 2], "deep_supervision": False},
    "unet": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "basic_unet": {"name": "basic_unet", "channels": [4, 4, 8, 8, 16]},
    "segresnet": {"name": "segresnet", "channels": [4]},
}


def _bottom(segmenter: nn.Module, name: str) -> nn.Module:
    """The module whose output is the deepest encoder feature map, found independently of the encoder code."""
    if name == "dynunet":
        return segmenter.bottleneck
    if name == "basic_unet":
        return segmenter.down_4
    if name == "segresnet":
        return segmenter.down_layers[-1]
    block = segmenter.model
    while isinstance(block, nn.Sequential) and len(block) == 3:
        block = block[1].submodule
    return block


def _segmentation_model(folder: Path, network: dict[str, Any], *, seed: int = 0) -> nn.Module:
    """A model folder as segmentation training writes it (model.json + model.pt), with random weights."""
    torch.manual_seed(seed)
    net = build_segmenter(network, in_channels=1, out_channels=3, plans=PLANS)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    write_json_atomic(folder / "model.json", {"schema_version": 1, "task": "segmentation", "network": network,
                                              "in_channels": 1, "out_channels": 3, "plans": PLANS})
    return net.eval()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_encoder_classifier_loads_the_segmentation_encoder_and_computes_its_features(tmp_path: Path,
                                                                                     name: str) -> None:
    segmenter = _segmentation_model(tmp_path / "seg", NETWORKS[name])
    spec = segmentation_spec(tmp_path / "seg")
    assert spec is not None and spec["network"]["name"] == name
    assert segmentation_spec(tmp_path / "seg" / "model.pt") == spec  # the weights file names its folder too
    torch.manual_seed(1)
    model = build_classifier("segmentation_encoder", spatial_dims=3, in_channels=1, num_classes=2,
                             kwargs={"segmentation": spec}).eval()
    report = load_partial(model, weights_path(tmp_path / "seg"))
    source = segmenter.state_dict()
    assert sorted(report.missing) == ["fc.bias", "fc.weight"] and not report.reshaped
    assert report.unexpected, "the decoder's tensors are not part of the classifier"
    assert set(report.matched) | set(report.unexpected) == set(source)
    for key in report.matched:
        assert torch.equal(model.state_dict()[key], source[key]), key
    captured: list[torch.Tensor] = []
    _bottom(segmenter, name).register_forward_hook(lambda module, inputs, output: captured.append(output))
    image = torch.rand(2, 1, 32, 16, 16)
    with torch.no_grad():
        segmenter(image)
        features = model.features(image)
        logits = model(image)
    assert torch.allclose(features, captured[0].mean(dim=(2, 3, 4)), atol=1e-5)
    assert logits.shape == (2, 2) and model.fc.in_features == captured[0].shape[1]


def test_encoder_classifier_needs_a_segmentation_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classify.pretrained"):
        validate({"task": "classification", "classify": {"network": "segmentation_encoder"}})
    with pytest.raises(ConfigError, match="3 sizes"):
        validate({"task": "classification", "classify": {"network": "segmentation_encoder",
                                                         "pretrained": str(tmp_path), "input_size": [16, 16]}})
    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"task": "classification", "network": "resnet10"}))
    with pytest.raises(CheckpointError, match="classification model"):
        segmentation_spec(folder)
    with pytest.raises(CheckpointError, match="no model.json"):
        segmentation_spec(tmp_path / "nowhere")
    spec = {"network": {"name": "swin_unetr"}, "plans": PLANS, "out_channels": 2}
    with pytest.raises(ConfigError, match="dynunet"):
        build_classifier("segmentation_encoder", spatial_dims=3, in_channels=1, num_classes=2,
                         kwargs={"segmentation": spec})


def test_train_and_infer_from_a_segmentation_encoder(tmp_path: Path) -> None:
    from pipeline.stages.infer import infer
    from pipeline.stages.train import train

    segmenter = _segmentation_model(tmp_path / "seg" / "model", NETWORKS["dynunet"])
    images, labels = _blobs(24)
    np.savez(tmp_path / "blobs.npz", train_images=images[:16], train_labels=labels[:16],
             val_images=images[16:], val_labels=labels[16:])
    import_medmnist(tmp_path / "blobs.npz", tmp_path / "imp")
    config = validate({"task": "classification", "classify": {
        "network": "segmentation_encoder", "pretrained": str(tmp_path / "seg"), "freeze_epochs": 1,
        "input_size": [16, 16, 16], "epochs": 2, "batch_size": 4, "learning_rate": 0.01, "augment": False,
        "device": "cpu", "threads": 1}})
    record = train(tmp_path / "imp", tmp_path / "train", config=config)
    assert record["status"] == "complete"
    loaded = record["pretrained"]
    encoder_keys = [k for k in segmenter.state_dict() if k.split(".")[0] in ("input_block", "downsamples",
                                                                             "bottleneck")]
    assert loaded["matched"] == len(encoder_keys) and loaded["missing"] == ["fc.weight", "fc.bias"]
    meta = json.loads((tmp_path / "train" / "model" / "model.json").read_text())
    assert meta["network"] == "segmentation_encoder"
    assert meta["network_kwargs"]["segmentation"]["network"] == NETWORKS["dynunet"]
    (tmp_path / "seg" / "model" / "model.pt").unlink()  # the classifier no longer needs the segmentation model
    result = infer(tmp_path / "train" / "model", tmp_path / "imp", tmp_path / "infer", config=config)
    assert result["status"] == "complete"
    rows = list(csv.DictReader((tmp_path / "infer" / "predictions.csv").open()))
    assert len(rows) == 24 and all(abs(float(r["prob_class_0"]) + float(r["prob_class_1"]) - 1) < 1e-5
                                   for r in rows)


def test_an_input_too_small_for_the_network_is_refused_before_training(tmp_path: Path) -> None:
    from pipeline.stages.train import train

    spec = {"network": NETWORKS["basic_unet"], "plans": PLANS, "out_channels": 3}
    basic = build_classifier("segmentation_encoder", spatial_dims=3, in_channels=1, num_classes=2,
                             kwargs={"segmentation": spec})
    # BasicUNet halves four times: 16^3 ends at one voxel, where instance norm cannot train
    with pytest.raises(ConfigError, match=r"\[16, 16, 16\] is too small.*spatial element.*takes \[32, 32, 32\]"):
        check_input_size(basic, network="segmentation_encoder", input_size=(16, 16, 16), in_channels=1)
    check_input_size(basic, network="segmentation_encoder", input_size=(32, 32, 32), in_channels=1)
    assert all(p.device.type == "cpu" for p in basic.parameters())  # the probe was a copy
    densenet = build_classifier("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    with pytest.raises(ConfigError, match=r"densenet121.*kernel size"):  # its transition pooling needs 2 voxels
        check_input_size(densenet, network="densenet121", input_size=(8, 8, 8), in_channels=1)

    _segmentation_model(tmp_path / "seg" / "model", NETWORKS["basic_unet"])
    images, labels = _blobs(12)
    np.savez(tmp_path / "blobs.npz", train_images=images[:8], train_labels=labels[:8],
             val_images=images[8:], val_labels=labels[8:])
    import_medmnist(tmp_path / "blobs.npz", tmp_path / "imp")
    config = validate({"task": "classification", "classify": {
        "network": "segmentation_encoder", "pretrained": str(tmp_path / "seg"), "input_size": [16, 16, 16],
        "epochs": 1, "batch_size": 4, "augment": False, "device": "cpu", "threads": 1}})
    with pytest.raises(ConfigError, match="classify.input_size"):
        train(tmp_path / "imp", tmp_path / "train", config=config)
    assert not (tmp_path / "train" / "checkpoints" / "last.pt").exists()
