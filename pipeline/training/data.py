"""Datasets and loaders over the preprocess stage's files (plans.json, dataset.json, data/*.nii.gz)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader

from pipeline.errors import ManifestError, StageError
from pipeline.fileio import read_json
from pipeline.io.nifti import load_nifti

PLANS_NAME = "plans.json"
DATASET_NAME = "dataset.json"


def read_preprocessed(preprocess_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The plans and the dataset entries (id, image, label) of a preprocess folder, checked."""
    folder = Path(preprocess_dir)
    plans_path, dataset_path = folder / PLANS_NAME, folder / DATASET_NAME
    for path in (plans_path, dataset_path):
        if not path.is_file():
            raise ManifestError(f"{path} is missing; run 'medpipe preprocess' into {folder} first")
    try:
        plans, dataset = read_json(plans_path), read_json(dataset_path)
    except ValueError as exc:
        raise ManifestError(f"{folder}: plans.json or dataset.json is not valid JSON ({exc}); rerun preprocess") \
            from None
    if not isinstance(plans, dict) or "num_classes" not in plans or "patch_size" not in plans:
        raise ManifestError(f"{plans_path}: not a medpipe plans file (needs num_classes and patch_size)")
    entries = dataset.get("studies") if isinstance(dataset, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{dataset_path}: expected {{'studies': [...]}}")
    root = folder.resolve()
    for entry in entries:
        if not isinstance(entry, dict) or not {"id", "image", "label"} <= set(entry):
            raise ManifestError(f"{dataset_path}: every study needs id, image and label")
        for key in ("image", "label"):
            path = (folder / entry[key]).resolve()
            if not path.is_relative_to(root):
                raise ManifestError(f"{dataset_path}: study {entry['id']} {key} path leaves the preprocess folder")
    return plans, entries


class LoadPreprocessedd(mt.MapTransform):
    """Read preprocessed NIfTI files (validated by ``load_nifti``) into channel-first float32 arrays."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = np.asarray(load_nifti(out[key]).array, dtype=np.float32)[np.newaxis]
        return out


def study_items(preprocess_dir: str | Path, entries: Sequence[dict[str, str]], ids: Sequence[str]) -> list[dict]:
    """``{"id", "image": path, "label": path}`` for the given ids, in the order given."""
    by_id = {e["id"]: e for e in entries}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise StageError(f"{len(missing)} study id(s) of the split are not in dataset.json (e.g. {missing[0]}); "
                         "the split and the preprocessed data disagree")
    folder = Path(preprocess_dir)
    return [{"id": i, "image": str(folder / by_id[i]["image"]), "label": str(folder / by_id[i]["label"])}
            for i in ids]


def train_dataset(items: Sequence[dict], transform: mt.Compose) -> CacheDataset:
    """Cache the deterministic head of ``transform`` (loading, padding, class indices) for every volume."""
    full = mt.Compose([LoadPreprocessedd(keys=["image", "label"]), *transform.transforms])
    return CacheDataset(data=list(items), transform=full, cache_rate=1.0, num_workers=0, progress=False,
                        copy_cache=True)


def train_loader(dataset: CacheDataset, *, batch_size: int, num_workers: int,
                 generator: torch.Generator) -> DataLoader:
    """Shuffled batches of ``batch_size`` volumes (each gives samples_per_volume patches); seeded by ``generator``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator,
                      drop_last=len(dataset) > batch_size, pin_memory=torch.cuda.is_available())


def validation_volumes(items: Sequence[dict]) -> list[dict[str, Any]]:
    """Whole validation volumes as ``(1, 1, X, Y, Z)`` tensors."""
    load = LoadPreprocessedd(keys=["image", "label"])
    out = []
    for item in items:
        data = load(item)
        out.append({"id": item["id"], "image": torch.from_numpy(data["image"][np.newaxis]),
                    "label": torch.from_numpy(data["label"][np.newaxis])})
    return out
