"""The ingest stage: find NIfTI, MSD and DICOM studies under a scan folder; write images, labels, manifest."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import nibabel as nib
import numpy as np

from pipeline.batch import run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import GeometryError, IngestError, PipelineError
from pipeline.fileio import read_json, sha256_bytes, sha256_file
from pipeline.io.dicom import (
    DicomOptions,
    DicomSeries,
    decode_series,
    discover_series,
    read_series_bytes,
    skip_reason,
    storage_dtype,
)
from pipeline.io.nifti import is_nifti, load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Problem, Study, load_manifest, pseudonym, save_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

_DECIMALS = 6  # geometry in the manifest, rounded from the float32 affine the NIfTI file stores


@dataclass(frozen=True)
class IngestTask:
    """One study to convert; built in the main process, run (maybe) in a worker."""

    id: str
    source: str
    format: Literal["nifti", "dicom"]
    out_dir: str
    image_path: str | None = None
    label_path: str | None = None
    label_source: str | None = None
    allowed_labels: tuple[int, ...] | None = None
    modality: str | None = None
    series: DicomSeries | None = None
    dicom_options: DicomOptions | None = None
    previous: Study | None = None
    problems: tuple[tuple[str, str], ...] = ()
    error: tuple[str, str] | None = None  # decided at discovery: (code, message)
    skip: tuple[str, str] | None = None


# ---- discovery -----------------------------------------------------------------------------


def list_scan_files(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """Every regular file under ``root`` (sorted), leaving out symlinks that point outside it."""
    real_root = root.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve().is_relative_to(exclude):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                log.warning("%s: a link pointing outside the scan folder; ignored", path.relative_to(root).as_posix())
                continue
            if path.is_file():
                files.append(path)
    return files


def _listing_digest(root: Path, files: list[Path]) -> str:
    lines = [f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for p in files]
    return sha256_bytes(("\n".join([str(root.resolve()), *lines])).encode())


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root``, else None."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return root / pure


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
        else:
            pairs = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise IngestError("dataset.json 'labels' must map integer values to names",
                          code="msd_bad_dataset_json") from exc
    return meta, {str(k): pairs[k] for k in sorted(pairs)}


def _msd_tasks(root: Path, base: dict[str, Any], files: set[Path]) -> tuple[list[dict[str, Any]], set[Path], dict]:
    """Study specs from dataset.json's training list, imagesTs and unlisted imagesTr images."""
    meta, labels = _read_msd(root)
    modality = meta.get("modality")
    modality = str(next(iter(modality.values()))) if isinstance(modality, dict) and len(modality) == 1 else None
    allowed = tuple(int(k) for k in labels) if labels else None
    specs: list[dict[str, Any]] = []
    consumed = {root / "dataset.json"} | {p for p in files if p.parent == root / "labelsTr"}
    for entry in meta.get("training", []):
        image_rel = str(entry.get("image", "")) if isinstance(entry, dict) else ""
        label_rel = str(entry.get("label", "")) if isinstance(entry, dict) else ""
        image, label = _inside(root, image_rel), _inside(root, label_rel)
        source = PurePosixPath(image_rel).as_posix()
        spec = {**base, "source": source, "modality": modality, "allowed_labels": allowed,
                "label_source": PurePosixPath(label_rel).as_posix() if label_rel else None}
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
        rel = path.relative_to(root).as_posix()
        problems = () if path.parent.name == "imagesTs" else (
            ("msd_unlisted_image", f"{rel}: in imagesTr but not in dataset.json's training list; ingested unlabeled"),)
        specs.append({**base, "source": rel, "image_path": str(path), "modality": modality, "problems": problems})
        consumed.add(path)
    return specs, consumed, {"dataset": meta.get("name"), "labels": labels}


def discover(root: Path, files: list[Path], *, out_dir: Path, key: str, previous: dict[str, Study],
             dicom_options: DicomOptions | None = None,
             split_4d: bool = False) -> tuple[list[IngestTask], dict[str, Any]]:
    """All tasks under ``root`` and the manifest header (dataset name, labels, ignored file count)."""
    base: dict[str, Any] = {"out_dir": str(out_dir)}
    specs: list[dict[str, Any]] = []
    header: dict[str, Any] = {"dataset": None, "labels": None}
    remaining = set(files)
    if (root / "dataset.json").is_file():
        msd_specs, consumed, header = _msd_tasks(root, base, remaining)
        specs += [{**s, "format": "nifti", "id_key": s["source"]} for s in msd_specs]
        remaining -= consumed
    others = sorted(remaining)
    for path in others:
        if is_nifti(path):
            rel = path.relative_to(root).as_posix()
            specs.append({**base, "format": "nifti", "source": rel, "id_key": rel, "image_path": str(path)})
    scan = discover_series([p for p in others if not is_nifti(p)], root=root, split_4d=split_4d)
    for series in scan.series:
        specs.append({**base, "format": "dicom", "source": series.folder, "id_key": series.key, "series": series,
                      "modality": series.modality, "skip": skip_reason(series),
                      "dicom_options": dicom_options or DicomOptions()})
    tasks = []
    for spec in specs:
        study_id = pseudonym(spec.pop("id_key"), key=key)
        tasks.append(IngestTask(id=study_id, previous=previous.get(study_id), **spec))
    header["ignored_files"] = scan.ignored
    return tasks, header


