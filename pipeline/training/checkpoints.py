"""Training checkpoints: atomic save with last/previous rotation, weights-only loading, last-good fallback."""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medpipe-train-checkpoint-v1"
LAST = "last.pt"
PREVIOUS = "previous.pt"
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer")
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile,
                AttributeError, TypeError)


def rng_state(*, loader: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, plus the data loader's generator when given, as tensors and
    plain values (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader is not None:
        state["loader"] = loader.get_state()
    return state


def restore_rng_state(state: dict[str, Any], *, loader: torch.Generator | None = None) -> None:
    """Undo :func:`rng_state` (``loader``: the generator to restore the saved loader state into); missing parts
    are left as they are."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        nps = state["numpy"]
        np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                             nps["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and loader is not None:
        loader.set_state(state["loader"])


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``folder/last.pt`` atomically, keeping the one it replaces as ``previous.pt``.

    A crash at any moment leaves a loadable ``last.pt`` or ``previous.pt``, never a partial file
    under either name.
    """
    folder = Path(folder)
    last, previous = folder / LAST, folder / PREVIOUS
    payload = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_path(last) as tmp:
        torch.save(payload, tmp)
        if last.is_file():
            os.replace(last, previous)
    return last


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values "
                              f"(weights-only loading failed: {str(exc).splitlines()[0]}); use a checkpoint "
                              "written by medpipe", code="checkpoint_unsafe") from None
    except _LOAD_ERRORS as exc:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              "delete it or let training fall back to the previous checkpoint",
                              code="checkpoint_corrupt") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; CheckpointError when missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint", code="checkpoint_missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (a write was cut short)", code="checkpoint_corrupt")
    state = _load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a medpipe training checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})",
                              code="checkpoint_foreign")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}", code="checkpoint_incomplete")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path}: 'model' is not a state_dict of tensors", code="checkpoint_incomplete")
    return state


def load_latest(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint in ``folder`` (``last.pt``, else ``previous.pt``), or None to start fresh."""
    folder = Path(folder)
    candidates = [folder / LAST, folder / PREVIOUS]
    if not any(p.exists() for p in candidates):
        return None
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("%s", exc)
            continue
        if path.name != LAST:
            log.warning("falling back to %s (epoch %s)", path, state.get("epoch"))
        return state, path
    log.warning("no usable checkpoint in %s; training starts from scratch", folder)
    return None


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a plain state_dict atomically (tensors moved to the CPU)."""
    path = Path(path)
    cpu = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    buffer = io.BytesIO()  # saved to a file, torch names the archive after the (random) temporary file name
    torch.save(cpu, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain state_dict with ``weights_only=True``; CheckpointError when unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file", code="checkpoint_missing")
    state = _load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors", code="checkpoint_incomplete")
    return state
