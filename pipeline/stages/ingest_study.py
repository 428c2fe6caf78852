"""The ingest stage's per-study layer: convert one study (DICOM series or NIfTI image + label), or reuse it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import GeometryError, IngestError
from pipeline.fileio import sha256_bytes, sha256_file
from pipeline.io import nib
from pipeline.io.channels import resample_onto, stack_channels
from pipeline.io.dicom import DicomOptions, DicomSeries, decode_series, read_series_bytes, storage_dtype
from pipeline.io.dicom_rtstruct_label import rtstruct_label
from pipeline.io.dicom_seg_label import seg_label
from pipeline.io.nifti import declared_shape, load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Problem, Study

_DECIMALS = 6  # geometry in the manifest, rounded from the float32 affine the NIfTI file stores


@dataclass(frozen=True)
class IngestTask:
    """One study to convert; built in the main process, run (maybe) in a worker."""

    id: str
    source: str
    format: Literal["nifti", "dicom", "unknown"]
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
    max_voxels: int | None = None
    seg_values: tuple[tuple[int, int], ...] | None = None  # a SEG label's segment number -> value, where they differ
    rtstruct_rois: tuple[str, ...] | None = None  # the label is an RT structure set: these ROIs, value 1, 2, ...
    channels: int | None = None  # a 4D NIfTI image of this many channels (dataset.json's modality), channel last
    channel_paths: tuple[str, ...] | None = None  # nnU-Net v2: one 3D file per channel, stacked in this order
    channel_sources: tuple[str, ...] | None = None  # those files (or series) relative to the scan folder (scrubbed)
    channel_series: tuple[DicomSeries, ...] | None = None  # ingest.channels: the series of each channel, in order
    channel_grid: Literal["resample", "refuse"] = "resample"  # a channel series on another grid than the first
    volume: int | None = None  # ingest.split_4d: the volume (from 1, time last) of a 4D image or series this study is
    volumes: int | None = None  # ... of that many


def _load(path: str, rel: str, *, channels: int | None = None, volumes: int | None = None,
          image: bool = False) -> Volume:
    """load_nifti, with the error naming the file relative to the scan folder; ``channels``: a 4D image of
    that many channels is expected (an MSD dataset.json naming several in 'modality'); ``volumes``: a 4D image
    of that many volumes (``ingest.split_4d``; discovery read it in the header)."""
    try:
        volume = load_nifti(path, verify_gzip=True, order="K", allow_4d=channels is not None or volumes is not None)
    except IngestError as exc:
        message = str(exc).replace(f"{Path(path).name}:", f"{rel}:", 1)
        message = message if rel in message else f"{rel}: {message}"
        if exc.code == "nifti_4d" and image:
            message += ("; for one study per volume (fMRI, dynamic or repeated acquisitions), set "
                        "ingest.split_4d=true; for one volume per channel (MSD's BrainTumour or Prostate), name "
                        "each channel in the 'modality' of the folder's dataset.json")
        raise type(exc)(message, code=exc.code) from exc
    held = volume.array.shape[3] if volume.array.ndim == 4 else 1
    if volumes is not None and held != volumes:
        raise IngestError(f"{rel}: holds {held} volume(s) along the 4th axis, but its header declared {volumes} when "
                          "ingest listed the folder: the file changed during ingest; run ingest again",
                          code="file_changed")
    if channels is not None and held != channels:
        raise IngestError(f"{rel}: {held} volume(s) along the 4th axis, but dataset.json names {channels} channels; "
                          "each image must hold one volume per channel, in that order (one file per channel, as "
                          "nnU-Net v2's case_0000.nii.gz, is not read: stack them into one 4D image)",
                          code="nifti_channels")
    return volume


def _one_volume(task: IngestTask) -> Volume:
    """Volume ``task.volume`` (from 1) of a 4D NIfTI image (``ingest.split_4d``), checked to still hold the
    ``task.volumes`` that discovery read in its header."""
    return _volume_of(_load(task.image_path, task.source, volumes=task.volumes), task.volume)  # type: ignore[arg-type]


def _volume_of(image: Volume, volume: int) -> Volume:
    """Volume ``volume`` (from 1) of a 4D image, a 3D image on the same grid, in the file's voxel order."""
    return image.with_array(image.array[..., volume - 1].copy(order="K"))


