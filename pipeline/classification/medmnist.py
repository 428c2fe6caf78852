"""Class-labelled inputs: MedMNIST ``.npz`` import (NIfTI volumes + manifest + split), also as a run's ingest stage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classification.labels_csv import apply_class_labels
from pipeline.config import PipelineConfig
from pipeline.errors import IngestError
from pipeline.fileio import sha256_file, write_json_atomic
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import MANIFEST_NAME, Manifest, Problem, Study, load_manifest, save_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage
from pipeline.training.split import SPLIT_NAME

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NO_GEOMETRY = Problem(code="geometry_unknown",
                      message="MedMNIST stores no voxel spacing or orientation; written on a 1 mm identity grid")


COLOUR = ["red", "green", "blue"]


def _as_volumes(images: np.ndarray, source: str) -> tuple[np.ndarray, list[str] | None]:
    """(N, H, W[, D]) grey or (N, H, W, 3) colour -> (N, X, Y, Z[, C]) arrays (2D images get Z = 1) and the channel
    names: colour images keep red, green and blue as three channels (a classifier's input channels)."""
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return images[:, :, :, None, :], COLOUR
    if images.ndim == 3:
        return images[..., None], None
    if images.ndim == 4:
        return images, None
    raise IngestError(f"{source}: images of shape {images.shape} are neither 2D (N,H,W), colour 2D (N,H,W,3) nor 3D "
                      "(N,H,W,D)", code="bad_npz")


def import_medmnist(npz: str | Path, out: str | Path, *, classes: dict[str, str] | None = None,
                    splits: tuple[str, ...] = SPLITS, limit: int | None = None) -> Manifest:
    """Write ``out/images/<split>_<index>.nii.gz``, ``out/manifest.json`` with class labels and ``out/split.json``.

    ``<split>_images`` / ``<split>_labels`` arrays found in the file are imported (``limit``:
    the first N of each, for quick tests). split.json holds the official ``train`` and
    ``validation`` (from ``val``) lists, plus ``test`` when present, for ``data.split_file``.
    """
    npz, out = Path(npz), Path(out)
    if not npz.is_file():
        raise IngestError(f"{npz}: no such MedMNIST file", code="input_missing")
    try:
        data = np.load(npz, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IngestError(f"{npz}: not a readable .npz file ({exc})", code="bad_npz") from None
    present = [s for s in splits if f"{s}_images" in data.files and f"{s}_labels" in data.files]
    if not present:
        raise IngestError(f"{npz}: holds none of {', '.join(f'{s}_images/{s}_labels' for s in splits)}",
                          code="bad_npz")
    input_sha = sha256_file(npz)
    studies: list[Study] = []
    split_ids: dict[str, list[str]] = {}
    all_labels: set[int] = set()
    channels: list[str] | None = None
    for split in present:
        images, channels = _as_volumes(np.asarray(data[f"{split}_images"]), f"{npz.name}:{split}")
        labels = np.asarray(data[f"{split}_labels"]).reshape(len(images), -1)
        if labels.shape[1] != 1:
            raise IngestError(f"{npz}: {split}_labels has {labels.shape[1]} columns; multi-label tasks are not "
                              "supported", code="bad_npz")
        count = len(images) if limit is None else min(limit, len(images))
        split_ids[split] = []
        for index in range(count):
            study_id = f"{split}_{index:05d}"
            rel = f"images/{study_id}.nii.gz"
            volume = Volume(np.ascontiguousarray(images[index]), np.eye(4))
            save_nifti(volume, out / rel)
            label = int(labels[index, 0])
            all_labels.add(label)
            studies.append(Study(id=study_id, source=f"{npz.name}:{split}[{index}]", format="nifti", status="ok",
                                 image=rel, modality="CT", shape=list(volume.spatial_shape),
                                 spacing=[1.0, 1.0, 1.0], orientation="RAS", affine=np.eye(4).tolist(),
                                 sha256={"input": input_sha, "image": sha256_file(out / rel)},
                                 problems=[NO_GEOMETRY], class_label=label))
            split_ids[split].append(study_id)
    names = classes or {str(c): f"class_{c}" for c in sorted(all_labels)}
    manifest = Manifest(dataset=npz.stem, studies=studies, classes=names, channels=channels)
    save_manifest(manifest, out)
    split_doc = {"seed": 0, "train": split_ids.get("train", []), "validation": split_ids.get("val", [])}
    if "test" in split_ids:
        split_doc["test"] = split_ids["test"]
    write_json_atomic(out / SPLIT_NAME, split_doc)
    log.info("imported %d studies from %s (%s) into %s", len(studies), npz.name,
             ", ".join(f"{s}: {len(v)}" for s, v in split_ids.items()), out)
    return manifest


def apply_label_csv(ingest_dir: str | Path, csv_path: str | Path) -> Manifest:
    """Set ``class_label`` (and ``classes``) of the manifest in ``ingest_dir`` from a labels CSV and save it.

    See ``pipeline.classification.labels_csv``: rows name studies by source path, id or file
    stem; labels are integers or class names; studies without a row stay unlabelled.
    """
    ingest_dir = Path(ingest_dir)
    manifest = apply_class_labels(load_manifest(ingest_dir), csv_path)
    save_manifest(manifest, ingest_dir)
    return manifest


def is_medmnist_file(path: str | Path | None) -> bool:
    """True for a ``.npz`` file (what ``data.root`` names when a run starts from MedMNIST)."""
    return path is not None and Path(path).suffix.lower() == ".npz" and Path(path).is_file()


def import_medmnist_stage(npz: str | Path, out: str | Path, *, config: PipelineConfig | None = None,
                          force: bool = False) -> dict[str, Any]:
    """The ingest stage of a run whose ``data.root`` is a MedMNIST ``.npz``: import_medmnist with a stage record.

    ``data.labels_csv``, when given, replaces the file's labels. Skipped when the file, the
    labels CSV and the settings are unchanged.
    """
    config = config or PipelineConfig()
    npz, out = Path(npz), Path(out)
    inputs = {"npz": npz}
    if config.data.labels_csv is not None:
        inputs["labels_csv"] = Path(config.data.labels_csv)

    def work(record: StageRecord) -> list[Path]:
        manifest = import_medmnist(npz, out)
        if config.data.labels_csv is not None:
            manifest = apply_class_labels(manifest, config.data.labels_csv)
            save_manifest(manifest, out)
        keep = {s.image for s in manifest.studies if s.image}
        for path in sorted((out / "images").glob("*.nii.gz")):
            if f"images/{path.name}" not in keep:
                log.info("removing images/%s: no longer in %s", path.name, npz.name)
                path.unlink()
        for study in manifest.studies:
            record.add(StudyStatus(id=study.id, status="ok"))
        record.extra["source"] = "medmnist"
        return [out / MANIFEST_NAME, out / SPLIT_NAME, *(out / str(s) for s in sorted(keep))]

    return execute_stage("ingest", out, config=config, inputs=inputs, work=work, force=force,
                         extra_hash={"importer": "medmnist"})
