"""Datasets and loaders over the preprocess stage's files (plans.json, dataset.json, data/*.nii.gz)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, get_track_meta, list_data_collate, set_track_meta
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from pipeline.errors import ConfigError, ManifestError, StageError
from pipeline.fileio import read_json
from pipeline.io.channels import channel_first, load_channels
from pipeline.io.nifti import load_nifti
from pipeline.manifest import MANIFEST_NAME

PLANS_NAME = "plans.json"
DATASET_NAME = "dataset.json"


def read_preprocessed(preprocess_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The plans and the dataset entries (id, image, label) of a preprocess folder, checked."""
    folder = Path(preprocess_dir)
    plans_path, dataset_path = folder / PLANS_NAME, folder / DATASET_NAME
    for path in (plans_path, dataset_path):
        if not path.is_file():
            ingested = (folder / MANIFEST_NAME).is_file()  # a step skipped: say which command comes first
            raise ManifestError(f"{path} is missing: {folder} is {'an ingest folder, ' if ingested else ''}not a "
                                f"preprocess folder; run 'medpipe preprocess {folder if ingested else 'INGEST'} --out "
                                "PREPROCESS' and train on PREPROCESS")
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
    """Read preprocessed NIfTI files (validated by ``load_nifti``) into channel-first float32 arrays; the first
    key's holds the plans' ``channels`` (4D, channel last, in the file), the others one channel."""

    def __init__(self, keys: Sequence[str], *, channels: Sequence[str] | None = None) -> None:
        super().__init__(keys)
        self.channels = list(channels) if channels else None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for number, key in enumerate(self.key_iterator(out)):
            volume = load_channels(out[key], self.channels) if number == 0 else load_nifti(out[key])
            out[key] = np.ascontiguousarray(channel_first(np.asarray(volume.array, dtype=np.float32)))
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


def train_dataset(items: Sequence[dict], transform: mt.Compose, *, cache_threads: int | None = None,
                  channels: Sequence[str] | None = None) -> CacheDataset:
    """Cache the deterministic head of ``transform`` (loading, padding, class indices) for every volume.

    The cache is read, never copied, per sample (the patch sampler crops copies), and worker
    processes are persistent (see ``train_loader``), so it is not duplicated per worker or epoch.
    """
    full = mt.Compose([LoadPreprocessedd(keys=["image", "label"], channels=channels), *transform.transforms])
    threads = cache_threads if cache_threads is not None else min(4, available_cpus())
    return CacheDataset(data=list(items), transform=full, cache_rate=1.0, num_workers=max(threads, 1),
                        progress=False, copy_cache=False)


def validation_volumes(items: Sequence[dict], *, channels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Whole validation volumes as ``(1, C, X, Y, Z)`` tensors (labels ``(1, 1, X, Y, Z)``)."""
    load = LoadPreprocessedd(keys=["image", "label"], channels=channels)
    out = []
    for item in items:
        data = load(item)
        out.append({"id": item["id"], "image": torch.from_numpy(data["image"][np.newaxis]),
                    "label": torch.from_numpy(data["label"][np.newaxis])})
    return out


# --- loading: per-sample seeds, persistent worker processes, optional distributed split -----------------

AUTO_MAX_WORKERS = 8  # automatic worker count: one per core but one, at most this many
PREFETCH_FACTOR = 4  # batches each worker keeps ready


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def resolve_num_workers(requested: int | None) -> int:
    """``requested`` loader worker processes, or when ``None`` one per usable core but one, at most 8.

    Measured on a busy 2-core machine (benchmarks/dataloader.py, CPU training): one worker hid the
    batch preparation (wait 2 ms instead of 30-60 ms per step, step time ratio 1.04-1.06 against
    1.07-1.10 without); a single-core machine gets none.
    """
    if requested is not None:
        if int(requested) < 0:
            raise ConfigError(f"train.num_workers must be 0 or more (or null for automatic), not {requested}")
        return int(requested)
    return min(AUTO_MAX_WORKERS, available_cpus() - 1)


class SeededSampler(DistributedSampler):
    """Shuffled ``(index, sample_seed)`` pairs (this rank's share of them).

    Each pass draws one number from ``generator`` and from it a seed per position, so the patches
    and augmentations of a sample depend only on the generator's state, never on the number of
    worker processes. One process: the permutation comes from the same draw (mixed with the
    epoch of ``set_epoch``). Several (``world_size > 1``): as ``DistributedSampler``, the
    permutation comes from ``shuffle_seed`` and ``set_epoch``'s epoch, so it is shared even when
    each rank seeds its generator differently; rank r takes positions r, r + world_size, ...
    (padded to equal lengths). Call ``set_epoch(epoch)`` every epoch there.
    """

    def __init__(self, dataset: Dataset, *, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                 shuffle_seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=shuffle_seed,
                         drop_last=False)
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        rng = torch.Generator().manual_seed((base + 1_000_003 * int(self.epoch)) % 2**63)
        if self.num_replicas > 1:
            shared = torch.Generator().manual_seed(int(self.seed) + int(self.epoch))
        else:
            shared = rng
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=shared).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.total_size,), generator=rng).tolist()
        if n and self.total_size > n:
            order = (order * math.ceil(self.total_size / n))[: self.total_size]
        return iter([(order[i], seeds[i]) for i in range(self.rank, self.total_size, self.num_replicas)])


@contextmanager
def _data_context() -> Iterator[None]:
    """One thread and no MONAI metadata while transforms or collation run in the main process.

    Workers already run that way (see ``_seed_worker``); in the main process (``num_workers=0``)
    the many small tensor operations of the augmentation ran 10-20x slower on two OpenMP threads
    of a busy 2-core machine, and MetaTensor bookkeeping cost about a third of the rest
    (benchmarks/dataloader.py).
    """
    if get_worker_info() is not None:
        yield
        return
    threads, track_meta = torch.get_num_threads(), get_track_meta()
    torch.set_num_threads(1)
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(track_meta)
        torch.set_num_threads(threads)


class _SeededItems(Dataset):
    """Reseed the dataset's random transforms with the sampler's per-sample seed, then fetch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        with _data_context():
            return self.dataset[index]


def _collate(batch: list) -> Any:
    with _data_context():
        return list_data_collate(batch)


def _seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy's global state in a worker from torch's per-worker seed (base + id);
    transforms there produce plain tensors (no MONAI metadata), as in ``_data_context``."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    set_track_meta(False)


def train_loader(dataset: Dataset, *, batch_size: int, num_workers: int | None, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1, shuffle_seed: int = 0) -> DataLoader:
    """Shuffled batches of ``batch_size`` volumes (each gives samples_per_volume patches).

    The order and every random transform come from ``generator`` (see ``SeededSampler``): the
    batches are identical for any ``num_workers``. Reseed the generator before each epoch (what
    ``run_training`` does) and, with ``world_size > 1`` (each rank gets its share of a permutation
    common to all ranks), call ``loader.sampler.set_epoch(epoch)`` too, as with
    ``DistributedSampler``; that shared permutation comes from ``shuffle_seed`` (the run's seed, the
    same on every rank). Worker processes (``None``: ``resolve_num_workers``) are persistent,
    so the cached dataset is forked once, not per epoch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not one of the {world_size} processes of the run")
    workers = resolve_num_workers(num_workers)
    sampler = SeededSampler(dataset, generator=generator, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed)
    worker_seeds = torch.Generator().manual_seed((generator.initial_seed() + 7_919 * rank) % 2**63)
    return DataLoader(
        _SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_seed_worker, generator=worker_seeds,
        drop_last=sampler.num_samples > batch_size, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)
