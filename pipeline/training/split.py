"""Study-level splits: one seeded train/validation split or k cross-validation folds, made or read from a file."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StageError
from pipeline.fileio import read_json, write_json_atomic

log = logging.getLogger(__name__)

SPLIT_NAME = "split.json"


def make_split(ids: Sequence[str], *, val_fraction: float, seed: int) -> dict[str, Any]:
    """Shuffle the sorted ids with ``seed`` and hold out ``round(n * val_fraction)`` (at least one each side)."""
    unique = _unique_sorted(ids)
    if len(unique) < 2:
        raise StageError(f"need at least 2 labelled studies to split into training and validation, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = min(max(1, round(len(unique) * val_fraction)), len(unique) - 1)
    validation = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return {"seed": int(seed), "train": train, "validation": validation}


def make_folds(ids: Sequence[str], *, num_folds: int, seed: int) -> list[dict[str, Any]]:
    """Seeded k-fold cross-validation over the sorted ids: a permutation cut into ``num_folds`` near-equal parts.

    Fold k validates on part k and trains on the others, so the validation sets are disjoint
    and together cover every id; the same ids and seed always give the same folds.
    """
    unique = _unique_sorted(ids)
    if num_folds < 2:
        raise ConfigError(f"train.num_folds is {num_folds}; cross-validation needs at least 2 folds")
    if len(unique) < num_folds:
        raise StageError(f"{len(unique)} labelled studies cannot be split into {num_folds} folds; lower "
                         "train.num_folds or add studies")
    order = np.random.default_rng(seed).permutation(len(unique))
    parts = [sorted(unique[i] for i in part) for part in np.array_split(order, num_folds)]
    folds = []
    for k, validation in enumerate(parts):
        held = set(validation)
        folds.append({"seed": int(seed), "fold": k, "num_folds": num_folds,
                      "train": [i for i in unique if i not in held], "validation": validation})
    return folds


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


def _read(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.split_file {path} does not exist")
    try:
        return path, read_json(path)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def read_split(path: str | os.PathLike[str], ids: Sequence[str]) -> dict[str, Any]:
    """A single ``{"train", "validation"}`` split file, checked against ``ids``."""
    path, data = _read(path)
    return check_split(data, ids, source=str(path))


def is_multifold(data: Any) -> bool:
    return isinstance(data, dict) and "folds" in data


def _source_map(entries: Sequence[Mapping[str, Any]], path: Path) -> dict[str, str]:
    missing = [str(e.get("id")) for e in entries if not e.get("source")]
    if missing:
        raise ConfigError(f"{path} lists studies by source, but the preprocess dataset.json has no 'source' for "
                          f"{len(missing)} studies (e.g. {missing[0]}); run 'medpipe preprocess --force' with "
                          "this version to record them, or use a split keyed by study id (\"key\": \"id\")")
    by_source: dict[str, str] = {}
    for entry in entries:
        source = str(entry["source"])
        if source in by_source:
            raise ConfigError(f"{path}: studies {by_source[source]} and {entry['id']} share the source {source}; "
                              "key the split by study id (\"key\": \"id\") instead")
        by_source[source] = str(entry["id"])
    return by_source


def read_folds(path: str | os.PathLike[str], entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The folds of a split file, as study ids checked against the preprocessed ``entries``.

    A file is either one split ``{"train": [...], "validation": [...]}`` (one fold) or
    ``{"key": "id"|"source", "folds": [{"train": [...], "validation": [...]}, ...]}``. With
    ``key: source`` the lists name the ingest manifest's source paths (dataset.json's
    ``source``); a source absent from the dataset (a study that failed ingest or was left
    out) is dropped with a warning. With ``key: id`` an unknown id is a ConfigError.
    """
    path, data = _read(path)
    ids = [str(e["id"]) for e in entries]
    if not is_multifold(data):
        return [{**check_split(data, ids, source=str(path)), "fold": 0, "num_folds": 1}]
    key = data.get("key", "id")
    folds = data.get("folds")
    if key not in ("id", "source"):
        raise ConfigError(f"{path}: 'key' is '{key}'; use \"id\" (study ids) or \"source\" (ingest source paths)")
    if not isinstance(folds, list) or not folds:
        raise ConfigError(f"{path}: 'folds' must be a non-empty list of {{'train': [...], 'validation': [...]}}")
    seed = int(data.get("seed", 0))
    to_id = _source_map(entries, path) if key == "source" else {i: i for i in ids}
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) \
                or not isinstance(fold.get("validation"), list):
            raise ConfigError(f"{path} fold {k}: each fold is an object with 'train' and 'validation' lists")
    named = {str(n) for fold in folds for part in ("train", "validation") for n in fold[part]}
    if key == "source" and named and not named & set(to_id):
        raise ConfigError(f"{path}: none of its sources is in the preprocessed dataset (e.g. {sorted(named)[0]}); "
                          "the sources are paths relative to the folder given to ingest")
    dropped: set[str] = set()
    out = []
    for k, fold in enumerate(folds):
        where = f"{path} fold {k}"
        mapped: dict[str, list[str]] = {}
        for part in ("train", "validation"):
            names = [str(n) for n in fold[part]]
            unknown = [n for n in names if n not in to_id]
            if unknown and key == "id":
                raise ConfigError(f"{where}: {len(unknown)} id(s) are not in the preprocessed dataset (e.g. "
                                  f"{unknown[0]}); use the pseudonymous ids from the ingest manifest")
            dropped.update(unknown)
            mapped[part] = [to_id[n] for n in names if n in to_id]
        split = check_split({"seed": seed, **mapped}, ids, source=where)
        out.append({**split, "fold": k, "num_folds": len(folds)})
    validated = [i for fold in out for i in fold["validation"]]
    if len(set(validated)) != len(validated):
        log.warning("%s: some studies are in the validation list of more than one fold; the folds are not a "
                    "partition and pooled cross-validation means count those studies more than once", path)
    if dropped:
        log.warning("%s: %d source(s) are not in the preprocessed dataset (failed or left out at ingest) and are "
                    "dropped: %s", path, len(dropped), ", ".join(sorted(dropped)[:5]))
    return out


