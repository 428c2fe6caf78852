"""Study-level train/validation split: seeded, disjoint, written to split.json or read from a given file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StageError
from pipeline.fileio import read_json, write_json_atomic

SPLIT_NAME = "split.json"


def make_split(ids: Sequence[str], *, val_fraction: float, seed: int) -> dict[str, Any]:
    """Shuffle the sorted ids with ``seed`` and hold out ``round(n * val_fraction)`` (at least one each side)."""
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise StageError("study ids are not unique; the preprocess dataset.json lists a study twice")
    if len(unique) < 2:
        raise StageError(f"need at least 2 labelled studies to split into training and validation, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = min(max(1, round(len(unique) * val_fraction)), len(unique) - 1)
    validation = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return {"seed": int(seed), "train": train, "validation": validation}


def check_split(split: Any, ids: Sequence[str], *, source: str) -> dict[str, Any]:
    """Validate a split against the available study ids: both lists present, disjoint, all ids known."""
    if not isinstance(split, dict) or not isinstance(split.get("train"), list) \
            or not isinstance(split.get("validation"), list):
        raise ConfigError(f"{source}: a split must be a JSON object with 'train' and 'validation' lists of study ids")
    train, validation = [str(i) for i in split["train"]], [str(i) for i in split["validation"]]
    known = set(ids)
    unknown = sorted((set(train) | set(validation)) - known)
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} id(s) are not in the preprocessed dataset "
                          f"(e.g. {unknown[0]}); use the pseudonymous ids from the ingest manifest")
    overlap = sorted(set(train) & set(validation))
    if overlap:
        raise ConfigError(f"{source}: {len(overlap)} id(s) are in both train and validation (e.g. {overlap[0]})")
    if not train:
        raise ConfigError(f"{source}: the training list is empty")
    return {"seed": int(split.get("seed", 0)), "train": sorted(set(train)), "validation": sorted(set(validation))}


def read_split(path: str | os.PathLike[str], ids: Sequence[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.split_file {path} does not exist")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return check_split(data, ids, source=str(path))


def write_split(split: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    path = Path(folder) / SPLIT_NAME
    write_json_atomic(path, split)
    return path