def _channels_onto_first(volumes: list[Volume], task: IngestTask) -> tuple[Volume, list[tuple[str, str]]]:
    """The channel series' volumes as one image on the first one's grid (``ingest.channels``): each other channel
    on another grid resampled onto it (a problem saying so), or refused with ``channel_grid: refuse``."""
    rels = task.channel_sources or ()
    for volume, rel in zip(volumes, rels, strict=True):
        if volume.array.ndim != 3:
            raise IngestError(f"channel series {rel} holds {volume.array.shape[3]} volumes (a 4D series), and a "
                              "channel is one volume; leave that series out of ingest.channels", code="dicom_channels")
    first, problems = volumes[0], []
    onto: list[Volume] = [first]
    for volume, rel in zip(volumes[1:], rels[1:], strict=True):
        if volume.same_grid(first) or task.channel_grid == "refuse":
            onto.append(volume)  # stack_channels refuses another grid
            continue
        onto.append(first.with_array(resample_onto(volume, first)))
        problems.append(("channel_resampled", f"{rel}: resampled (trilinear) onto the grid of {rels[0]}, the "
                                              f"first channel: spacing {[round(s, 4) for s in volume.spacing]} -> "
                                              f"{[round(s, 4) for s in first.spacing]} mm, shape "
                                              f"{list(volume.spatial_shape)} -> {list(first.spatial_shape)}"))
    return stack_channels(onto, rels), problems


def _stacked(paths: tuple[str, ...], rels: tuple[str, ...]) -> Volume:
    """One file per channel (nnU-Net v2) as one 4D volume, channel last; the files must share one grid."""
    return stack_channels([_load(path, rel) for path, rel in zip(paths, rels, strict=True)], rels)


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


def _discovery_digest(task: IngestTask) -> dict[str, str]:
    """A digest of the problems discovery found, when it found any: a study whose files are unchanged is
    converted again when they change (a file beside it became unreadable, or readable again)."""
    return {"discovery": sha256_bytes(repr(task.problems).encode())} if task.problems else {}


def _reusable(task: IngestTask, inputs: dict[str, str]) -> bool:
    prev = task.previous
    if prev is None or prev.status != "ok" or prev.source != task.source:
        return False
    if any(prev.sha256.get(k) != v for k, v in inputs.items()) or any(
            (name in prev.sha256) != (name in inputs) for name in ("label_input", "discovery")):
        return False
    for rel, name in ((prev.image, "image"), (prev.label, "label")):
        if rel is not None:
            path = Path(task.out_dir) / rel
            if not path.is_file() or sha256_file(path) != prev.sha256.get(name):
                return False
    return True


def _reused(task: IngestTask) -> tuple[Study, bool]:
    """The previous study, reused: a volume of a split series says which (a manifest written before medpipe
    recorded volumes did not, and its unchanged studies are reused, not converted again)."""
    study: Study = task.previous  # type: ignore[assignment]
    if task.volume is not None and (study.volume, study.volumes) != (task.volume, task.volumes):
        study = study.model_copy(update={"volume": task.volume, "volumes": task.volumes})
    return study, True


def _write(task: IngestTask, image: Volume, dtype: Any, label: np.ndarray | None, inputs: dict[str, str],
           problems: list[tuple[str, str]]) -> Study:
    out = Path(task.out_dir)
    image_rel = f"images/{task.id}.nii.gz"
    save_nifti(image, out / image_rel, dtype=dtype)
    hashes = {**inputs, "image": sha256_file(out / image_rel)}
    label_rel = None
    if label is not None:  # a NIfTI label file or a DICOM SEG, on the image's grid
        if not label.any():
            problems = [*problems, ("label_background_only", f"{task.label_source}: the label holds background only "
                                                             "(nothing segmented); kept, check that this is intended")]
        label_rel = f"labels/{task.id}.nii.gz"
        save_nifti(image.with_array(label), out / label_rel, dtype=label.dtype)
        hashes["label"] = sha256_file(out / label_rel)
    held = image.meta.get("volumes", 1)  # a DICOM series kept whole as 4D (time last)
    return Study(id=task.id, source=task.source, format=task.format, status="ok", image=image_rel, label=label_rel,
                 label_source=task.label_source, modality=task.modality, **_geometry(image), sha256=hashes,
                 problems=[Problem(code=c, message=m) for c, m in problems], volume=task.volume,
                 volumes=task.volumes or (held if held > 1 else None))


