"""The CUDA path (mixed precision training and inference); skipped where no GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig
from pipeline.io.nifti import load_nifti
from pipeline.stages.infer import infer
from pipeline.stages.preprocess import preprocess
from pipeline.stages.train import train
from tests.stages.test_preprocess import make_ingest

pytestmark = pytest.mark.gpu


def test_train_and_infer_on_cuda_with_amp(msd_dataset: Path, tmp_path: Path, tiny_config: PipelineConfig) -> None:
    make_ingest(msd_dataset, tmp_path / "01_ingest")
    preprocess(tmp_path / "01_ingest", tmp_path / "02_preprocess", config=PipelineConfig())
    config = tiny_config.model_copy(update={
        "train": tiny_config.train.model_copy(update={"device": "cuda", "amp": True, "num_workers": 0}),
        "infer": tiny_config.infer.model_copy(update={"device": "cuda"}),
    })
    record = train(tmp_path / "02_preprocess", tmp_path / "03_train", config=config)
    assert record["status"] == "complete" and record["device_type"] == "cuda"
    state = torch.load(tmp_path / "03_train" / "model" / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())  # saved portable, loadable without a GPU

    images = sorted((msd_dataset / "imagesTr").glob("*.nii.gz"))[:2]
    folder = tmp_path / "new"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    result = infer(tmp_path / "03_train" / "model", folder, tmp_path / "04_infer", config=config)
    assert result["status"] == "complete"
    for image in images:
        source = load_nifti(image)
        pred = load_nifti(tmp_path / "04_infer" / "predictions" / image.name)
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)


def test_dynunet_deep_supervision_channels_last_and_compile_on_cuda(msd_dataset: Path, tmp_path: Path,
                                                                   tiny_config: PipelineConfig) -> None:
    """The default network (planned DynUNet with deep supervision) with AMP, channels-last and torch.compile."""
    make_ingest(msd_dataset, tmp_path / "01_ingest")
    preprocess(tmp_path / "01_ingest", tmp_path / "02_preprocess", config=tiny_config)
    network = tiny_config.train.network.model_copy(update={"name": "dynunet", "channels": None, "strides": None})
    config = tiny_config.model_copy(update={
        "train": tiny_config.train.model_copy(update={"device": "cuda", "amp": True, "channels_last": True,
                                                      "compile": True, "network": network, "epochs": 2}),
        "infer": tiny_config.infer.model_copy(update={"device": "cuda"}),
    })
    record = train(tmp_path / "02_preprocess", tmp_path / "03_train", config=config)
    assert record["status"] == "complete" and record["device_type"] == "cuda"
    assert record["epochs_run"] == 2
    dice = record["validation"]["dice"]
    assert dice and all(0.0 <= v <= 1.0 for v in dice.values())
    state = torch.load(tmp_path / "03_train" / "model" / "model.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") or k.startswith("module.") for k in state)  # unwrapped weights
