"""The preprocess stage: fingerprint the labelled studies, write plans.json, resample and normalise each study."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batch import outcome_summary, run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import GeometryError, StageError
from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.io.channels import channel_last, load_channels
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Study, load_manifest
from pipeline.planning import StudyFingerprint, dataset_fingerprint, make_plans, study_fingerprint
from pipeline.plans_file import load_plans_file
from pipeline.preprocess_cache import PreprocessCache, key_digest, preprocessing_code_version, study_key
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.sharding import shard_out, study_selector
from pipeline.stages.common import execute_stage
from pipeline.transforms.preprocessing import preprocessing_transforms

log = logging.getLogger(__name__)

STAGE = "preprocess"
PLANS_NAME = "plans.json"
DATASET_NAME = "dataset.json"
DATA_DIR = "data"
COMPUTED, REUSED, CACHED = "computed", "reused", "cached"


@dataclass(frozen=True)
class StudyInput:
    """One labelled study as preprocessing sees it: absolute paths to its ingested image and label."""

    id: str
    image: Path
    label: Path
    modality: str | None = None
    source: str = ""


def training_studies(manifest: Manifest, ingest_dir: Path) -> tuple[list[StudyInput], list[StudyStatus]]:
    """The ok studies with a label (the training set), and skip statuses for all others."""
    chosen: list[StudyInput] = []
    skipped: list[StudyStatus] = []
    for study in sorted(manifest.studies, key=lambda s: s.id):
        reason = _skip_reason(study)
        image, label = _inside(ingest_dir, study.image), _inside(ingest_dir, study.label)
        if reason is None and image is not None and label is not None:
            chosen.append(StudyInput(id=study.id, image=image, label=label, modality=study.modality,
                                     source=study.source))
        elif reason is None:
            skipped.append(StudyStatus(id=study.id, status="failed", code="path_outside_ingest",
                                       message="the manifest's image or label path leaves the ingest folder; "
                                               "rerun ingest to rewrite the manifest"))
        else:
            code, message = reason or ("no_image", "the manifest names no image or label")
            skipped.append(StudyStatus(id=study.id, status="skipped", code=code, message=message))
    return chosen, skipped


def _inside(root: Path, relative: str | None) -> Path | None:
    """``root / relative`` when it stays inside ``root`` (no ``..`` or absolute escapes), else None."""
    if not relative:
        return None
    path = root / relative
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return path


def _skip_reason(study: Study) -> tuple[str, str] | None:
    if study.status != "ok":
        return "not_ingested", f"ingest status is {study.status}; not part of the training set"
    if not study.image:
        return "no_image", "the manifest names no image for this study"
    if not study.label:
        return "no_label", "no label; only labelled studies are preprocessed for training"
    return None


def fingerprint_study(item: StudyInput, *, orientation: str, channels: Sequence[str] | None = None) -> StudyFingerprint:
    """Load one study (of the manifest's ``channels``) and measure it (module level, so worker processes can
    pickle it)."""
    image = load_channels(item.image, channels, order="K")  # the file's voxel order: no transposing copies
    label = load_nifti(item.label, order="K")
    return study_fingerprint(item.id, image, label, orientation=orientation, modality=item.modality)


def output_paths(out: Path, study_id: str) -> tuple[Path, Path, Path]:
    data = out / DATA_DIR
    return data / f"{study_id}_image.nii.gz", data / f"{study_id}_label.nii.gz", data / f"{study_id}.json"


def _reusable(item: StudyInput, out: Path, key: dict[str, Any]) -> bool:
    """True when this study's outputs exist, match their recorded checksums and came from the same key."""
    image_out, label_out, sidecar = output_paths(out, item.id)
    if not (sidecar.is_file() and image_out.is_file() and label_out.is_file()):
        return False
    try:
        meta = read_json(sidecar)
    except ValueError:
        return False
    return (
        isinstance(meta, dict)
        and meta.get("key") == key
        and meta.get("outputs", {}).get("image") == sha256_file(image_out)
        and meta.get("outputs", {}).get("label") == sha256_file(label_out)
    )


