"""Model folders without torch: finding them (one model or a cross-validation's folds), model.json, checksums.

What a command needs to know about a model before (or instead of) loading it: the worker
processes or Ray actors that predict load the weights themselves, so the command that sends
them studies need not import torch at all (seconds on a CPU machine).
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.fileio import read_json, sha256_file

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.pt"
MODEL_DIR = "model"
FOLD_PREFIX = "fold_"
LEGACY_FLIP_AXES = (0, 1, 2)  # model.json without "flip_axes": trained with every axis mirrored
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


@dataclass(frozen=True)
class ModelFiles:
    """A model folder as read without torch: its model.json and the weights' checksum."""

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

    @property
    def fold(self) -> int | None:
        """model.json's fold, else the one its folder ``fold_k/model`` names; None for a single-split model."""
        fold = self.meta.get("fold")
        if fold is not None:
            return int(fold)
        match = _FOLD_DIR.match(self.folder.parent.name)
        return int(match.group(1)) if match else None

    @property
    def flip_axes(self) -> tuple[int, ...]:
        """The axes (of the preprocessed array) mirrored in training, which mirroring TTA may use."""
        axes = self.meta.get("flip_axes")
        return LEGACY_FLIP_AXES if axes is None else tuple(sorted(int(a) for a in axes))


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The folder holding model.json/model.pt: ``model_dir`` itself or its ``model/`` subfolder (03_train)."""
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir / MODEL_DIR):
        if (candidate / MODEL_JSON).is_file():
            return candidate
    raise CheckpointError(
        f"no {MODEL_JSON} in {model_dir} or {model_dir / MODEL_DIR}; pass the trained model folder "
        "(RUN/03_train/model or RUN/03_train)",
        code="model_missing",
    )


def fold_model_dirs(train_dir: str | Path) -> dict[int, Path]:
    """``{k: train_dir/fold_k/model}`` for every fold folder (finished or not), by fold number."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        return {}
    found = {}
    for child in train_dir.iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child / MODEL_DIR
    return dict(sorted(found.items()))


def resolve_model_dirs(model_dir: str | Path, *, folds: Sequence[int] | None = None) -> list[Path]:
    """The model folder(s) to predict with: one model, or the folds of a cross-validation (an ensemble).

    ``model_dir`` is a model folder, a train folder holding ``model/``, or a train folder holding
    ``fold_k/model`` folders (``TRAIN/model`` of a cross-validation run, which has no such
    folder, means its folds). ``folds`` picks fold models (all finished ones when None); a fold
    asked for but not trained is a CheckpointError naming it.
    """
    model_dir = Path(model_dir)
    if folds is None:
        for candidate in (model_dir, model_dir / MODEL_DIR):
            if (candidate / MODEL_JSON).is_file():
                return [candidate]
    train_dir = model_dir
    if not fold_model_dirs(train_dir) and model_dir.name == MODEL_DIR and not model_dir.exists():
        train_dir = model_dir.parent
    available = fold_model_dirs(train_dir)
    finished = {k: p for k, p in available.items() if (p / MODEL_JSON).is_file()}
    if folds is not None:
        if not available and (model_dir / MODEL_JSON).is_file():  # a single fold's model folder
            meta = read_model_json(model_dir)
            if meta.get("fold") in set(folds):
                return [model_dir]
        missing = sorted(set(folds) - set(finished))
        if missing:
            have = ", ".join(str(k) for k in finished) or "none"
            raise CheckpointError(f"fold(s) {', '.join(map(str, missing))} have no trained model under {train_dir} "
                                  f"(trained folds: {have}); train them (train.fold=k) or change infer.folds",
                                  code="model_missing")
        return [finished[k] for k in sorted(set(folds))]
    if not finished:
        resolve_model_dir(model_dir)  # raises the usual "no model.json" error
    unfinished = sorted(set(available) - set(finished))
    if unfinished:
        log.warning("infer: fold(s) %s under %s have no model yet and are left out of the ensemble",
                    ", ".join(map(str, unfinished)), train_dir)
    return list(finished.values())


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
    axes = meta.get("flip_axes")
    if axes is not None and (not isinstance(axes, list) or any(a not in (0, 1, 2) for a in axes)):
        raise CheckpointError(f"{path}: flip_axes must list spatial axes among 0, 1, 2", code="model_json_invalid")
    return meta


def checked_weights(folder: Path, meta: dict[str, Any]) -> str:
    """The SHA-256 of ``folder/model.pt``, checked against model.json's and as a whole zip archive (the format
    torch saves in), without loading it: a missing, changed or truncated file is a CheckpointError."""
    weights = folder / MODEL_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: model weights missing; retrain or restore the model folder",
                              code="model_missing")
    digest = sha256_file(weights)
    expected = meta.get("sha256")
    if isinstance(expected, str) and expected != digest:
        raise CheckpointError(f"{weights}: checksum {digest[:12]} differs from the one in model.json "
                              f"({expected[:12]}); the weights were changed", code="checkpoint_tampered")
    try:
        with zipfile.ZipFile(weights) as archive:
            bad = archive.testzip()  # every member's CRC
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        bad = f"{type(exc).__name__}: {exc}"
    if bad is not None:
        raise CheckpointError(f"{weights}: corrupt or truncated ({str(bad)[:200]}); retrain or restore it",
                              code="checkpoint_corrupt")
    return digest


def read_model_files(model_dir: str | Path, *, folds: Sequence[int] | None = None) -> list[ModelFiles]:
    """Every model of :func:`resolve_model_dirs` as model.json and checked weights, without loading them;
    checked to share the plans and classes (an ensemble needs both)."""
    found = []
    for folder in resolve_model_dirs(model_dir, folds=folds):
        meta = read_model_json(folder)
        found.append(ModelFiles(meta=meta, folder=folder, sha256=checked_weights(folder, meta)))
    check_ensemble(found)
    return found


def check_ensemble(models: Sequence[ModelFiles]) -> None:
    first = models[0]
    for other in models[1:]:
        if other.num_classes != first.num_classes or _plans_core(other.plans) != _plans_core(first.plans):
            raise CheckpointError(f"{other.folder} and {first.folder} were trained on different plans or classes; "
                                  "an ensemble needs models of one preprocessing (retrain, or pick infer.folds)",
                                  code="ensemble_mismatch")


def common_flip_axes(models: Sequence[ModelFiles]) -> tuple[int, ...]:
    """The axes every member was trained to mirror (the only ones mirroring TTA may use)."""
    axes = set(models[0].flip_axes)
    for model in models[1:]:
        axes &= set(model.flip_axes)
    if any(set(m.flip_axes) != axes for m in models):
        log.warning("infer: the models were trained with different flip_axes; mirroring only %s", sorted(axes))
    return tuple(sorted(axes))


def is_classification_model(model_dir: str | Path) -> bool:
    """True when ``model_dir`` (or its ``model/``) holds a model.json with ``"task": "classification"``."""
    for folder in (Path(model_dir), Path(model_dir) / MODEL_DIR):
        meta = folder / MODEL_JSON
        if meta.is_file():
            try:
                return read_json(meta).get("task") == "classification"
            except (ValueError, AttributeError):
                return False
    return False


def _plans_core(plans: dict[str, Any]) -> dict[str, Any]:
    """What an ensemble's members must share: preprocessing and sliding-window patch (not the training batch)."""
    return {k: v for k, v in plans.items() if k != "batch_size"}
