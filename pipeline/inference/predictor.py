"""The predictor: sliding-window class probabilities (fold ensemble, mirroring TTA) mapped back onto each input's grid.

Probability maps (``save_probabilities``) are NIfTI 4D files on the input's grid and affine,
the class on the 4th axis, stored as uint8 with scl_slope 1/255: a reader gets p = q / 255,
within 0.5/255 of the float probability (per voxel the classes sum to 1 within K * 0.5/255).
They are the raw probabilities, before any largest-component postprocessing of the labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from pipeline.config import InferConfig
from pipeline.errors import CheckpointError, GeometryError, ManifestError
from pipeline.fileio import read_json
from pipeline.inference.ensemble import EnsembleWindow, Member, mirror_dims
from pipeline.inference.folder_inputs import label_folder
from pipeline.inference.model_loading import (
    LEGACY_FLIP_AXES,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ModelBundle,
    load_model,
    load_models,
    load_state_dict,
    read_model_json,
    resolve_model_dir,
    resolve_model_dirs,
)
from pipeline.inference.postprocess import keep_largest_component
from pipeline.io import nib
from pipeline.io.channels import channel_names, check_channels, load_case
from pipeline.io.nifti import write_image
from pipeline.io.volume import Volume
from pipeline.layout import PREDICTIONS_DIR, PREDICTIONS_JSON, PROBABILITIES_DIR
from pipeline.runtime import resolve_device
from pipeline.transforms.preprocessing import preprocessing_transforms

__all__ = [  # model loading lives in model_loading; its names stay importable from here
    "LEGACY_FLIP_AXES", "MODEL_JSON", "MODEL_WEIGHTS", "PREDICTIONS_DIR", "PREDICTIONS_JSON", "PROBABILITIES_DIR",
    "ModelBundle", "Prediction", "Predictor", "load_model", "load_models", "load_state_dict", "prediction_paths",
    "read_model_json", "read_predictions", "resample_to_grid", "resolve_model_dir", "resolve_model_dirs",
    "save_probability_map",
]

log = logging.getLogger(__name__)

PROBABILITY_SCALE = 255
_INTEGER_TOL = 1e-4
_MAX_DEVICE_OUTPUT = 1 << 28  # output voxels x classes kept on the accelerator while stitching windows


# ---- geometry ---------------------------------------------------------------------------------


def _signed_permutation(matrix: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(source axis, sign) per target axis when ``matrix`` is a signed permutation, else None."""
    rounded = np.rint(matrix)
    if not np.allclose(matrix, rounded, atol=_INTEGER_TOL):
        return None
    axes, signs = [], []
    for col in range(3):
        nz = np.flatnonzero(rounded[:, col])
        if len(nz) != 1 or abs(rounded[nz[0], col]) != 1:
            return None
        axes.append(int(nz[0]))
        signs.append(int(rounded[nz[0], col]))
    return (axes, signs) if sorted(axes) == [0, 1, 2] else None


def resample_to_grid(values: np.ndarray, *, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: tuple[int, int, int]) -> np.ndarray:
    """Resample channel-first ``values`` (C, X, Y, Z) from the ``src_affine`` grid onto ``dst_affine``/``dst_shape``.

    Both affines map voxel indices to the same world (RAS mm). When the target grid is the
    source grid up to axis permutations, flips and whole-voxel shifts, voxels are copied
    exactly; otherwise trilinear interpolation, extending edge values outside the source.
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    vox = np.linalg.inv(src_affine) @ dst_affine  # target voxel index -> source voxel index
    perm = _signed_permutation(vox[:3, :3])
    offset = vox[:3, 3]
    if perm is not None and np.allclose(offset, np.rint(offset), atol=_INTEGER_TOL):
        axes, signs = perm
        index = np.indices(dst_shape, sparse=True)
        src_index = []
        for src_axis in range(3):
            col = axes.index(src_axis)
            idx = signs[col] * index[col] + int(np.rint(offset[src_axis]))
            src_index.append(np.clip(idx, 0, values.shape[1 + src_axis] - 1))
        return np.ascontiguousarray(values[(slice(None), *src_index)])
    out = np.empty((values.shape[0], *dst_shape), dtype=np.float32)
    for c in range(values.shape[0]):
        ndimage.affine_transform(values[c].astype(np.float32, copy=False), vox[:3, :3], offset=offset,
                                 output_shape=dst_shape, output=out[c], order=1, mode="nearest")
    return out


# ---- prediction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Labels (uint8, the input's grid) and, when asked for, class probabilities (X, Y, Z, K float32, same grid)."""

    labels: Volume
    probabilities: Volume | None = None


