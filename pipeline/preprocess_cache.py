"""The preprocessed-study cache shared between runs, keyed by content hashes and preprocessing settings."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from pipeline.fileio import canonical_json, read_json, sha256_bytes, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
IMAGE_FILE = "image.nii.gz"
LABEL_FILE = "label.nii.gz"
META_FILE = "meta.json"
# the code that decides a preprocessed study's bytes: any edit to these files starts a fresh key
CODE_FILES = ("transforms/preprocessing.py", "io/nifti.py", "io/volume.py", "io/channels.py", "stages/preprocess.py")
LIBRARIES = ("monai", "torch", "nibabel", "numpy")


def resampling_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """The plans values that change a study's preprocessed voxels (patch, batch, network and names do not).

    The dataset intensity statistics matter only to ``ct`` normalisation; the class count decides
    which labels are accepted.
    """
    keys = ("orientation", "target_spacing", "normalization", "crop_foreground", "num_classes")
    out = {k: plans.get(k) for k in keys}
    if plans.get("channels"):  # several channels: each one's normalisation and statistics
        out["channels"] = plans["channels"]
    elif plans.get("normalization") == "ct":
        out["intensity"] = {k: plans["intensity"][k] for k in ("mean", "std", "p005", "p995")}
    return out


@functools.lru_cache(maxsize=1)
def preprocessing_code_version() -> str:
    """A digest of the preprocessing source files, the cache format and the numeric libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    root = Path(pipeline.__file__).resolve().parent
    for name in CODE_FILES:
        digest.update(name.encode() + b"\n" + (root / name).read_bytes())
    for lib in LIBRARIES:
        try:
            digest.update(f"{lib}=={version(lib)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{lib} missing\n".encode())
    return digest.hexdigest()[:16]


def study_key(*, image_sha: str, label_sha: str, plans: dict[str, Any], code: str) -> dict[str, str]:
    """What one study's preprocessed outputs depend on: its input bytes, the resampling plans, the code."""
    return {"image": image_sha, "label": label_sha, "code": code,
            "plans": sha256_bytes(canonical_json(resampling_plans(plans)).encode())}


def key_digest(key: dict[str, str]) -> str:
    return sha256_bytes(canonical_json(key).encode())


def place(source: Path, dest: Path) -> None:
    """Put ``source``'s bytes at ``dest`` atomically: a hard link where possible, else a copy.

    Files are only ever replaced by rename, never rewritten in place, so sharing an inode between
    the cache and a run folder is safe.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex}"
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class PreprocessCache:
    """``root/<sha256 of the study key>/`` holds image.nii.gz, label.nii.gz and meta.json (checksums).

    Entries are built in a temporary folder and renamed into place, so a reader sees a whole
    entry or none, and two runs racing to store the same key leave one intact entry.
    """

    root: Path

    def entry(self, digest: str) -> Path:
        return self.root / digest

    def _verified(self, digest: str) -> dict[str, Any] | None:
        """The entry's meta when every file matches its recorded checksum; None when absent; raises on corruption."""
        folder = self.entry(digest)
        if not folder.is_dir():
            return None
        meta = read_json(folder / META_FILE)
        if not isinstance(meta, dict) or meta.get("digest") != digest or meta.get("format") != CACHE_FORMAT:
            raise ValueError("meta.json does not describe this entry")
        for name in (IMAGE_FILE, LABEL_FILE):
            if sha256_file(folder / name) != meta["outputs"][name]:
                raise ValueError(f"{name} does not match its checksum")
        return meta

    def fetch(self, digest: str, *, image_out: Path, label_out: Path) -> dict[str, Any] | None:
        """Place a verified entry's files at the outputs and return its meta; None on a miss.

        A corrupt entry (bad checksum, unreadable meta, missing file) is logged, removed and
        reported as a miss, so the caller recomputes and stores a good one.
        """
        try:
            meta = self._verified(digest)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("preprocess cache: entry %s in %s is corrupt or unreadable (%s); recomputing it",
                        digest[:16], self.root, exc)
            self._discard(digest)
            return None
        if meta is None:
            return None
        try:
            place(self.entry(digest) / IMAGE_FILE, image_out)
            place(self.entry(digest) / LABEL_FILE, label_out)
        except OSError as exc:  # e.g. the entry was discarded by another run meanwhile
            log.warning("preprocess cache: could not copy entry %s (%s); recomputing it", digest[:16], exc)
            return None
        return meta

    def store(self, digest: str, *, key: dict[str, str], image: Path, label: Path, shape: list[int]) -> bool:
        """Add the outputs under ``digest`` (atomically); return False when not stored (kept or failed)."""
        tmp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.partial-", dir=self.root))
            place(image, tmp / IMAGE_FILE)
            place(label, tmp / LABEL_FILE)
            write_json_atomic(tmp / META_FILE, {
                "format": CACHE_FORMAT, "digest": digest, "key": key, "shape": shape,
                "outputs": {IMAGE_FILE: sha256_file(tmp / IMAGE_FILE), LABEL_FILE: sha256_file(tmp / LABEL_FILE)},
            })
            return self._publish(digest, tmp)
        except OSError as exc:
            log.warning("preprocess cache: could not store entry %s in %s (%s); continuing without it",
                        digest[:16], self.root, exc)
            return False
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, digest: str, tmp: Path) -> bool:
        final = self.entry(digest)
        try:
            os.rename(tmp, final)
            return True
        except OSError:
            pass  # an entry exists: another run stored it first, or it is corrupt
        try:
            if self._verified(digest) is not None:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            self._discard(digest)
        try:
            os.rename(tmp, final)
            return True
        except OSError:
            return False  # lost a second race; the winner's entry stands

    def sweep(self, *, max_age_s: float = 86_400.0) -> int:
        """Delete temporary and discarded folders older than ``max_age_s`` (left by killed runs); return how many."""
        if not self.root.is_dir():
            return 0
        now, removed = time.time(), 0
        for path in self.root.iterdir():
            if path.name.startswith(".") and (".partial-" in path.name or ".trash-" in path.name):
                try:
                    if now - path.stat().st_mtime > max_age_s:
                        shutil.rmtree(path, ignore_errors=True)
                        removed += 1
                except OSError:
                    continue
        return removed

    def _discard(self, digest: str) -> None:
        """Move an entry aside (atomically) and delete it."""
        trash = self.root / f".{digest[:16]}.trash-{uuid.uuid4().hex}"
        try:
            os.rename(self.entry(digest), trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
