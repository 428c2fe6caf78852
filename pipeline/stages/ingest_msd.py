"""MSD-style dataset folders (``dataset.json`` with imagesTr, labelsTr, imagesTs): the ingest stage's study specs.
nnU-Net v2's layout (one file per channel) is read by :mod:`pipeline.stages.ingest_nnunet`.

A training entry whose image or label leaves the dataset folder is refused; an image listed twice is
ingested once; images in imagesTr that no entry lists are ingested unlabeled, with a problem.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import IngestError
from pipeline.fileio import read_json
from pipeline.io.nifti import is_nifti
from pipeline.stages.ingest_listing import inside, relative
from pipeline.stages.ingest_nnunet import is_nnunet_v2, nnunet_tasks


def _read_msd(root: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    try:
        meta = read_json(root / "dataset.json")
    except (OSError, ValueError) as exc:
        raise IngestError(f"dataset.json is not valid JSON ({exc}); fix or remove it",
                          code="msd_bad_dataset_json") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("training", []), list):
        raise IngestError("dataset.json must be an object with a 'training' list", code="msd_bad_dataset_json")
    raw = meta.get("labels")
    if raw is None:
        return meta, None
    try:
        if all(isinstance(v, int) for v in raw.values()):  # nnU-Net v2 style {"background": 0, ...}
            pairs = {int(v): str(k) for k, v in raw.items()}
        elif any(isinstance(v, list) for v in raw.values()):  # nnU-Net v2 regions {"tumor core": [2, 3], ...}
            pairs = _region_values(raw)
        else:
            pairs = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise IngestError("dataset.json 'labels' must map integer values to names",
                          code="msd_bad_dataset_json") from exc
    return meta, {str(k): pairs[k] for k in sorted(pairs)}


def _channels(meta: dict[str, Any]) -> list[str] | None:
    """The channel names of dataset.json's ``modality`` (MSD) or ``channel_names`` (nnU-Net v2): ``{"0": "FLAIR",
    "1": "T1w", ...}``, numbered 0, 1, ... in the images' 4th axis; None when absent (one channel assumed)."""
    raw = meta.get("modality", meta.get("channel_names"))
    if raw is None:
        return None
    if isinstance(raw, str):
        return [raw]
    try:
        numbered = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        numbered = {}
    if not numbered or sorted(numbered) != list(range(len(numbered))):
        raise IngestError("dataset.json 'modality' (or 'channel_names') must number the image channels 0, 1, ... "
                          f"(as {{\"0\": \"CT\"}} or {{\"0\": \"FLAIR\", \"1\": \"T1w\"}}), got "
                          f"{json.dumps(raw)[:200]}", code="msd_bad_dataset_json")
    return [numbered[k] for k in range(len(numbered))]


def _region_values(raw: dict[str, Any]) -> dict[int, str]:
    """The label values of nnU-Net v2 region-based labels (each name maps to a value or a list of them: regions
    that overlap), each named by the region that is that value alone, else ``label_<value>``."""
    values: set[int] = set()
    alone: dict[int, str] = {}
    for name, value in raw.items():
        members = [int(v) for v in (value if isinstance(value, list) else [value])]
        if not members or not all(isinstance(v, int) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"region {name!r} must list integer label values")
        values.update(members)
        if len(members) == 1:
            alone.setdefault(members[0], str(name))
    return {value: alone.get(value, f"label_{value}") for value in sorted(values | {0})}


def msd_tasks(root: Path, base: dict[str, Any], files: set[Path]) -> tuple[list[dict[str, Any]], set[Path], dict]:
    """Study specs from dataset.json's training list, imagesTs and unlisted imagesTr images.

    With several channels in ``modality`` (MSD's BrainTumour, Prostate), each image is 4D with one volume per
    channel along its last axis; every study is checked to hold that many, and the header lists their names."""
    meta, labels = _read_msd(root)
    names = _channels(meta)
    allowed = tuple(int(k) for k in labels) if labels else None
    several = names if names is not None and len(names) > 1 else None
    header = {"dataset": meta.get("name"), "labels": labels, "channels": several}
    if is_nnunet_v2(meta):  # one file per channel, cases by file name
        specs, consumed = nnunet_tasks(root, base, files, meta=meta, names=names or [], allowed=allowed)
        return specs, consumed, header
    modality = names[0] if names is not None and len(names) == 1 else None
    channels = {"channels": len(names)} if several else {}
    specs: list[dict[str, Any]] = []
    consumed = {root / "dataset.json"} | {p for p in files if p.parent == root / "labelsTr"}
    first: dict[str, tuple[int, str | None]] = {}  # image source -> (its first training entry, that entry's label)
    for number, entry in enumerate(meta.get("training", []), start=1):
        image_rel = str(entry.get("image", "")) if isinstance(entry, dict) else ""
        label_rel = str(entry.get("label", "")) if isinstance(entry, dict) else ""
        image, label = inside(root, image_rel), inside(root, label_rel)
        source = PurePosixPath(image_rel).as_posix()
        spec = {**base, "source": source, "id_key": source, "modality": modality, **channels,
                "allowed_labels": allowed, "label_source": PurePosixPath(label_rel).as_posix() if label_rel else None}
        if source in first:  # one study per image: a second entry is recorded under its own id, not converted
            spec.update(id_key=f"{source}#training[{number}]", **_repeated_entry(number, spec["label_source"],
                                                                                 *first[source]))
            specs.append(spec)
            continue
        first[source] = (number, spec["label_source"])
        if image is None or label is None:
            spec["error"] = ("path_outside_root", f"{source}: dataset.json entry points outside the dataset folder")
        elif not image.is_file() or not label.is_file():
            missing = image_rel if not image.is_file() else label_rel
            spec["error"] = ("missing_file", f"{missing}: listed in dataset.json but not found")
        else:
            spec.update(image_path=str(image), label_path=str(label))
            consumed |= {image, label}
        specs.append(spec)
    for path in sorted(p for p in files if p.parent in (root / "imagesTr", root / "imagesTs") and is_nifti(p)):
        if path in consumed:
            continue
        rel = relative(root, path)
        problems = () if path.parent.name == "imagesTs" else (
            ("msd_unlisted_image", f"{rel}: in imagesTr but not in dataset.json's training list; ingested unlabeled"),)
        specs.append({**base, "source": rel, "id_key": rel, "image_path": str(path), "modality": modality,
                      **channels, "problems": problems})
        consumed.add(path)
    return specs, consumed, header


def _repeated_entry(number: int, label: str | None, before: int, before_label: str | None) -> dict[str, Any]:
    """A dataset.json training entry for an image listed before: skipped when it repeats that entry, failed
    when it pairs the image with another label (which one is right is the dataset author's call)."""
    if label == before_label:
        return {"skip": ("msd_repeated_entry", f"dataset.json's training entry {number} repeats entry {before}; "
                                               "only the first is used")}
    return {"error": ("msd_conflicting_labels", f"dataset.json's training entry {number} pairs this image with label "
                                                f"{label}, entry {before} with {before_label}; only the first is "
                                                "used. Remove the wrong entry from dataset.json")}
