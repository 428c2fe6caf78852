"""nnU-Net v2 dataset folders: one file per channel (``imagesTr/CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...), labels
as ``labelsTr/CASE.nii.gz``, channels named by ``dataset.json``'s ``channel_names``; the ingest stage's study specs.

A case is one study: its channel files are stacked into one 4D image (channel last) by the per-study
layer, after checking that they share one grid. A case missing a channel file, a file named like no
case, or a channel number beyond ``channel_names`` fails alone, with the file it concerns; a training
case without its label is ingested unlabeled, with a problem.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.errors import IngestError
from pipeline.stages.ingest_listing import relative

_FOLDERS = ("imagesTr", "imagesTs")
NIFTI_ENDINGS = (".nii.gz", ".nii")


def is_nnunet_v2(meta: dict[str, Any]) -> bool:
    """A dataset.json of nnU-Net v2 (``channel_names`` and no MSD ``training`` list)."""
    return "channel_names" in meta and "training" not in meta


def nnunet_tasks(root: Path, base: dict[str, Any], files: set[Path], *, meta: dict[str, Any], names: list[str],
                 allowed: tuple[int, ...] | None) -> tuple[list[dict[str, Any]], set[Path]]:
    """Study specs for every case under imagesTr and imagesTs, and the files they account for."""
    ending = _ending(meta)
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    consumed = {root / "dataset.json"} | {p for p in files if p.parent == root / "labelsTr"}
    specs: list[dict[str, Any]] = []
    channels = {"channels": len(names)} if len(names) > 1 else {"modality": names[0]}
    for folder in _FOLDERS:
        cases: dict[str, dict[int, Path]] = defaultdict(dict)
        for path in sorted(p for p in files if p.parent == root / folder):
            consumed.add(path)
            match = pattern.match(path.name)
            if match is None:
                specs.append({**base, "source": relative(root, path), "id_key": relative(root, path), "error": (
                    "nnunet_file_name", f"{relative(root, path)}: not named CASE_XXXX{ending} (a case and a 4-digit "
                                        "channel number), as dataset.json's channel_names and file_ending ask")})
                continue
            cases[match["case"]][int(match["channel"])] = path
        for case, found in sorted(cases.items()):
            specs.append(_case_spec(root, base, folder, case, found, names=names, ending=ending, allowed=allowed,
                                    channels=channels, files=files))
    return specs, consumed


def _ending(meta: dict[str, Any]) -> str:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise IngestError(f"dataset.json's file_ending is {ending!r}; medpipe reads NIfTI "
                          f"({', '.join(NIFTI_ENDINGS)}). Convert the images to NIfTI and set file_ending",
                          code="msd_bad_dataset_json")
    return str(ending)


def _case_spec(root: Path, base: dict[str, Any], folder: str, case: str, found: dict[int, Path], *,
               names: list[str], ending: str, allowed: tuple[int, ...] | None,
               channels: dict[str, Any], files: set[Path]) -> dict[str, Any]:
    rels = {number: relative(root, path) for number, path in found.items()}
    source = rels[min(rels)] if len(names) == 1 else f"{folder}/{case}"
    spec: dict[str, Any] = {**base, "source": source, "id_key": source, **channels, "allowed_labels": allowed}
    missing = [f"{folder}/{case}_{number:04d}{ending}" for number in range(len(names)) if number not in found]
    extra = sorted(rel for number, rel in rels.items() if number >= len(names))
    if missing or extra:
        verb = "is" if len(missing or extra) == 1 else "are"
        what = f"{', '.join(missing)} {verb} missing" if missing else f"{', '.join(extra)} {verb} beyond them"
        spec["error"] = ("nnunet_channel_files", f"{source}: dataset.json's channel_names name {len(names)} "
                                                 f"channel(s) ({', '.join(names)}), and {what}; each case needs one "
                                                 "file per channel")
        return spec
    ordered = [found[number] for number in range(len(names))]
    spec.update(image_path=str(ordered[0]))
    if len(names) > 1:
        spec.update(channel_paths=tuple(str(p) for p in ordered), channel_sources=tuple(rels[n] for n in
                                                                                        range(len(names))))
    label = root / "labelsTr" / f"{case}{ending}"
    if folder == "imagesTr" and label in files:
        spec.update(label_path=str(label), label_source=relative(root, label))
    elif folder == "imagesTr":
        spec["problems"] = (("nnunet_missing_label", f"{source}: in imagesTr but labelsTr/{case}{ending} is missing; "
                                                     "ingested unlabeled"),)
    return spec