# ---- one study -----------------------------------------------------------------------------


def _load(path: str, rel: str) -> Volume:
    """load_nifti, with the error naming the file relative to the scan folder."""
    try:
        return load_nifti(path)
    except IngestError as exc:
        message = str(exc).replace(f"{Path(path).name}:", f"{rel}:", 1)
        raise type(exc)(message if rel in message else f"{rel}: {message}", code=exc.code) from exc


def _label_array(label: Volume, image: Volume, task: IngestTask) -> np.ndarray:
    rel = task.label_source
    if not label.same_grid(image):
        raise GeometryError(f"{rel}: label grid (shape {list(label.spatial_shape)}, spacing "
                            f"{[round(s, 4) for s in label.spacing]}) differs from image {task.source} (shape "
                            f"{list(image.spatial_shape)}, spacing {[round(s, 4) for s in image.spacing]}); "
                            "resample the label onto the image grid", code="label_grid_mismatch")
    data = label.array
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        off = np.flatnonzero(rounded != data)
        if off.size:
            raise IngestError(f"{rel}: {off.size} label voxels are not whole numbers (e.g. "
                              f"{float(data.flat[off[0]]):.4g}); labels must be integer class values",
                              code="label_not_integer")
        data = rounded
    values = [int(v) for v in np.unique(data)]
    allowed = task.allowed_labels
    undeclared = [v for v in values if (v not in allowed if allowed is not None else v < 0)]
    if undeclared:
        declared = f"declared {list(allowed)}" if allowed is not None else "labels must be >= 0"
        raise IngestError(f"{rel}: label values {undeclared[:10]} are not in the declared label set ({declared}); "
                          "fix the label file or dataset.json 'labels'", code="label_undeclared_values")
    dtype = np.uint8 if values[-1] <= 255 else np.int16
    if values[-1] > np.iinfo(np.int16).max:
        raise IngestError(f"{rel}: label value {values[-1]} is too large", code="label_undeclared_values")
    return data.astype(dtype)


