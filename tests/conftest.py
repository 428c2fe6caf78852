"""Shared fixtures: temporary run folders, phantom volumes, a synthetic MSD dataset, tiny configs, GPU skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.demo_data import phantom, write_demo_dataset


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def phantom_pair(rng: np.random.Generator):
    """One (image, label) Volume pair, 1 mm, RAS."""
    return phantom(rng, shape=(32, 36, 28))


@pytest.fixture(scope="session")
def msd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MSD-style dataset (dataset.json, imagesTr, labelsTr) of 6 phantoms; read-only."""
    return write_demo_dataset(tmp_path_factory.mktemp("msd") / "Task99_Phantom", n=6, seed=7, shape=(32, 36, 28))


@pytest.fixture
def tiny_config() -> PipelineConfig:
    """A config that trains for seconds: small network, few epochs, small patches."""
    return load_config(
        None,
        overrides=[
            "name=tiny",
            "preprocess.patch_size=[24,24,24]",
            "train.epochs=2",
            "train.batch_size=2",
            "train.samples_per_volume=1",
            "train.network.name=unet",
            "train.network.channels=[8,16,32]",
            "train.network.strides=[2,2]",
            "train.network.num_res_units=1",
            "train.val_fraction=0.34",
            "train.optimizer=adamw",
            "train.num_workers=0",
            "train.tensorboard=false",
            "infer.sw_batch_size=2",
        ],
    )