def process_study(task: IngestTask) -> tuple[Study, bool]:
    """Convert one study (or reuse its unchanged outputs): (manifest entry, reused)."""
    if task.series is not None:
        return _dicom_study(task, [read_series_bytes(s) for s in task.channel_series or (task.series,)], release=True)
    paths, rels = task.channel_paths or (task.image_path,), task.channel_sources or (task.source,)
    sums = [_checksum(path, rel) for path, rel in zip(paths, rels, strict=True)]  # type: ignore[arg-type]
    inputs = _nifti_inputs(task, sums)
    if _reusable(task, inputs):
        return _reused(task)
    for path, rel in zip(paths, rels, strict=True):
        _check_size(path, rel, task.max_voxels)  # type: ignore[arg-type]
    if task.channel_paths:
        image = _stacked(task.channel_paths, rels)  # type: ignore[arg-type]
    elif task.volume is not None:
        image = _one_volume(task)
    else:
        image = _load(task.image_path, task.source, channels=task.channels, image=True)  # type: ignore[arg-type]
    label = _label_array(_load(task.label_path, task.label_source or ""), image, task) if task.label_path else None
    return _write(task, image, _nifti_dtype(image), label, inputs, list(task.problems)), False


def _renumbered(label: np.ndarray, values: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``label`` with each segment number replaced by its value (numbers not listed stay)."""
    table = np.arange(max(int(label.max()), *(n for n, _ in values)) + 1)
    for number, value in values:
        table[number] = value
    return table[label].astype(np.uint8 if table.max() <= 255 else np.int16)


def _checksum(path: str, rel: str) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise IngestError(f"{rel}: cannot read the file ({exc.strerror}); was it moved or deleted during ingest?",
                          code="file_unreadable") from None


def _check_size(path: str, rel: str, max_voxels: int | None) -> None:
    """Refuse a NIfTI file whose header declares more voxels than allowed, before reading its data."""
    shape = declared_shape(path)
    if shape is None:
        return  # load_nifti says what is wrong with the file
    voxels = math.prod(int(n) for n in shape)
    if max_voxels is not None and voxels > max_voxels:
        raise IngestError(f"{rel}: the header declares {list(shape)} = {voxels:,} voxels, more than ingest.max_voxels "
                          f"= {max_voxels:,}; if the image is real, raise ingest.max_voxels and ingest.memory_limit_mb",
                          code="too_large")


def _dicom_study(task: IngestTask, read: list[tuple[str, list[bytes]]], *, release: bool,
                 decoded: dict[str, np.ndarray] | None = None) -> tuple[Study, bool]:
    """A DICOM study from its series' bytes, ``read`` (digest, file bytes) per series (the channel series of
    ``ingest.channels`` in order); ``release``: each file's bytes let go once decoded (none shares them);
    ``decoded``: the files' decoded frames, shared with the other volumes of the same files (``decode_series``)."""
    series = task.channel_series or (task.series,)
    digest = read[0][0] if len(read) == 1 else sha256_bytes(
        f"{'|'.join(d for d, _ in read)}|channels {task.channel_grid}".encode())
    options = task.dicom_options or DicomOptions()
    inputs = {"input": digest, "options": sha256_bytes(repr(options).encode()), **_discovery_digest(task)}
    if task.label_path:  # a DICOM SEG or RT structure set of this series
        inputs["label_input"] = _checksum(task.label_path, task.label_source or "")
        if task.seg_values or task.rtstruct_rois:
            inputs["label_input"] = sha256_bytes(
                f"{inputs['label_input']}|{task.seg_values or ''}|{task.rtstruct_rois or ''}".encode())
    if _reusable(task, inputs):
        return _reused(task)
    volumes = [decode_series(one, blobs, options=options, release=release, decoded=decoded)  # type: ignore[arg-type]
               for one, (_, blobs) in zip(series, read, strict=True)]
    volume = volumes[0]
    problems = [*task.problems, *(p for v in volumes for p in v.meta["problems"])]
    label = None
    if task.label_path and task.rtstruct_rois:
        label, outlined = rtstruct_label(task.label_path, volume, rois=task.rtstruct_rois,
                                         rel=task.label_source or "")
        problems += outlined
    elif task.label_path:
        label = seg_label(task.label_path, volume, rel=task.label_source or "")
        label = _renumbered(label, task.seg_values) if task.seg_values else label
    if task.channel_series:
        volume, resampled = _channels_onto_first(volumes, task)
        problems += resampled
    return _write(task, volume, storage_dtype(volume.array), label, inputs, problems), False


