"""``medpipe demo``: generate phantom data and a small, fast config for the whole chain."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import PipelineConfig, load_config
from pipeline.demo_data import write_demo_dataset

log = logging.getLogger(__name__)

DEMO_CASES = 16

# Settings for a run that finishes in a few minutes on 2 CPU cores; --set overrides them.
DEMO_SETTINGS: tuple[str, ...] = (
    "name=demo",
    "seed=0",
    "preprocess.spacing=[1.0,1.0,1.0]",
    "preprocess.normalization=zscore",
    "preprocess.patch_size=[32,32,32]",
    "train.network.name=unet",
    "train.network.channels=[16,32,64]",
    "train.network.strides=[1,2]",
    "train.network.num_res_units=1",
    "train.epochs=40",
    "train.batch_size=4",
    "train.samples_per_volume=2",
    "train.optimizer=adamw",
    "train.scheduler=poly",
    "train.learning_rate=0.003",
    "train.weight_decay=1e-5",
    "train.sampling=classes",
    "train.num_workers=0",
    "train.val_fraction=0.25",
    "train.val_every=5",
    "infer.sw_batch_size=4",
    # the augmentations the demo was tuned with (blur, contrast, gamma and low resolution cost CPU time)
    "preprocess.augmentation.blur_prob=0",
    "preprocess.augmentation.contrast_prob=0",
    "preprocess.augmentation.gamma_prob=0",
    "preprocess.augmentation.lowres_prob=0",
)


def prepare_demo(out: str | Path, *, cases: int | None = None) -> Path:
    """Write the phantom dataset under ``out/data`` (skipped when already there) and return it."""
    data_dir = Path(out) / "data"
    n = cases or DEMO_CASES
    if (data_dir / "dataset.json").is_file() and len(list((data_dir / "imagesTr").glob("*.nii.gz"))) == n:
        log.info("demo data already in %s", data_dir)
        return data_dir
    log.info("writing %d phantom cases to %s", n, data_dir)
    return write_demo_dataset(data_dir, n=n, seed=0)


def demo_config(data_dir: Path, *, overrides: Sequence[str] = ()) -> PipelineConfig:
    return load_config(None, overrides=[*DEMO_SETTINGS, f"data.root={data_dir}", *overrides])