def _compute(item: StudyInput, plans: dict[str, Any], image_out: Path, label_out: Path) -> list[int]:
    """Transform one study per the plans and write its image (float32) and label (uint8); return the shape."""
    data = preprocessing_transforms(plans, keys=("image", "label"), file_order=True)({"image": str(item.image),
                                                                                      "label": str(item.label)})
    image, label = data["image"], data["label"]
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.allclose(affine, np.asarray(label.affine, dtype=np.float64), atol=1e-4) or \
            image.shape[1:] != label.shape[1:]:
        raise GeometryError(f"study {item.id}: image and label ended on different grids after preprocessing",
                            code="label_grid_mismatch")
    classes = np.rint(np.asarray(label[0], dtype=np.float32))
    if classes.min() < 0 or classes.max() >= plans["num_classes"]:
        raise StageError(f"study {item.id}: label values {int(classes.min())}..{int(classes.max())} lie outside "
                         f"the plans' {plans['num_classes']} classes", study_id=item.id, code="label_out_of_range")
    # in whatever voxel order the transforms left (nibabel writes Fortran order; an F-ordered array needs no copy)
    save_nifti(Volume(channel_last(np.asarray(image, dtype=np.float32)), affine), image_out, dtype=np.float32)
    save_nifti(Volume(classes.astype(np.uint8, order="K"), affine), label_out, dtype=np.uint8)
    return [int(s) for s in image.shape[1:]]


def preprocess_study(item: StudyInput, *, plans: dict[str, Any], out: Path, code: str | None = None,
                     cache_dir: Path | None = None) -> str:
    """Bring one study's outputs into ``out/data``; return how: ``reused``, ``cached`` or ``computed``.

    Outputs already in ``out`` from the same key (input checksums, resampling plans, code) are
    reused; else a verified entry of the shared cache in ``cache_dir`` is linked or copied in;
    else the study is computed and, with a ``cache_dir``, stored there for other runs.
    """
    key = study_key(image_sha=sha256_file(item.image), label_sha=sha256_file(item.label), plans=plans,
                    code=code or preprocessing_code_version())
    if _reusable(item, out, key):
        return REUSED
    image_out, label_out, sidecar = output_paths(out, item.id)
    cache = PreprocessCache(Path(cache_dir)) if cache_dir is not None else None
    digest = key_digest(key)
    meta = cache.fetch(digest, image_out=image_out, label_out=label_out) if cache is not None else None
    shape = meta["shape"] if meta is not None else _compute(item, plans, image_out, label_out)
    write_json_atomic(sidecar, {"key": key, "shape": shape,
                                "outputs": {"image": sha256_file(image_out), "label": sha256_file(label_out)}})
    if meta is not None:
        return CACHED
    if cache is not None:
        cache.store(digest, key=key, image=image_out, label=label_out, shape=shape)
    return COMPUTED


def _labels(manifest: Manifest) -> dict[str, str] | None:
    return dict(manifest.labels) if manifest.labels else None


def _fingerprints(items: list[StudyInput], *, orientation: str, channels: list[str] | None, config: PipelineConfig,
                  owns: Callable[[str], bool], record: StageRecord) -> tuple[list[StudyFingerprint], list[StudyInput]]:
    """Fingerprint every training study; failures go to the record (for the studies this shard owns)."""
    fingerprints: list[StudyFingerprint] = []
    usable: list[StudyInput] = []
    for outcome in run_batch(items, functools.partial(fingerprint_study, orientation=orientation, channels=channels),
                             key=lambda it: it.id, desc="fingerprint", execution=config.execution):
        if outcome.ok and outcome.result is not None:
            fingerprints.append(outcome.result)
            usable.append(outcome.item)
        else:
            log.warning("%s: %s", outcome.key, outcome.message)
            if owns(outcome.key):
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
    return fingerprints, usable


def _log_overrides(overrides: dict[str, Any], planned: dict[str, Any], source: Path) -> None:
    for key in sorted(overrides):
        if key in planned and planned[key] != overrides[key]:
            log.info("plans: %s from %s replaces the planned %s", key, source, json.dumps(planned[key]))
        else:
            log.info("plans: %s from %s (same as planned)", key, source)