def _geometry(volume: Volume) -> dict[str, Any]:
    affine = volume.affine.astype(np.float32).astype(np.float64)  # what the saved sform holds
    return {
        "shape": list(volume.spatial_shape),
        "spacing": [round(float(v), _DECIMALS) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "affine": [[round(float(v), _DECIMALS) + 0.0 for v in row] for row in affine],
    }


def _reusable(task: IngestTask, inputs: dict[str, str]) -> bool:
    prev = task.previous
    if prev is None or prev.status != "ok" or prev.source != task.source:
        return False
    if any(prev.sha256.get(k) != v for k, v in inputs.items()) or ("label_input" in prev.sha256) != (
            "label_input" in inputs):
        return False
    for rel, name in ((prev.image, "image"), (prev.label, "label")):
        if rel is not None:
            path = Path(task.out_dir) / rel
            if not path.is_file() or sha256_file(path) != prev.sha256.get(name):
                return False
    return True


def _write(task: IngestTask, image: Volume, dtype: Any, label: np.ndarray | None, inputs: dict[str, str],
           problems: list[tuple[str, str]]) -> Study:
    out = Path(task.out_dir)
    image_rel = f"images/{task.id}.nii.gz"
    save_nifti(image, out / image_rel, dtype=dtype)
    hashes = {**inputs, "image": sha256_file(out / image_rel)}
    label_rel = None
    if label is not None:
        label_rel = f"labels/{task.id}.nii.gz"
        save_nifti(image.with_array(label), out / label_rel, dtype=label.dtype)
        hashes["label"] = sha256_file(out / label_rel)
    return Study(id=task.id, source=task.source, format=task.format, status="ok", image=image_rel, label=label_rel,
                 label_source=task.label_source, modality=task.modality, **_geometry(image), sha256=hashes,
                 problems=[Problem(code=c, message=m) for c, m in problems])


def process_study(task: IngestTask) -> tuple[Study, bool]:
    """Convert one study (or reuse its unchanged outputs): (manifest entry, reused)."""
    if task.series is not None:
        digest, blobs = read_series_bytes(task.series)
        options = task.dicom_options or DicomOptions()
        inputs = {"input": digest, "options": sha256_bytes(repr(options).encode())}
        if _reusable(task, inputs):
            return task.previous, True  # type: ignore[return-value]
        volume = decode_series(task.series, blobs, options=options)
        del blobs
        return _write(task, volume, storage_dtype(volume.array), None, inputs,
                      [*task.problems, *volume.meta["problems"]]), False
    inputs = {"input": sha256_file(task.image_path)}  # type: ignore[arg-type]
    if task.label_path:
        inputs["label_input"] = sha256_bytes(f"{sha256_file(task.label_path)}|{task.allowed_labels}".encode())
    if _reusable(task, inputs):
        return task.previous, True  # type: ignore[return-value]
    image = _load(task.image_path, task.source)  # type: ignore[arg-type]
    source_dtype = np.dtype(image.meta["source_dtype"])
    dtype = source_dtype.newbyteorder("=") if image.array.dtype == source_dtype else np.float32
    label = None
    if task.label_path:
        label = _label_array(_load(task.label_path, task.label_source or ""), image, task)
    return _write(task, image, dtype, label, inputs, list(task.problems)), False


# ---- the stage -----------------------------------------------------------------------------


def _study_for(task: IngestTask, status: Literal["failed", "skipped"], code: str, message: str) -> Study:
    if task.source not in message:
        message = f"{task.source}: {message}"
    problem = Problem(code=code, message=message)
    return Study(id=task.id, source=task.source, format=task.format, status=status, label_source=task.label_source,
                 modality=task.modality, problems=[problem] if status == "skipped" else [],
                 error=problem if status == "failed" else None)


def _previous_studies(out: Path) -> dict[str, Study]:
    if not (out / "manifest.json").is_file():
        return {}
    try:
        return load_manifest(out).by_id()
    except PipelineError as exc:
        log.warning("ignoring the existing manifest (%s); every study is converted again", exc.code)
        return {}


def _remove_orphans(out: Path, keep: set[str]) -> None:
    for folder in ("images", "labels"):
        for path in sorted((out / folder).glob("*.nii.gz")):
            if f"{folder}/{path.name}" not in keep:
                log.info("removing %s/%s: no longer produced by this scan folder", folder, path.name)
                path.unlink()


def ingest(scan_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False) -> dict:
    """Convert every study under ``scan_dir`` into ``out`` (images/, labels/, manifest.json, record.json).

    Accepts NIfTI files, an MSD-style dataset folder and DICOM series, mixed. A study that
    cannot be converted is recorded as failed with a code and reason; the others go on.
    """
    config = config or PipelineConfig()
    scan_dir, out = Path(scan_dir), Path(out)
    if not scan_dir.is_dir():
        raise IngestError(f"scan folder {scan_dir} does not exist or is not a folder; pass the folder holding "
                          "the NIfTI/DICOM files", code="scan_dir_missing")
    files = list_scan_files(scan_dir, exclude=out.resolve())
    if not files:
        raise IngestError(f"scan folder {scan_dir} is empty; nothing to ingest", code="scan_dir_empty")
    listing = _listing_digest(scan_dir, files)

    def work(record: StageRecord) -> list[Path]:
        previous = _previous_studies(out)
        options = DicomOptions(gantry_tilt=config.ingest.gantry_tilt,
                               irregular_slices=config.ingest.irregular_slices)
        tasks, header = discover(scan_dir, files, out_dir=out, key=config.ingest.pseudonym_key, previous=previous,
                                 dicom_options=options, split_4d=config.ingest.split_4d)
        if not tasks:
            raise IngestError(f"scan folder {scan_dir} holds {len(files)} files but no NIfTI image or DICOM image "
                              "series", code="no_studies")
        runnable = [t for t in tasks if t.error is None and t.skip is None]
        outcomes = {o.key: o for o in run_batch(runnable, process_study, key=lambda t: t.id,
                                                workers=config.ingest.workers, desc="ingest")}
        studies = []
        for task in tasks:
            reused = False
            if task.skip or task.error:
                status: Literal["failed", "skipped"] = "skipped" if task.skip else "failed"
                code, message = task.skip or task.error  # type: ignore[misc]
                study = _study_for(task, status, code, message)
            elif outcomes[task.id].ok:
                study, reused = outcomes[task.id].result  # type: ignore[misc]
            else:
                outcome = outcomes[task.id]
                study = _study_for(task, "failed", outcome.code or "ingest_error", outcome.message or "")
            if study.status != "ok":
                log.warning("study %s (%s) %s: [%s] %s", study.id, study.source, study.status,
                            (study.error or study.problems[0]).code, (study.error or study.problems[0]).message)
            studies.append(study)
            problem = study.error or (study.problems[0] if study.status == "skipped" else None)
            record.add(StudyStatus(id=study.id, status=study.status, code=problem.code if problem else None,
                                   message=problem.message if problem else None, reused=reused))
        studies.sort(key=lambda s: (s.source, s.id))
        manifest = Manifest(dataset=header["dataset"], labels=header["labels"], studies=studies)
        outputs = [save_manifest(manifest, out)]
        keep = {p for s in studies if s.status == "ok" for p in (s.image, s.label) if p}
        _remove_orphans(out, keep)
        outputs += [out / p for p in sorted(keep)]
        record.extra["ignored_files"] = header["ignored_files"]
        record.extra["reused_studies"] = sum(1 for s in record.studies if s.reused)
        return outputs

    return execute_stage("ingest", out, config=config, inputs={}, work=work, force=force,
                         extra_hash={"scan": listing})
