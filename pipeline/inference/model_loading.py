"""Loading model weights into networks: model.pt (weights only) into the network model.json names.

Finding model folders and reading model.json, which need no torch, live in
:mod:`pipeline.inference.model_files`; their names stay importable from here.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.fileio import sha256_file
from pipeline.inference.model_files import (
    FOLD_PREFIX,
    LEGACY_FLIP_AXES,
    MODEL_DIR,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ModelFiles,
    check_ensemble,
    fold_model_dirs,
    read_model_json,
    resolve_model_dir,
    resolve_model_dirs,
)
from pipeline.models.segmenters import build_segmenter

__all__ = ["FOLD_PREFIX", "LEGACY_FLIP_AXES", "MODEL_DIR", "MODEL_JSON", "MODEL_WEIGHTS", "ModelBundle",
           "fold_model_dirs", "load_model", "load_models", "load_state_dict", "read_model_json", "resolve_model_dir",
           "resolve_model_dirs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBundle(ModelFiles):
    """A loaded model folder: the network (eval mode, on CPU), its model.json and the weights' checksum."""

    network: nn.Module | None = None


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
                                  out_channels=int(meta["out_channels"]), plans=meta["plans"])
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: weights do not fit the network in model.json ({str(exc)[:300]})",
                              code="checkpoint_mismatch") from None
    network.eval()
    log.info("loaded model %s (sha256 %s)", folder, digest[:12])
    return ModelBundle(network=network, meta=meta, folder=folder, sha256=digest)


def load_models(model_dir: str | Path, *, folds: Sequence[int] | None = None) -> list[ModelBundle]:
    """Every model of :func:`resolve_model_dirs`, checked to share the plans and classes (an ensemble needs both)."""
    bundles = [load_model(folder) for folder in resolve_model_dirs(model_dir, folds=folds)]
    check_ensemble(bundles)
    return bundles
