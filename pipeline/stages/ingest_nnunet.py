"""nnU-Net v2 dataset folders: one file per channel (``imagesTr/CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...), labels
as ``labelsTr/CASE.nii.gz``, channels named by ``dataset.json``'s ``channel_names``; the ingest stage's study specs.

A case is one study: its channel files are stacked into one 4D image (channel last) by the per-study
layer, after checking that they share one grid. A case missing a channel file, a file named like no
case, or a channel number beyond ``channel_names`` fails alone, with the file it concerns; a training
case without its label is ingested unlabeled, with a problem.

A ``dataset`` object in dataset.json lists the training cases' files instead (``{"CASE": {"images": [one path
per channel], "label": path}}``, paths relative to the dataset folder, or absolute inside it): those cases
come from it, whatever the files are named, and imagesTr files it does not list are cases by their names,
ingested unlabeled with a problem. A listed file outside the dataset folder fails its case (``path_outside_root``:
medpipe reads only the folder it is given); environment variables in paths are not expanded.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.errors import IngestError
from pipeline.stages.ingest_listing import inside, relative

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
    listed = "dataset" in meta
    if listed:
        for case, entry in _listed(meta["dataset"]):
            spec, used = _listed_case(root, base, case, entry, names=names, allowed=allowed, channels=channels)
            specs.append(spec)
            consumed |= used
    for folder in _FOLDERS:
        cases: dict[str, dict[int, Path]] = defaultdict(dict)
        for path in sorted(p for p in files if p.parent == root / folder and p not in consumed):
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
                                    channels=channels, files=files, listed=listed))
    return specs, consumed


def _listed(raw: Any) -> list[tuple[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise IngestError("dataset.json's 'dataset' must map each training case to its files, as {\"CASE\": "
                          "{\"images\": [\"scans/CASE_t2.nii.gz\", ...], \"label\": \"masks/CASE.nii.gz\"}}",
                          code="msd_bad_dataset_json")
    return sorted((str(case), entry) for case, entry in raw.items())


def _resolved(root: Path, text: str) -> tuple[Path | None, str]:
    """(the listed file, or None when it leaves the dataset folder; its path relative to the folder)."""
    rel = Path(text)
    if rel.is_absolute():  # inside the folder: as its path there (the folder may be given through a link)
        bases = [rel.relative_to(base) for base in (root.absolute(), root.resolve()) if rel.is_relative_to(base)]
        rel = bases[0] if bases else rel
    path = None if "$" in text else inside(root, rel.as_posix())
    return (path, relative(root, path)) if path is not None else (None, text)


def _listed_case(root: Path, base: dict[str, Any], case: str, entry: Any, *, names: list[str],
                 allowed: tuple[int, ...] | None, channels: dict[str, Any]) -> tuple[dict[str, Any], set[Path]]:
    """The spec of a case that dataset.json's ``dataset`` lists, and the files it uses."""
    images = entry.get("images") if isinstance(entry, dict) else None
    label = entry.get("label") if isinstance(entry, dict) else None
    ok = isinstance(images, list) and images and all(isinstance(i, str) and i for i in images) and (
        label is None or isinstance(label, str) and label)
    found = [_resolved(root, i) for i in images] if ok else []
    first = found[0][1] if found and found[0][0] is not None else None
    source = f"dataset.json#{case}" if first is None else first if len(names) == 1 else \
        f"{Path(first).parent.as_posix()}/{case}"
    spec: dict[str, Any] = {**base, "source": source, "id_key": source, **channels, "allowed_labels": allowed}
    target = _resolved(root, label) if ok and label else None
    named = [(f"image {n}", *pair) for n, pair in enumerate(found)] + ([("label", *target)] if target else [])
    error = None
    if not ok:
        error = ("msd_bad_dataset_json", f"dataset.json's 'dataset' entry {case!r} must be {{\"images\": [one path per "
                                         "channel], \"label\": path}}")
    elif len(images) != len(names):
        error = ("nnunet_channel_files", f"{source}: dataset.json's channel_names name {len(names)} channel(s) "
                                         f"({', '.join(names)}), and its 'dataset' entry lists {len(images)} image(s)")
    elif away := [what for what, path, _ in named if path is None]:
        error = ("path_outside_root", f"{source}: dataset.json's 'dataset' entry {case!r} lists its {away[0]} outside "
                                      "the dataset folder (or through an environment variable); medpipe reads only "
                                      "the folder it is given: move the file in and list it by its path there")
    elif missing := [rel for _, path, rel in named if not path.is_file()]:
        error = ("missing_file", f"{missing[0]}: listed in dataset.json's 'dataset' (case {case!r}) but not found")
    if error:
        spec["error"] = error
        return spec, set()
    paths = [path for path, _ in found]
    spec.update(image_path=str(paths[0]))
    if len(names) > 1:
        spec.update(channel_paths=tuple(str(p) for p in paths), channel_sources=tuple(rel for _, rel in found))
    used = set(paths)
    if target is not None:
        spec.update(label_path=str(target[0]), label_source=target[1])
        used.add(target[0])
    else:
        spec["problems"] = (("nnunet_missing_label", f"{source}: dataset.json's 'dataset' entry {case!r} names no "
                                                     "label; ingested unlabeled"),)
    return spec, used


def _ending(meta: dict[str, Any]) -> str:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise IngestError(f"dataset.json's file_ending is {ending!r}; medpipe reads NIfTI "
                          f"({', '.join(NIFTI_ENDINGS)}). Convert the images to NIfTI and set file_ending",
                          code="msd_bad_dataset_json")
    return str(ending)


def _case_spec(root: Path, base: dict[str, Any], folder: str, case: str, found: dict[int, Path], *,
               names: list[str], ending: str, allowed: tuple[int, ...] | None,
               channels: dict[str, Any], files: set[Path], listed: bool) -> dict[str, Any]:
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
    if folder != "imagesTr":
        return spec
    if listed:  # dataset.json's 'dataset' names the training cases and their labels
        spec["problems"] = (("nnunet_unlisted_case", f"{source}: in imagesTr but not in dataset.json's 'dataset' "
                                                     "list; ingested unlabeled"),)
    elif label in files:
        spec.update(label_path=str(label), label_source=relative(root, label))
    else:
        spec["problems"] = (("nnunet_missing_label", f"{source}: in imagesTr but labelsTr/{case}{ending} is missing; "
                                                     "ingested unlabeled"),)
    return spec