class Predictor:
    """Segments volumes with one network or a fold ensemble: plans preprocessing, sliding window, mirroring
    TTA over ``flip_axes`` (when ``config.tta``), optional largest-component postprocessing, back to the input grid.
    """

    def __init__(self, network: nn.Module | Sequence[nn.Module], plans: dict[str, Any], *,
                 config: InferConfig | None = None, device: str | None = None,
                 flip_axes: Sequence[int] = LEGACY_FLIP_AXES, postprocess: Sequence[int] = ()) -> None:
        self.config = config or InferConfig()
        self.plans = dict(plans)
        self.device = torch.device(device or resolve_device(self.config.device))
        networks = [network] if isinstance(network, nn.Module) else list(network)
        if not networks:
            raise CheckpointError("no model to predict with; pass at least one network", code="model_missing")
        self.networks = [net.to(self.device).eval() for net in networks]
        self.network = self.networks[0]
        self.flip_axes = tuple(sorted(int(a) for a in flip_axes))
        mirrors = tuple(mirror_dims(self.flip_axes)) if self.config.tta else ((),)
        if self.config.tta and not self.flip_axes:
            log.info("infer: tta is on but the model was trained without mirroring (flip_axes []); no mirroring")
        self.window = EnsembleWindow([Member(net, mirrors) for net in self.networks])
        self.postprocess = tuple(sorted(int(c) for c in postprocess))
        self.roi_size = tuple(int(s) for s in self.plans["patch_size"])
        self.num_classes = int(self.plans.get("num_classes") or 2)
        # volumes arrive already loaded and validated by load_nifti
        self._transform = preprocessing_transforms(self.plans, keys=("image",), crop_foreground=False, load=False)

    @classmethod
    def from_bundles(cls, bundles: Sequence[ModelBundle], *, config: InferConfig | None = None,
                     postprocess: Sequence[int] = (), device: str | None = None) -> Predictor:
        """An ensemble of loaded models; mirroring uses the axes every member was trained with."""
        axes = set(bundles[0].flip_axes)
        for bundle in bundles[1:]:
            axes &= set(bundle.flip_axes)
        if any(set(b.flip_axes) != axes for b in bundles):
            log.warning("infer: the models were trained with different flip_axes; mirroring only %s", sorted(axes))
        return cls([b.network for b in bundles], bundles[0].plans, config=config, device=device,
                   flip_axes=sorted(axes), postprocess=postprocess)

    @classmethod
    def from_folder(cls, model_dir: str | Path, *, config: InferConfig | None = None,
                    postprocess: Sequence[int] = ()) -> tuple[Predictor, ModelBundle]:
        """One model folder (or a train folder holding ``model/``)."""
        bundle = load_model(model_dir)
        return cls.from_bundles([bundle], config=config, postprocess=postprocess), bundle

    @classmethod
    def from_models(cls, model_dir: str | Path, *, config: InferConfig | None = None,
                    postprocess: Sequence[int] = ()) -> tuple[Predictor, list[ModelBundle]]:
        """A model folder, or the fold models of a cross-validation train folder (``config.folds`` picks them)."""
        config = config or InferConfig()
        bundles = load_models(model_dir, folds=config.folds)
        return cls.from_bundles(bundles, config=config, postprocess=postprocess), bundles

    @property
    def channels(self) -> list[str] | None:
        """The input channels' names (images 4D, channel last), or None for 3D images of one channel."""
        return channel_names(self.plans)

    def load(self, path: str | Path | Sequence[str | Path]) -> Volume:
        """An input image, validated by ``load_nifti`` and checked to hold the plans' channels; a sequence of
        paths: one 3D file per channel, in order (nnU-Net v2's CASE_0000.nii.gz, ...), stacked."""
        return load_case(path, self.channels)

    def preprocess(self, volume: Volume) -> MetaTensor:
        """The volume on the plans' grid and intensities, channel first, with its affine."""
        check_channels(volume, self.channels, what="the input image")
        tensor = MetaTensor(torch.from_numpy(np.asarray(volume.array, dtype=np.float32).copy()),
                            affine=torch.from_numpy(volume.affine.copy()), meta={"space": "RAS"})
        return self._transform({"image": tensor})["image"]

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor | np.ndarray) -> np.ndarray:
        """Softmax class probabilities (K, X, Y, Z) of a preprocessed (C, X, Y, Z) image, on its grid.

        Averaged over the ensemble's models and (with ``tta``) mirrorings, per window, then
        stitched with the configured blending (Gaussian by default).
        """
        batch = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(self.device)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        # Large outputs are stitched in host memory so that big CT volumes fit on the GPU.
        stitch = self.device if batch[0, 0].numel() * self.num_classes <= _MAX_DEVICE_OUTPUT else torch.device("cpu")
        with amp:
            probs = sliding_window_inference(
                batch, roi_size=self.roi_size, sw_batch_size=self.config.sw_batch_size, predictor=self.window,
                overlap=self.config.overlap, mode=self.config.mode, sw_device=self.device, device=stitch,
            )
        return torch.as_tensor(probs)[0].float().cpu().numpy()

    def predict(self, volume: Volume, *, probabilities: bool = False) -> Prediction:
        """Labels (and probabilities) with exactly ``volume``'s shape and affine."""
        image = self.preprocess(volume)
        probs = self.probabilities(image)
        if probs.shape[0] > 255:
            raise GeometryError(f"{probs.shape[0]} classes do not fit a uint8 label image")
        back = resample_to_grid(probs, src_affine=np.asarray(image.affine, dtype=np.float64),
                                dst_affine=volume.affine, dst_shape=volume.spatial_shape)
        labels = np.argmax(back, axis=0).astype(np.uint8)
        if self.postprocess:
            labels = keep_largest_component(labels, self.postprocess)
        prob_volume = Volume(array=np.moveaxis(back, 0, -1), affine=volume.affine) if probabilities else None
        return Prediction(labels=Volume(array=labels, affine=volume.affine), probabilities=prob_volume)

    def predict_volume(self, volume: Volume) -> Volume:
        """A uint8 label volume with exactly ``volume``'s shape and affine."""
        return self.predict(volume).labels

    def predict_file(self, path: str | Path) -> Volume:
        return self.predict_volume(self.load(path))