def preprocess(ingest_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False) -> dict:
    """Fingerprint the ingested training set, write plans.json, then preprocess every labelled study into out/data.

    ``preprocess.plans_file`` (validated before anything runs) replaces planned values and is an
    input of the stage, so editing it reruns preprocessing. ``preprocess.cache_dir`` shares
    preprocessed studies between runs (see :mod:`pipeline.preprocess_cache`).
    """
    config = config or PipelineConfig()
    ingest_dir, out = Path(ingest_dir), shard_out(Path(out), config)
    manifest_path = ingest_dir / "manifest.json"
    owns = study_selector(config)  # a shard plans from every study but writes only its own
    plans_file = config.preprocess.plans_file
    overrides = load_plans_file(plans_file) if plans_file is not None else {}
    cache_dir = config.preprocess.cache_dir

    def work(record: StageRecord) -> list[Path]:
        manifest = load_manifest(manifest_path)
        items, skipped = training_studies(manifest, ingest_dir)
        for status in skipped:
            if owns(status.id):
                record.add(status)
        if not items:
            raise StageError(f"{manifest_path}: no ok studies with a label, so there is nothing to train on; "
                             "check the ingest record for failures and that labels were found")
        orientation = overrides.get("orientation", config.preprocess.orientation)
        channels = manifest.channels if manifest.channels and len(manifest.channels) > 1 else None
        fingerprints, usable = _fingerprints(items, orientation=orientation, channels=channels, config=config,
                                             owns=owns, record=record)
        if not fingerprints:
            raise StageError(f"every labelled study in {manifest_path} failed to load; see record.json in {out}")
        fingerprint = dataset_fingerprint(fingerprints)
        plans = make_plans(fingerprint, config=config.preprocess, labels=_labels(manifest), overrides=overrides,
                           overrides_source=str(plans_file), channels=channels)
        if overrides:
            planned = make_plans(fingerprint, config=config.preprocess, labels=_labels(manifest), channels=channels)
            _log_overrides(overrides, planned, Path(str(plans_file)))
            record.extra["plans_file_keys"] = sorted(overrides)
        write_json_atomic(out / PLANS_NAME, plans)
        log.info("plans: target spacing %s, normalization %s, %d classes, patch %s, batch %d, %d levels%s",
                 plans["target_spacing"], plans["normalization"], plans["num_classes"], plans["patch_size"],
                 plans["batch_size"], len(plans["network"]["strides"]),
                 "".join(f", channel {c['name']}: {c['normalization']}" for c in plans.get("channels", ())))
        entries: list[dict[str, str]] = []
        outputs: list[Path] = [out / PLANS_NAME, out / DATASET_NAME]
        sources = {it.id: it.source for it in usable}
        if cache_dir is not None:
            PreprocessCache(Path(cache_dir)).sweep()
        run = functools.partial(preprocess_study, plans=plans, out=out, code=preprocessing_code_version(),
                                cache_dir=cache_dir)
        done = list(run_batch([it for it in usable if owns(it.id)], run, key=lambda it: it.id, desc="preprocess",
                              execution=config.execution))
        log.info("preprocess: %s", outcome_summary(done))
        for outcome in done:
            if not outcome.ok:
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
                continue
            image_out, label_out, sidecar = output_paths(out, outcome.key)
            record.add(StudyStatus(id=outcome.key, status="ok", reused=outcome.result in (REUSED, CACHED)))
            entries.append({"id": outcome.key, "source": sources[outcome.key],
                            "image": f"{DATA_DIR}/{image_out.name}", "label": f"{DATA_DIR}/{label_out.name}"})
            outputs.extend([image_out, label_out, sidecar])
        write_json_atomic(out / DATASET_NAME, {"studies": sorted(entries, key=lambda e: e["id"])})
        if cache_dir is not None:
            hits = sum(1 for o in done if o.ok and o.result == CACHED)
            record.extra["cache"] = {"hits": hits, "computed": sum(1 for o in done if o.ok and o.result == COMPUTED)}
            log.info("preprocess cache %s: %d hit(s)", cache_dir, hits)
        record.extra.update({key: plans[key] for key in ("num_classes", "target_spacing", "normalization",
                                                        "patch_size", "batch_size")})
        if plans.get("channels"):
            record.extra["channels"] = [c["name"] for c in plans["channels"]]
        return outputs

    inputs = _input_files(manifest_path, ingest_dir)
    if plans_file is not None:
        inputs["plans_file"] = Path(plans_file)
    return execute_stage(STAGE, out, config=config, inputs=inputs, work=work, force=force)


def _input_files(manifest_path: Path, ingest_dir: Path) -> dict[str, Path]:
    """The manifest and every file it names: an image replaced behind the manifest must rerun the stage. A missing
    manifest (a wrong folder) fails here, before the stage writes anything into its output folder."""
    inputs = {"manifest": manifest_path}
    for study in load_manifest(manifest_path).ok_studies():
        for kind, rel in (("image", study.image), ("label", study.label)):
            if rel:
                inputs[f"{study.id}/{kind}"] = ingest_dir / rel
    return inputs
