"""The predictor: load a model folder once, sliding-window prediction mapped back onto each input's grid; predictions.json."""

from __future__ import annotations

import itertools
import logging
import pickle
import zipfile
from collections.abc import Callable
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
from pipeline.fileio import read_json, sha256_file
from pipeline.io.nifti import is_nifti, load_nifti, nifti_stem
from pipeline.io.volume import Volume
from pipeline.models.segmenters import build_segmenter
from pipeline.runtime import resolve_device
from pipeline.transforms.preprocessing import preprocessing_transforms

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.pt"
PREDICTIONS_JSON = "predictions.json"
PREDICTIONS_DIR = "predictions"
_INTEGER_TOL = 1e-4
_MAX_DEVICE_OUTPUT = 1 << 28  # output voxels x classes kept on the accelerator while stitching windows


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model folder: the network (eval mode, on CPU), its model.json and the weights' checksum."""

    network: nn.Module
    meta: dict[str, Any]
    folder: Path
    sha256: str

    @property
    def plans(self) -> dict[str, Any]:
        return dict(self.meta["plans"])

    @property
    def labels(self) -> dict[str, str] | None:
        labels = self.meta.get("labels") or self.meta["plans"].get("labels")
        return {str(k): str(v) for k, v in labels.items()} if labels else None

    @property
    def num_classes(self) -> int:
        return int(self.meta["out_channels"])


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The folder holding model.json/model.pt: ``model_dir`` itself or its ``model/`` subfolder (03_train)."""
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir / "model"):
        if (candidate / MODEL_JSON).is_file():
            return candidate
    raise CheckpointError(
        f"no {MODEL_JSON} in {model_dir} or {model_dir / 'model'}; pass the trained model folder "
        "(RUN/03_train/model or RUN/03_train)",
        code="model_missing",
    )


def read_model_json(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_JSON
    try:
        meta = read_json(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); retrain or restore the model folder",
                              code="model_json_invalid") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object", code="model_json_invalid")
    missing = [k for k in ("network", "out_channels", "plans") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}", code="model_json_invalid")
    plans = meta["plans"]
    if not isinstance(plans, dict) or len(plans.get("patch_size") or meta.get("patch_size") or []) != 3:
        raise CheckpointError(f"{path}: plans must be an object with a 3-element patch_size", code="model_json_invalid")
    if "patch_size" not in plans:
        meta["plans"] = {**plans, "patch_size": meta["patch_size"]}
    return meta


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)``; anything but a plain state_dict is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights missing; retrain or restore the model folder",
                              code="model_missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt, truncated or not a plain weights file ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); retrain or restore it", code="checkpoint_corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a plain state_dict of tensors", code="checkpoint_corrupt")
    return state


def load_model(model_dir: str | Path) -> ModelBundle:
    """Read model.json, build the network it names and load model.pt into it (eval mode, CPU)."""
    folder = resolve_model_dir(model_dir)
    meta = read_model_json(folder)
    weights = folder / MODEL_WEIGHTS
    state = load_state_dict(weights)
    digest = sha256_file(weights)
    expected = meta.get("sha256")
    if isinstance(expected, str) and expected != digest:
        raise CheckpointError(f"{weights}: checksum {digest[:12]} differs from the one in model.json "
                              f"({expected[:12]}); the weights were changed", code="checkpoint_tampered")
    try:
        network = build_segmenter(meta["network"], in_channels=int(meta.get("in_channels", 1)),
                                  out_channels=int(meta["out_channels"]))
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: weights do not fit the network in model.json ({str(exc)[:300]})",
                              code="checkpoint_mismatch") from None
    network.eval()
    log.info("loaded model %s (sha256 %s)", folder.name, digest[:12])
    return ModelBundle(network=network, meta=meta, folder=folder, sha256=digest)


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


class Predictor:
    """Segments volumes with one network: plans preprocessing, sliding window, optional flip TTA, back to the input grid."""

    def __init__(self, network: nn.Module, plans: dict[str, Any], *, config: InferConfig | None = None,
                 device: str | None = None) -> None:
        self.config = config or InferConfig()
        self.plans = dict(plans)
        self.device = torch.device(device or resolve_device(self.config.device))
        self.network = network.to(self.device).eval()
        self.roi_size = tuple(int(s) for s in self.plans["patch_size"])
        self.num_classes = int(self.plans.get("num_classes") or 2)
        # volumes arrive already loaded and validated by load_nifti
        self._transform = preprocessing_transforms(self.plans, keys=("image",), crop_foreground=False, load=False)

    @classmethod
    def from_folder(cls, model_dir: str | Path, *, config: InferConfig | None = None) -> tuple[Predictor, ModelBundle]:
        bundle = load_model(model_dir)
        return cls(bundle.network, bundle.plans, config=config), bundle

    def preprocess(self, volume: Volume) -> MetaTensor:
        """The volume on the plans' grid and intensities, channel first, with its affine."""
        tensor = MetaTensor(torch.from_numpy(np.asarray(volume.array, dtype=np.float32).copy()),
                            affine=torch.from_numpy(volume.affine.copy()), meta={"space": "RAS"})
        return self._transform({"image": tensor})["image"]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        run: Callable[[torch.Tensor], torch.Tensor] = self.network
        # Large outputs are stitched in host memory so that big CT volumes fit on the GPU.
        stitch = self.device if batch[0, 0].numel() * self.num_classes <= _MAX_DEVICE_OUTPUT else torch.device("cpu")
        return sliding_window_inference(
            batch, roi_size=self.roi_size, sw_batch_size=self.config.sw_batch_size, predictor=run,
            overlap=self.config.overlap, mode=self.config.mode, sw_device=self.device, device=stitch,
        )

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> np.ndarray:
        """Softmax class probabilities (K, X, Y, Z) on the preprocessed grid; flip TTA averages mirrored passes."""
        batch = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(self.device)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        flips: list[tuple[int, ...]] = []
        if self.config.tta:
            flips = [combo for r in (1, 2, 3) for combo in itertools.combinations((2, 3, 4), r)]
        with amp:
            total = torch.softmax(self._forward(batch).float(), dim=1)
            for dims in flips:
                probs = torch.softmax(self._forward(torch.flip(batch, dims)).float(), dim=1)
                total = total + torch.flip(probs, dims)
        return (total / (1 + len(flips)))[0].cpu().numpy().astype(np.float32, copy=False)

    def predict_volume(self, volume: Volume) -> Volume:
        """A uint8 label volume with exactly ``volume``'s shape and affine."""
        image = self.preprocess(volume)
        probs = self.probabilities(image)
        back = resample_to_grid(probs, src_affine=np.asarray(image.affine, dtype=np.float64),
                                dst_affine=volume.affine, dst_shape=volume.spatial_shape)
        if probs.shape[0] > 255:
            raise GeometryError(f"{probs.shape[0]} classes do not fit a uint8 label image")
        labels = np.argmax(back, axis=0).astype(np.uint8)
        return Volume(array=labels, affine=volume.affine)

    def predict_file(self, path: str | Path) -> Volume:
        return self.predict_volume(load_nifti(path))


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
    """``{id: label file}`` for an infer folder (predictions.json) or a plain folder of label NIfTIs (id = file stem)."""
    folder = Path(folder)
    if (folder / PREDICTIONS_JSON).is_file():
        data = read_predictions(folder)
        return {str(p["id"]): folder / str(p["prediction"]) for p in data["predictions"]}
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder of predictions")
    return {nifti_stem(p): p for p in sorted(folder.rglob("*"))
            if p.is_file() and is_nifti(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