def save_probability_map(probabilities: Volume, path: str | Path) -> Path:
    """Write (X, Y, Z, K) probabilities atomically as uint8 NIfTI with scl_slope 1/255 (see the module docstring)."""
    path = Path(path)
    quantised = np.rint(np.clip(probabilities.array, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint8)
    img = nib.Nifti1Image(quantised, probabilities.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(probabilities.affine, code=1)
    img.set_sform(probabilities.affine, code=1)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0 / PROBABILITY_SCALE, 0.0)
    return write_image(img, path)


# ---- the prediction index that evaluate and report read --------------------------------------


def read_predictions(folder: str | Path) -> dict[str, Any]:
    """An infer folder's predictions.json (ManifestError when unreadable)."""
    path = Path(folder) / PREDICTIONS_JSON
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read the prediction index ({exc}); run 'medpipe infer' again") from None
    if not isinstance(data, dict) or not isinstance(data.get("predictions"), list):
        raise ManifestError(f"{path}: not a medpipe predictions.json (no 'predictions' list)")
    return data


def prediction_paths(folder: str | Path) -> dict[str, Path]:
    """``{id: label file}`` of an infer folder (predictions.json) or a plain folder of label NIfTIs (id = file stem)."""
    folder = Path(folder)
    if (folder / PREDICTIONS_JSON).is_file():
        data = read_predictions(folder)
        return {str(p["id"]): folder / str(p["prediction"]) for p in data["predictions"]}
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder of predictions")
    return label_folder(folder)[0]  # refused files (a shared stem, a link leaving the folder) left out
