"""Preprocessing transforms: loading in the file's voxel order gives exactly the values of C-ordered loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.transforms.preprocessing import preprocessing_transforms


def _study(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(4)
    affine = np.array([[-0.9, 0, 0, 10.0], [0, 0.8, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])  # flips an axis
    image = rng.normal(40.0, 30.0, size=(23, 17, 11)).astype(np.float32)
    label = (image > 60).astype(np.uint8)
    save_nifti(Volume(image, affine), tmp_path / "image.nii.gz", dtype=np.float32)
    save_nifti(Volume(label, affine), tmp_path / "label.nii.gz", dtype=np.uint8)
    return {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}


@pytest.mark.parametrize("normalization", ["ct", "zscore", "none"])
@pytest.mark.parametrize("spacing", [None, [1.3, 0.7, 2.0]])
def test_file_order_gives_the_same_values(tmp_path: Path, normalization: str, spacing: list[float] | None) -> None:
    plans = {"normalization": normalization, "modality": "CT", "orientation": "RAS", "target_spacing": spacing,
             "crop_foreground": True, "intensity": {"p005": 0.0, "p995": 90.0, "mean": 45.0, "std": 20.0}}
    study = _study(tmp_path)
    c_order = preprocessing_transforms(plans)(dict(study))
    file_order = preprocessing_transforms(plans, file_order=True)(dict(study))
    for key in ("image", "label"):
        assert file_order[key].shape == c_order[key].shape
        np.testing.assert_array_equal(file_order[key].numpy(), c_order[key].numpy())  # exact, not close
        np.testing.assert_array_equal(file_order[key].affine.numpy(), c_order[key].affine.numpy())
    strided = not file_order["image"].is_contiguous()
    assert strided == (normalization != "zscore" and spacing is None)  # zscore sums voxels: loaded C-ordered