def _nifti_inputs(task: IngestTask, sums: list[str]) -> dict[str, str]:
    """The input checksums a NIfTI study is reused by: its file(s) (``sums``), how they are read, its label."""
    inputs = {"input": sums[0] if len(sums) == 1 else sha256_bytes("|".join(sums).encode()),
              **_discovery_digest(task)}
    if task.channels:  # the same file read as channels is another study
        inputs["input"] = sha256_bytes(f"{inputs['input']}|channels {task.channels}".encode())
    if task.volume is not None:  # one volume of a 4D image: each is a study of its own
        inputs["input"] = sha256_bytes(f"{inputs['input']}|volume {task.volume} of {task.volumes}".encode())
    if task.label_path:
        label_sha = _checksum(task.label_path, task.label_source or "")
        inputs["label_input"] = sha256_bytes(f"{label_sha}|{task.allowed_labels}".encode())
    return inputs


def _nifti_dtype(image: Volume) -> Any:
    """The source's own type where the voxels kept it, else float32 (scaled data)."""
    source_dtype = np.dtype(image.meta["source_dtype"])
    return source_dtype.newbyteorder("=") if image.array.dtype == source_dtype else np.float32


def _nifti_volumes(tasks: tuple[IngestTask, ...]) -> list[tuple[Study, bool]]:
    """The volume studies of one 4D NIfTI image: the file checksummed once and, unless all are reused, read once."""
    first = tasks[0]
    source = _checksum(first.image_path, first.source)  # type: ignore[arg-type]
    inputs = [_nifti_inputs(task, [source]) for task in tasks]
    done: list[tuple[Study, bool] | None] = [_reused(task) if _reusable(task, digests) else None
                                             for task, digests in zip(tasks, inputs, strict=True)]
    if all(one is not None for one in done):
        return done  # type: ignore[return-value]
    _check_size(first.image_path, first.source, first.max_voxels)  # type: ignore[arg-type]
    image = _load(first.image_path, first.source, volumes=first.volumes)  # type: ignore[arg-type]
    dtype = _nifti_dtype(image)
    for k, (task, digests) in enumerate(zip(tasks, inputs, strict=True)):
        if done[k] is None:
            one = _volume_of(image, task.volume)  # type: ignore[arg-type]
            done[k] = (_write(task, one, dtype, None, digests, list(task.problems)), False)
    return done  # type: ignore[return-value]


def shared_source(task: IngestTask) -> tuple[str, ...] | None:
    """What the volume studies of one source read alike (``ingest.split_4d``): a 4D NIfTI image, or the files of
    a DICOM series whose every volume lies in the same files (an enhanced multi-frame file); None for a study
    read alone (a label, channels, or files of its own)."""
    if task.volume is None or task.label_path or task.channel_series or task.channel_paths:
        return None
    if task.series is not None:
        return ("dicom", *(h.path for h in task.series.headers))
    return ("nifti", task.image_path) if task.format == "nifti" and task.image_path else None


def process_volumes(tasks: tuple[IngestTask, ...]) -> list[tuple[Study, bool]]:
    """The studies of ``tasks``, volumes of one source (:func:`shared_source`), each as :func:`process_study` gives
    it; the source is read and checksummed once for all of them, not once a volume (which made splitting a 4D
    source of N volumes cost N reads of it: 55 s for a 200-volume NIfTI run, 41.6 MB)."""
    key = shared_source(tasks[0])
    if key is None or any(shared_source(task) != key for task in tasks):
        raise ValueError("process_volumes takes volume studies of one source (see shared_source)")
    if key[0] == "nifti":
        return _nifti_volumes(tasks)
    read, decoded = [read_series_bytes(tasks[0].series)], {}  # type: ignore[arg-type]
    return [_dicom_study(task, read, release=False, decoded=decoded) for task in tasks]


def process_job(job: tuple[IngestTask, ...]) -> list[tuple[Study, bool]]:
    """A worker job of ingest: one study (:func:`process_study`), or the volumes of one source
    (:func:`process_volumes`; see ``ingest_volumes.volume_jobs``)."""
    return [process_study(job[0])] if len(job) == 1 else process_volumes(job)
