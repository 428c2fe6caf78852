"""The NIfTI images of a folder given to ``medpipe infer``: what each is called, and what is refused.

Listed like ingest lists a scan folder (:func:`pipeline.stages.ingest_listing.scan_listing`): links
are never followed out of the folder, the output folder and folders an earlier medpipe run wrote
are left out, and names are written as ingest writes them (``\\xNN`` for bytes that are not UTF-8 and
characters that do not print: :func:`pipeline.fileio.writable`). An image is called by its
file's stem; where two images share a stem (their predictions would share a file name), both are
refused by name. A link to an image outside the folder is refused too, so that every image the
folder names is accounted for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StageError
from pipeline.fileio import writable
from pipeline.io.nifti import is_nifti, nifti_stem
from pipeline.stages.ingest_listing import relative, scan_listing


@dataclass(frozen=True)
class FolderImage:
    """One NIfTI image of the folder: its id (the file's stem; its relative path when refused), where it is,
    its path relative to the folder, and (code, message) when it is refused."""

    id: str
    path: Path
    rel: str
    error: tuple[str, str] | None = None
    channel_paths: tuple[Path, ...] | None = None  # a case of one file per channel (nnU-Net v2), in order


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))  # hidden files and folders are not inputs


def folder_images(folder: Path, *, exclude: Path | None = None, channels: int = 1) -> list[FolderImage]:
    """Every NIfTI image under ``folder`` (any depth, hidden ones skipped), sorted by relative path, with the
    refused ones (a shared stem, a link leaving the folder) among them; ``exclude``: the output folder.
    With several ``channels``, files named ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... (nnU-Net v2) are
    one image each case, called CASE; a case lacking a channel file, or holding one too many, is refused."""
    listing = scan_listing(folder, exclude=exclude.resolve() if exclude is not None else None)
    found = [(relative(folder, p), p) for p in listing.files if is_nifti(p)]
    images, found = _cases([(rel, path) for rel, path in found if _visible(rel)], channels) if channels > 1 else \
        ([], found)
    by_stem: dict[str, list[tuple[str, Path]]] = {}
    for image in images:
        by_stem.setdefault(image.id, []).append((image.rel, image.path))
    for rel, path in found:
        if _visible(rel):
            by_stem.setdefault(writable(nifti_stem(path)), []).append((rel, path))
    cases = {image.rel: image for image in images}
    images = []
    for stem, named in by_stem.items():
        if len(named) == 1:
            rel, path = named[0]
            images.append(cases.get(rel) or FolderImage(id=stem, path=path, rel=rel))
            continue
        for rel, path in named:
            others = ", ".join(other for other, _ in named if other != rel)
            images.append(FolderImage(id=rel, path=path, rel=rel, error=(
                "duplicate_name", f"{rel}: its prediction would be named {stem}.nii.gz like {others}; rename one "
                                  "of the inputs")))
    for link in listing.links:
        rel = relative(folder, link.path)
        if is_nifti(link.path) and _visible(rel):
            reason = ("a link pointing outside the input folder; not followed. Copy the image into the input "
                      "folder, or pass the folder it points to") if link.leads == "outside" else (
                      "a link pointing nowhere (its target is missing, or links loop)")
            images.append(FolderImage(id=rel, path=link.path, rel=rel, error=(link.code, f"{rel}: {reason}")))
    return sorted(images, key=lambda image: image.rel)


_CASE_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$", re.IGNORECASE)


def _cases(found: list[tuple[str, Path]], channels: int) -> tuple[list[FolderImage], list[tuple[str, Path]]]:
    """(the cases of one file per channel among ``found``, the files that are not a case's)."""
    groups: dict[tuple[str, str], dict[int, tuple[str, Path]]] = {}
    rest = []
    for rel, path in found:
        match = _CASE_FILE.match(path.name)
        if match is None:
            rest.append((rel, path))
            continue
        folder = rel.rpartition("/")[0]
        groups.setdefault((folder, match["case"]), {})[int(match["channel"])] = (rel, path)
    images = []
    for (folder, case), files in groups.items():
        name = writable(case)
        rel = f"{folder}/{name}" if folder else name
        wanted = range(channels)
        if sorted(files) == list(wanted):
            images.append(FolderImage(id=name, path=files[0][1], rel=rel,
                                      channel_paths=tuple(files[n][1] for n in wanted)))
            continue
        missing = [f"{name}_{n:04d}" for n in wanted if n not in files]
        extra = [files[n][0] for n in sorted(files) if n >= channels]
        what = f"{', '.join(missing)} missing" if missing else f"{', '.join(extra)} beyond them"
        images.append(FolderImage(id=rel, path=files[min(files)][1], rel=rel, error=(
            "channel_files", f"{rel}: the model takes {channels} channels, one file each (CASE_0000.nii.gz, ...), "
                             f"and {what}")))
    return images, rest


def label_folder(folder: Path) -> tuple[dict[str, Path], list[FolderImage]]:
    """``({id: label file}, refused)`` for a plain folder of label NIfTIs (predictions or references), ids by
    file stem. Two files sharing a stem are refused, never one silently paired in place of the other."""
    images = folder_images(folder)
    return {image.id: image.path for image in images if image.error is None}, [i for i in images if i.error]


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def no_images(input: Path, *, exclude: Path | None = None) -> StageError:
    """The error for an input that is not, and holds no, NIfTI image; where it holds DICOM files, it says to
    ingest them first (their names are not shown: folders of DICOM files are often named after patients)."""
    if input.is_dir():
        files = scan_listing(input, exclude=exclude.resolve() if exclude is not None else None).files
    else:
        files = [input] if input.is_file() else []
    if any(_is_dicom(path) for path in files[:64]):
        what, scan = ("holds DICOM files", input) if input.is_dir() else ("is a DICOM file", input.parent)
        return StageError(f"{input}: {what}, not NIfTI images; infer predicts on what ingest converts: run "
                          f"'medpipe ingest {scan} --out INGEST' first, then infer on INGEST; 'medpipe export-seg "
                          f"--scan {scan} --predictions PRED --out SEGS' then writes the predictions as DICOM SEG on "
                          "their series", code="no_inputs")
    if not input.exists():
        return StageError(f"{input} does not exist; give an ingest folder, a folder of NIfTI images or a NIfTI "
                          "file", code="input_missing")
    what = "no NIfTI images (.nii/.nii.gz) found" if input.is_dir() else "not a NIfTI image (.nii/.nii.gz)"
    return StageError(f"{input}: {what}; give an ingest folder, a folder of NIfTI images or a NIfTI file",
                      code="no_inputs")


def image_inputs(images: Iterable[tuple[str, Path, Sequence[Path] | None]]) -> dict[str, Path]:
    """A stage's inputs (what a rerun compares) for images read from a folder, given as (name, path, channel
    files): ``image:NAME`` for a file, ``image:NAME#n`` for the n-th file of a case of one file per channel."""
    inputs: dict[str, Path] = {}
    for name, path, channel_paths in images:
        if channel_paths:
            inputs.update({f"image:{name}#{n}": channel for n, channel in enumerate(channel_paths)})
        else:
            inputs[f"image:{name}"] = path
    return inputs

