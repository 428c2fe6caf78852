"""The shared preprocessing cache: keys, verified reads, corrupt entries, racing writers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.fileio import sha256_file
from pipeline.preprocess_cache import (
    IMAGE_FILE,
    LABEL_FILE,
    META_FILE,
    PreprocessCache,
    key_digest,
    preprocessing_code_version,
    resampling_plans,
    study_key,
)

PLANS = {"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": "zscore",
         "crop_foreground": True, "num_classes": 3, "patch_size": [40, 56, 40], "batch_size": 7,
         "labels": {"0": "background"}, "intensity": {"mean": 1.0, "std": 2.0, "p005": 0.0, "p995": 5.0},
         "network": {}, "fingerprint": {"n_studies": 3}}


def _outputs(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, label = folder / "a_image.nii.gz", folder / "a_label.nii.gz"
    image.write_bytes(bytes(range(256)) * (seed + 3))
    label.write_bytes(b"label" * (seed + 5))
    return image, label


def _key(**changes: object) -> dict[str, str]:
    return study_key(image_sha="i" * 64, label_sha="l" * 64, plans={**PLANS, **changes}, code="c1")


def test_key_follows_content_and_resampling_settings_only() -> None:
    base = key_digest(_key())
    for unrelated in ({"patch_size": [8, 8, 8]}, {"batch_size": 2}, {"labels": {}}, {"fingerprint": {}},
                      {"intensity": {"mean": 9.0, "std": 9.0, "p005": 0.0, "p995": 1.0}}):  # zscore ignores it
        assert key_digest(_key(**unrelated)) == base
    for relevant in ({"target_spacing": [2.0, 1.0, 1.0]}, {"normalization": "ct"}, {"crop_foreground": False},
                     {"orientation": "LPS"}, {"num_classes": 4}):
        assert key_digest(_key(**relevant)) != base
    ct = resampling_plans({**PLANS, "normalization": "ct"})
    assert ct["intensity"] == PLANS["intensity"]
    assert key_digest(study_key(image_sha="j" * 64, label_sha="l" * 64, plans=PLANS, code="c1")) != base
    assert key_digest(study_key(image_sha="i" * 64, label_sha="l" * 64, plans=PLANS, code="c2")) != base
    assert preprocessing_code_version() == preprocessing_code_version() and len(preprocessing_code_version()) == 16


def test_store_then_fetch_is_byte_identical(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    image, label = _outputs(tmp_path / "run1")
    digest = key_digest(_key())
    assert cache.fetch(digest, image_out=tmp_path / "x.nii.gz", label_out=tmp_path / "y.nii.gz") is None
    assert cache.store(digest, key=_key(), image=image, label=label, shape=[4, 5, 6]) is True
    out_image, out_label = tmp_path / "run2" / "a_image.nii.gz", tmp_path / "run2" / "a_label.nii.gz"
    meta = cache.fetch(digest, image_out=out_image, label_out=out_label)
    assert meta is not None and meta["shape"] == [4, 5, 6] and meta["key"] == _key()
    assert out_image.read_bytes() == image.read_bytes() and out_label.read_bytes() == label.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [digest]  # no temporary folders left
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["a_image.nii.gz", "a_label.nii.gz"]
    # storing the same key again keeps the first entry
    other_image, other_label = _outputs(tmp_path / "run3", seed=1)
    assert cache.store(digest, key=_key(), image=other_image, label=other_label, shape=[4, 5, 6]) is False
    assert sha256_file(cache.entry(digest) / IMAGE_FILE) == sha256_file(image)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate_label", "delete_meta", "garbage_meta"])
def test_corrupt_entry_is_dropped_and_replaced(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    image, label = _outputs(tmp_path / "run1")
    digest = key_digest(_key())
    cache.store(digest, key=_key(), image=image, label=label, shape=[1, 2, 3])
    entry = cache.entry(digest)
    if damage == "flip_byte":
        data = bytearray((entry / IMAGE_FILE).read_bytes())
        data[10] ^= 0xFF
        (entry / IMAGE_FILE).unlink()  # a hard link would damage the run's copy too; replace the cache's only
        (entry / IMAGE_FILE).write_bytes(bytes(data))
    elif damage == "truncate_label":
        (entry / LABEL_FILE).unlink()
        (entry / LABEL_FILE).write_bytes(b"lab")
    elif damage == "delete_meta":
        (entry / META_FILE).unlink()
    else:
        (entry / META_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pipeline.preprocess_cache"):
        assert cache.fetch(digest, image_out=tmp_path / "o1.nii.gz", label_out=tmp_path / "o2.nii.gz") is None
    assert "corrupt" in caplog.text and not entry.exists()
    assert not (tmp_path / "o1.nii.gz").exists()
    assert cache.store(digest, key=_key(), image=image, label=label, shape=[1, 2, 3]) is True
    assert cache.fetch(digest, image_out=tmp_path / "o1.nii.gz", label_out=tmp_path / "o2.nii.gz") is not None
    assert (tmp_path / "o1.nii.gz").read_bytes() == image.read_bytes()


def _race(args: tuple[str, str, int]) -> bool:
    root, source, seed = args
    image, label = _outputs(Path(source) / f"w{seed}")
    digest = key_digest(_key())
    return PreprocessCache(Path(root)).store(digest, key=_key(), image=image, label=label, shape=[1, 1, 1])


def test_racing_writers_leave_one_whole_entry(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        stored = pool.map(_race, [(str(tmp_path / "cache"), str(tmp_path / "src"), i) for i in range(8)])
    assert sum(stored) == 1
    cache = PreprocessCache(tmp_path / "cache")
    digest = key_digest(_key())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [digest]
    assert cache.fetch(digest, image_out=tmp_path / "i.nii.gz", label_out=tmp_path / "l.nii.gz") is not None


def test_unwritable_cache_does_not_fail_the_study(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    image, label = _outputs(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="pipeline.preprocess_cache"):
        assert PreprocessCache(blocker / "cache").store("d" * 64, key=_key(), image=image, label=label,
                                                        shape=[1, 1, 1]) is False
    assert "could not store" in caplog.text


def test_sweep_removes_only_old_leftovers(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    image, label = _outputs(tmp_path / "run")
    digest = key_digest(_key())
    cache.store(digest, key=_key(), image=image, label=label, shape=[1, 1, 1])
    old, fresh = tmp_path / "cache" / ".abc.partial-1", tmp_path / "cache" / ".abc.trash-2"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 2 * 86_400,) * 2)
    os.utime(cache.entry(digest), (time.time() - 2 * 86_400,) * 2)
    assert cache.sweep() == 1
    assert not old.exists() and fresh.exists() and cache.entry(digest).is_dir()
