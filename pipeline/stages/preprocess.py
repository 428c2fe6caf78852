"""The preprocess stage: fingerprint the labelled studies, write plans.json, resample and normalise each study."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batch import outcome_summary, run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import GeometryError, StageError
from pipeline.fileio import canonical_json, read_json, sha256_bytes, sha256_file, write_json_atomic
from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import Manifest, Study, load_manifest
from pipeline.planning import StudyFingerprint, dataset_fingerprint, make_plans, study_fingerprint
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import code_version
from pipeline.sharding import shard_out, study_selector
from pipeline.stages.common import execute_stage
from pipeline.transforms.preprocessing import preprocessing_transforms

log = logging.getLogger(__name__)

STAGE = "preprocess"
PLANS_NAME = "plans.json"
DATASET_NAME = "dataset.json"
DATA_DIR = "data"


@dataclass(frozen=True)
class StudyInput:
    """One labelled study as preprocessing sees it: absolute paths to its ingested image and label."""

    id: str
    image: Path
    label: Path
    modality: str | None = None


def training_studies(manifest: Manifest, ingest_dir: Path) -> tuple[list[StudyInput], list[StudyStatus]]:
    """The ok studies with a label (the training set), and skip statuses for all others."""
    chosen: list[StudyInput] = []
    skipped: list[StudyStatus] = []
    for study in sorted(manifest.studies, key=lambda s: s.id):
        reason = _skip_reason(study)
        image, label = _inside(ingest_dir, study.image), _inside(ingest_dir, study.label)
        if reason is None and image is not None and label is not None:
            chosen.append(StudyInput(id=study.id, image=image, label=label, modality=study.modality))
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


def fingerprint_study(item: StudyInput, *, orientation: str) -> StudyFingerprint:
    image = load_nifti(item.image)
    label = load_nifti(item.label)
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


def preprocess_study(item: StudyInput, *, plans: dict[str, Any], out: Path, code: str) -> bool:
    """Transform one study and write its image, label and sidecar; return True when earlier outputs were reused."""
    resampling = {k: v for k, v in plans.items() if k != "patch_size"}  # the patch size changes no voxel
    key = {"plans": sha256_bytes(canonical_json(resampling).encode()), "code": code,
           "image": sha256_file(item.image), "label": sha256_file(item.label)}
    if _reusable(item, out, key):
        return True
    data = preprocessing_transforms(plans, keys=("image", "label"))({"image": str(item.image),
                                                                     "label": str(item.label)})
    image, label = data["image"], data["label"]
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.allclose(affine, np.asarray(label.affine, dtype=np.float64), atol=1e-4) or image.shape != label.shape:
        raise GeometryError(f"study {item.id}: image and label ended on different grids after preprocessing",
                            code="label_grid_mismatch")
    classes = np.rint(np.asarray(label[0], dtype=np.float32))
    if classes.min() < 0 or classes.max() >= plans["num_classes"]:
        raise StageError(f"study {item.id}: label values {int(classes.min())}..{int(classes.max())} lie outside "
                         f"the plans' {plans['num_classes']} classes", study_id=item.id, code="label_out_of_range")
    image_out, label_out, sidecar = output_paths(out, item.id)
    save_nifti(Volume(np.ascontiguousarray(np.asarray(image[0], dtype=np.float32)), affine), image_out,
               dtype=np.float32)
    save_nifti(Volume(np.ascontiguousarray(classes.astype(np.uint8)), affine), label_out, dtype=np.uint8)
    write_json_atomic(sidecar, {
        "key": key,
        "shape": [int(s) for s in image.shape[1:]],
        "outputs": {"image": sha256_file(image_out), "label": sha256_file(label_out)},
    })
    return False


def _labels(manifest: Manifest) -> dict[str, str] | None:
    return dict(manifest.labels) if manifest.labels else None


def preprocess(ingest_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False) -> dict:
    """Fingerprint the ingested training set, write plans.json, then preprocess every labelled study into out/data."""
    config = config or PipelineConfig()
    ingest_dir, out = Path(ingest_dir), shard_out(Path(out), config)
    manifest_path = ingest_dir / "manifest.json"
    owns = study_selector(config)  # a shard plans from every study but writes only its own

    def work(record: StageRecord) -> list[Path]:
        manifest = load_manifest(manifest_path)
        items, skipped = training_studies(manifest, ingest_dir)
        for status in skipped:
            if owns(status.id):
                record.add(status)
        if not items:
            raise StageError(f"{manifest_path}: no ok studies with a label, so there is nothing to train on; "
                             "check the ingest record for failures and that labels were found")
        orientation = config.preprocess.orientation
        fingerprints: list[StudyFingerprint] = []
        usable: list[StudyInput] = []
        outcomes = list(run_batch(items, lambda it: fingerprint_study(it, orientation=orientation),
                                  key=lambda it: it.id, desc="fingerprint", execution=config.execution))
        for outcome in outcomes:
            if outcome.ok and outcome.result is not None:
                fingerprints.append(outcome.result)
                usable.append(outcome.item)
            else:
                log.warning("%s: %s", outcome.key, outcome.message)
                if owns(outcome.key):
                    record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code,
                                           message=outcome.message))
        if not fingerprints:
            raise StageError(f"every labelled study in {manifest_path} failed to load; see record.json in {out}")
        plans = make_plans(dataset_fingerprint(fingerprints), config=config.preprocess, labels=_labels(manifest))
        write_json_atomic(out / PLANS_NAME, plans)
        log.info("plans: target spacing %s, %d classes, patch %s", plans["target_spacing"], plans["num_classes"],
                 plans["patch_size"])
        code = code_version()
        entries: list[dict[str, str]] = []
        outputs: list[Path] = [out / PLANS_NAME, out / DATASET_NAME]
        done = list(run_batch([it for it in usable if owns(it.id)], lambda it: preprocess_study(it, plans=plans, out=out, code=code),
                              key=lambda it: it.id, desc="preprocess", execution=config.execution))
        log.info("preprocess: %s", outcome_summary(done))
        for outcome in done:
            if not outcome.ok:
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
                continue
            image_out, label_out, sidecar = output_paths(out, outcome.key)
            record.add(StudyStatus(id=outcome.key, status="ok", reused=bool(outcome.result)))
            entries.append({"id": outcome.key, "image": f"{DATA_DIR}/{image_out.name}",
                            "label": f"{DATA_DIR}/{label_out.name}"})
            outputs.extend([image_out, label_out, sidecar])
        write_json_atomic(out / DATASET_NAME, {"studies": sorted(entries, key=lambda e: e["id"])})
        record.extra["num_classes"] = plans["num_classes"]
        record.extra["target_spacing"] = plans["target_spacing"]
        return outputs

    return execute_stage(STAGE, out, config=config, inputs=_input_files(manifest_path, ingest_dir), work=work,
                         force=force)


def _input_files(manifest_path: Path, ingest_dir: Path) -> dict[str, Path]:
    """The manifest and every file it names: an image replaced behind the manifest must rerun the stage."""
    inputs = {"manifest": manifest_path}
    if manifest_path.is_file():
        for study in load_manifest(manifest_path).ok_studies():
            for kind, rel in (("image", study.image), ("label", study.label)):
                if rel:
                    inputs[f"{study.id}/{kind}"] = ingest_dir / rel
    return inputs