def resolve_folds(entries: Sequence[Mapping[str, Any]], *, split_file: str | os.PathLike[str] | None,
                  num_folds: int, seed: int) -> list[dict[str, Any]]:
    """The cross-validation folds: those of ``split_file`` (when it has several), else seeded k-fold."""
    if split_file is not None:
        folds = read_folds(split_file, entries)
        if len(folds) == 1 and folds[0]["num_folds"] == 1:
            raise ConfigError(f"{split_file} holds one train/validation split, not folds; set train.fold to null "
                              "to train on it, or give a file with \"folds\"")
        return folds
    return make_folds([str(e["id"]) for e in entries], num_folds=num_folds, seed=seed)


def resolve_split(entries: Sequence[Mapping[str, Any]], *, split_file: str | os.PathLike[str] | None,
                  val_fraction: float, seed: int) -> dict[str, Any]:
    """The single split of a ``train.fold: null`` run: ``split_file``'s, else a seeded random hold-out."""
    ids = [str(e["id"]) for e in entries]
    if split_file is None:
        return make_split(ids, val_fraction=val_fraction, seed=seed)
    path, data = _read(split_file)
    if is_multifold(data):
        raise ConfigError(f"{path} holds {len(data.get('folds') or [])} cross-validation folds; set train.fold "
                          "to a fold index or 'all'")
    return check_split(data, ids, source=str(path))


def _unique_sorted(ids: Sequence[str]) -> list[str]:
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise StageError("study ids are not unique; the preprocess dataset.json lists a study twice")
    return unique


def write_split(split: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    path = Path(folder) / SPLIT_NAME
    write_json_atomic(path, split)
    return path
