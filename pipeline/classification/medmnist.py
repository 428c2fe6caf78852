"""Class-labelled inputs: MedMNIST ``.npz`` import (NIfTI volumes + manifest + split) and a study-to-label CSV."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import IngestError, ManifestError
from pipeline.fileio import sha256_file, write_json_atomic
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Problem, Study, load_manifest, save_manifest
from pipeline.training.split import SPLIT_NAME

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NO_GEOMETRY = Problem(code="geometry_unknown",
                      message="MedMNIST stores no voxel spacing or orientation; written on a 1 mm identity grid")


def _as_volumes(images: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W[, D]) grey or (N, H, W, 3) colour -> (N, X, Y, Z) arrays (2D images get Z = 1)."""
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        log.info("%s: colour 2D images averaged to grey", source)
        images = images.mean(axis=-1).round().astype(images.dtype)
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        return images
    raise IngestError(f"{source}: images of shape {images.shape} are neither 2D (N,H,W) nor 3D (N,H,W,D)",
                      code="bad_npz")


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
    for split in present:
        images = _as_volumes(np.asarray(data[f"{split}_images"]), f"{npz.name}:{split}")
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
                                 image=rel, modality="CT", shape=list(volume.array.shape),
                                 spacing=[1.0, 1.0, 1.0], orientation="RAS", affine=np.eye(4).tolist(),
                                 sha256={"input": input_sha, "image": sha256_file(out / rel)},
                                 problems=[NO_GEOMETRY], class_label=label))
            split_ids[split].append(study_id)
    names = classes or {str(c): f"class_{c}" for c in sorted(all_labels)}
    manifest = Manifest(dataset=npz.stem, studies=studies, classes=names)
    save_manifest(manifest, out)
    split_doc = {"seed": 0, "train": split_ids.get("train", []), "validation": split_ids.get("val", [])}
    if "test" in split_ids:
        split_doc["test"] = split_ids["test"]
    write_json_atomic(out / SPLIT_NAME, split_doc)
    log.info("imported %d studies from %s (%s) into %s", len(studies), npz.name,
             ", ".join(f"{s}: {len(v)}" for s, v in split_ids.items()), out)
    return manifest


def apply_label_csv(ingest_dir: str | Path, csv_path: str | Path, *, id_column: str = "study",
                    label_column: str = "label") -> Manifest:
    """Set ``class_label`` of the manifest's studies from a CSV (``study,label``); labels may be names or ints.

    Every ok study must get a label; names are numbered in sorted order into ``classes``.
    """
    ingest_dir, csv_path = Path(ingest_dir), Path(csv_path)
    manifest = load_manifest(ingest_dir)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or id_column not in rows[0] or label_column not in rows[0]:
        raise ManifestError(f"{csv_path}: needs a header with columns '{id_column}' and '{label_column}'")
    raw = {row[id_column].strip(): row[label_column].strip() for row in rows}
    values = sorted(set(raw.values()))
    if all(v.lstrip("-").isdigit() for v in values):
        index = {v: int(v) for v in values}
        classes = {str(int(v)): f"class_{int(v)}" for v in values}
    else:
        index = {v: i for i, v in enumerate(values)}
        classes = {str(i): v for v, i in index.items()}
    studies = []
    missing = []
    for study in manifest.studies:
        if study.id in raw:
            study = study.model_copy(update={"class_label": index[raw[study.id]]})
        elif study.status == "ok":
            missing.append(study.id)
        studies.append(study)
    if missing:
        raise ManifestError(f"{csv_path}: no label for {len(missing)} ok stud(ies) of {ingest_dir} "
                            f"(e.g. {missing[0]}); add a row per study id")
    unknown = sorted(set(raw) - {s.id for s in manifest.studies})
    if unknown:
        log.warning("%s: %d id(s) are not in the manifest (e.g. %s); ignored", csv_path, len(unknown), unknown[0])
    manifest = manifest.model_copy(update={"studies": studies, "classes": classes})
    save_manifest(manifest, ingest_dir)
    return manifest
