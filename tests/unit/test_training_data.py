"""Training data loading: worker count, seeded order and augmentation independent of workers, ranks, the cache."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.data import get_track_meta
from torch.utils.data import Dataset, DistributedSampler

import pipeline.training.data as data_module
from pipeline.config import AugmentationConfig
from pipeline.demo_data import phantom
from pipeline.errors import ConfigError
from pipeline.io.nifti import save_nifti
from pipeline.training.data import SeededSampler, resolve_num_workers, train_dataset, train_loader
from pipeline.transforms.augmentation import training_transforms


class _Indexed(Dataset):
    """Returns its index and draws from the global RNGs (to see how workers are seeded)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "np": int(np.random.randint(1 << 30)), "py": random.randrange(1 << 30),
                "torch": int(torch.randint(1 << 30, (1,)))}


def test_resolve_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0
    with pytest.raises(ConfigError, match="num_workers"):
        resolve_num_workers(-1)
    for cpus, expected in [(1, 0), (2, 1), (3, 2), (4, 3), (16, 8)]:
        monkeypatch.setattr(data_module, "available_cpus", lambda cpus=cpus: cpus)
        assert resolve_num_workers(None) == expected
    monkeypatch.undo()
    assert 1 <= data_module.available_cpus()


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Four phantoms written as preprocessed NIfTI files, cached by ``train_dataset``."""
    folder = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(5)
    items = []
    for i in range(4):
        image, label = phantom(rng, shape=(20, 22, 18))
        save_nifti(image, folder / f"s{i}_image.nii.gz")
        save_nifti(label, folder / f"s{i}_label.nii.gz")
        items.append({"id": f"s{i}", "image": str(folder / f"s{i}_image.nii.gz"),
                      "label": str(folder / f"s{i}_label.nii.gz")})
    transform = training_transforms(AugmentationConfig(rotate_prob=0.5, scale_prob=0.5), patch_size=(16, 16, 16),
                                    num_classes=3, samples_per_volume=2)
    return train_dataset(items, transform)


def _epochs(dataset, *, num_workers: int, seeds=(11, 12), batch_size=2) -> list[list[dict]]:
    generator = torch.Generator()
    loader = train_loader(dataset, batch_size=batch_size, num_workers=num_workers, generator=generator)
    assert loader.persistent_workers == (num_workers > 0)
    out = []
    for seed in seeds:
        generator.manual_seed(seed)  # what run_training does before every epoch
        out.append([{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader])
    return out


def test_batches_are_identical_for_any_number_of_workers(phantom_dataset) -> None:
    serial = _epochs(phantom_dataset, num_workers=0)
    parallel = _epochs(phantom_dataset, num_workers=2)
    for epoch_a, epoch_b in zip(serial, parallel, strict=True):
        assert len(epoch_a) == len(epoch_b) == 2
        for a, b in zip(epoch_a, epoch_b, strict=True):
            assert a["id"] == b["id"]
            assert tuple(a["image"].shape) == (4, 1, 16, 16, 16)  # 2 volumes x 2 patches
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(serial[0][0]["image"], serial[1][0]["image"])  # another epoch, other patches
    again = _epochs(phantom_dataset, num_workers=1, seeds=(11,))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(serial[0], again[0], strict=True))


def test_main_process_loading_restores_threads_and_metadata_tracking(phantom_dataset) -> None:
    threads, track = torch.get_num_threads(), get_track_meta()
    torch.set_num_threads(2)
    try:
        batch = _epochs(phantom_dataset, num_workers=0, seeds=(4,))[0][0]
        assert torch.get_num_threads() == 2 and get_track_meta() == track
        assert type(batch["image"]) is torch.Tensor  # plain tensors, no MetaTensor
    finally:
        torch.set_num_threads(threads)


def test_cache_holds_the_head_and_is_not_modified_by_training(phantom_dataset) -> None:
    cached = phantom_dataset._cache[0]
    assert set(cached) >= {"id", "image", "label", "label_class_indices"}
    before = cached["image"].clone(), cached["label"].clone()
    _epochs(phantom_dataset, num_workers=0, seeds=(1, 2, 3))
    assert torch.equal(cached["image"], before[0]) and torch.equal(cached["label"], before[1])
    assert phantom_dataset._cache[0] is cached


def test_ranks_share_one_permutation_and_split_it() -> None:
    dataset = _Indexed(7)
    epochs = []
    for epoch in (1, 2):
        shares, seeds = [], []
        for rank in range(2):
            generator = torch.Generator().manual_seed(100 + rank)  # ranks may seed their generators differently
            loader = train_loader(dataset, batch_size=1, num_workers=0, generator=generator, rank=rank,
                                  world_size=2)
            assert isinstance(loader.sampler, DistributedSampler) and len(loader) == 4
            loader.sampler.set_epoch(epoch)
            shares.append([int(b["index"]) for b in loader])
            seeds.append([s for _, s in loader.sampler])
        assert set(shares[0] + shares[1]) == set(range(7)) and len(shares[0] + shares[1]) == 8  # one padded repeat
        assert not set(seeds[0]) & set(seeds[1])
        epochs.append(shares)
    assert epochs[0] != epochs[1]  # set_epoch reshuffles
    with pytest.raises(ConfigError, match="rank"):
        train_loader(dataset, batch_size=1, num_workers=0, generator=torch.Generator(), rank=2, world_size=2)


def test_shared_permutation_follows_the_run_seed() -> None:
    """Several ranks: the permutation they share comes from the run's seed, so another seed reshuffles."""
    def order(shuffle_seed: int) -> list[int]:
        loader = train_loader(_Indexed(12), batch_size=1, num_workers=0, generator=torch.Generator().manual_seed(1),
                              rank=0, world_size=2, shuffle_seed=shuffle_seed)
        loader.sampler.set_epoch(1)
        return [i for i, _ in loader.sampler]

    assert order(0) == order(0)
    assert len({tuple(order(seed)) for seed in range(4)}) == 4


def test_sampler_seeds_follow_the_generator_and_set_epoch() -> None:
    dataset = _Indexed(10)

    def draw(seed: int, epoch: int = 0) -> list[tuple[int, int]]:
        sampler = SeededSampler(dataset, generator=torch.Generator().manual_seed(seed))
        sampler.set_epoch(epoch)
        return list(sampler)

    first = draw(1)
    assert sorted(i for i, _ in first) == list(range(10))
    assert len({s for _, s in first}) == 10  # a distinct seed per sample
    assert draw(1) == first and draw(2) != first and draw(1, epoch=1) != first


def test_workers_get_distinct_reproducible_global_seeds() -> None:
    def run() -> list[dict]:
        loader = train_loader(_Indexed(8), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(3))
        return [{k: int(v) for k, v in b.items()} for b in loader]

    a, b = run(), run()
    assert a == b
    by_worker = {(row["np"], row["py"], row["torch"]) for row in a[:2]}  # first item of each of the two workers
    assert len(by_worker) == 2
