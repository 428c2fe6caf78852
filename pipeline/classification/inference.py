"""Classification inference: per-study class probabilities (predictions.csv), Grad-CAM PNGs, fold ensembles."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batch import run_batch
from pipeline.classification.calibration import Calibration
from pipeline.classification.data import to_input
from pipeline.classification.explain import gradcam_map, save_gradcam_png
from pipeline.classification.metrics import predict, probability_metrics, reliability_diagram
from pipeline.classification.networks import build_classifier
from pipeline.config import PipelineConfig, config_dict
from pipeline.errors import CheckpointError, StageError
from pipeline.fileio import read_json, write_json_atomic, write_text_atomic
from pipeline.inference.folder_inputs import folder_images, image_inputs, no_images
from pipeline.io.channels import load_case
from pipeline.io.nifti import is_nifti, nifti_stem
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import device_description, resolve_device
from pipeline.stages.common import execute_stage
from pipeline.training.checkpoints import load_weights
from pipeline.training.split import SPLIT_NAME

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CLASSIFICATION_JSON = "classification.json"  # classes, operating point and models of predictions.csv
METRICS_JSON = "metrics.json"
EXPLANATIONS = "explanations"


@dataclass(frozen=True)
class _Item:
    id: str
    path: Path
    label: int | None = None
    error: tuple[str, str] | None = None  # (code, message): refused unread (a shared name, a link leaving)
    channel_paths: tuple[Path, ...] | None = None  # a case of one file per channel (nnU-Net v2), in order


def _model_folder(model_dir: Path) -> Path:
    """The folder of model.json: with model.pt (one network) or an ``ensemble`` list (cross-validation folds)."""
    for folder in (model_dir, model_dir / "model"):
        meta = folder / "model.json"
        if meta.is_file() and ((folder / "model.pt").is_file() or "ensemble" in _read_meta(meta)):
            return folder
    raise CheckpointError(f"no model.json and model.pt in {model_dir} or {model_dir / 'model'}; pass the trained "
                          "model folder (RUN/03_train/model)", code="model_missing")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = read_json(path)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a model description (JSON object); retrain the model",
                              code="model_invalid")
    return meta


def model_members(model_dir: str | Path) -> list[Path]:
    """The network folders (model.json + model.pt) of a model: itself, or the folds its ``ensemble`` lists."""
    folder = _model_folder(Path(model_dir))
    meta = _read_meta(folder / "model.json")
    if "ensemble" not in meta:
        return [folder]
    base = folder.parent.resolve()
    members = []
    for rel in meta["ensemble"]:
        member = (folder / str(rel)).resolve()
        if not member.is_relative_to(base) or not (member / "model.pt").is_file():
            raise CheckpointError(f"{folder / 'model.json'}: ensemble member {rel} is not a trained model folder "
                                  f"inside {base}; train the folds again", code="model_missing")
        members.append(member)
    if not members:
        raise CheckpointError(f"{folder / 'model.json'}: an empty ensemble; train the folds again",
                              code="model_missing")
    return members


def _held_out(members: list[Path]) -> dict[str, list[int]]:
    """{study id: indices of the members that held it out for validation (their split.json)}: one fold of a
    cross-validated model, every member of a seed ensemble."""
    held: dict[str, list[int]] = {}
    for i, member in enumerate(members):
        split = member.parent / SPLIT_NAME
        if split.is_file():
            for sid in read_json(split).get("validation", []):
                held.setdefault(str(sid), []).append(i)
    return held


def _items(input: Path, out: Path, studies: list[str] | None = None, *, channels: int = 1) -> list[_Item]:
    """The studies to classify: an ingest folder's ok ones, one NIfTI file, or a folder's images (with several
    ``channels``, the classifier's, its CASE_0000.nii.gz, CASE_0001.nii.gz, ... files are one case each)."""
    if input.is_dir() and (input / MANIFEST_NAME).is_file():
        manifest = load_manifest(input)
        ok = [s for s in sorted(manifest.ok_studies(), key=lambda s: s.id) if s.image]
        if studies is not None:
            unknown = sorted(set(studies) - {s.id for s in ok})
            if unknown:
                raise StageError(f"{input / MANIFEST_NAME}: no ok study with id(s) {', '.join(unknown[:5])}; check "
                                 "the ids in the manifest", code="unknown_study")
            wanted = set(studies)
            ok = [s for s in ok if s.id in wanted]
        return [_Item(s.id, input / str(s.image), s.class_label) for s in ok]
    if studies is not None:
        raise StageError(f"{input}: choosing studies needs an ingest folder holding {MANIFEST_NAME}",
                         code="bad_arguments")
    if input.is_file() and is_nifti(input):
        return [_Item(nifti_stem(input), input)]
    if input.is_dir():
        images = folder_images(input, exclude=out, channels=channels)
        if images:
            return [_Item(image.id, image.path, error=image.error, channel_paths=image.channel_paths)
                    for image in images]
    raise no_images(input, exclude=out)


def load_classifier(model_dir: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (eval mode, on ``device``) and its model.json (one network, not an ensemble)."""
    folder = _model_folder(Path(model_dir))
    meta = _read_meta(folder / "model.json")
    model = build_classifier(meta["network"], spatial_dims=len(meta["input_size"]), in_channels=meta["in_channels"],
                             num_classes=meta["num_classes"], kwargs=meta.get("network_kwargs") or {})
    model.load_state_dict(load_weights(folder / "model.pt"))
    return model.to(device).eval(), meta


def _csv_text(rows: list[dict[str, Any]], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study", *(f"prob_{c}" for c in classes), "predicted"])
    for row in rows:
        writer.writerow([row["id"], *(repr(float(p)) for p in row["probs"]), row["predicted"]])  # lossless
    return buffer.getvalue()


def _remove_stale(out: Path, keep: set[Path]) -> None:
    for path in [*sorted((out / EXPLANATIONS).glob("*.png")), out / METRICS_JSON, out / "reliability.png"]:
        if path.is_file() and path not in keep:
            path.unlink()


def infer_classifier(model_dir: Path, input: Path, out: Path, *, config: PipelineConfig | None = None,
                     force: bool = False, explain: bool = True, studies: list[str] | None = None,
                     out_of_fold: bool = False) -> dict[str, Any]:
    """Classify the studies of ``input`` (``studies``: these ids of an ingest folder only).

    Writes predictions.csv (study, probability per class, predicted class), classification.json
    (classes, operating point, models), explanations/<id>.png (Grad-CAM) and, when every study
    is labelled, metrics.json. An ensemble (cross-validation folds, seeds) averages its members'
    calibrated probabilities; ``out_of_fold`` predicts a study that members held out for validation
    with those members only (its fold's model; every seed of a seed ensemble).
    """
    config = config or PipelineConfig()
    model_dir, input, out = Path(model_dir), Path(input), Path(out)
    folder = _model_folder(model_dir)
    members = model_members(folder)
    items = _items(input, out, studies, channels=int(_read_meta(folder / "model.json").get("in_channels", 1)))
    inputs = {"model.json": folder / "model.json"}
    for i, member in enumerate(members):
        inputs.update({f"member{i}/model.json": member / "model.json", f"member{i}/model.pt": member / "model.pt"})
        if out_of_fold and (member.parent / SPLIT_NAME).is_file():
            inputs[f"member{i}/split.json"] = member.parent / SPLIT_NAME
    if (input / MANIFEST_NAME).is_file():
        inputs["manifest"] = input / MANIFEST_NAME
    else:
        inputs.update(image_inputs((it.id, it.path, it.channel_paths) for it in items if it.error is None))

    def work(record: StageRecord) -> list[Path]:
        device = resolve_device(config.infer.device)
        record.device = device_description(device)
        loaded = [load_classifier(member, device=device) for member in members]
        calibrations = [Calibration.from_json(info, where=str(member / "model.json"), num_classes=info["num_classes"])
                        for member, (_, info) in zip(members, loaded, strict=True)]
        meta = loaded[0][1]
        classes = [meta["classes"].get(str(i), str(i)) for i in range(meta["num_classes"])]
        size, operating_point = tuple(meta["input_size"]), float(meta["operating_point"])
        held = _held_out(members) if out_of_fold and len(members) > 1 else {}

        def classify(item: _Item) -> dict[str, Any]:
            image = load_case(item.channel_paths or item.path, meta.get("channels"), by="the classifier's channels")
            volume = to_input(image.array, size, meta["normalization"])
            chosen = held.get(item.id, list(range(len(loaded))))
            probs = np.zeros(len(classes))
            for i in chosen:
                model = loaded[i][0]
                with torch.no_grad():
                    logits = model(volume[None].to(device)).float().cpu().numpy().astype(np.float64)
                probs += calibrations[i].probabilities(logits)[0] / len(chosen)
            predicted = int(predict(probs[None], operating_point)[0])
            if explain:
                cam = np.mean([gradcam_map(loaded[i][0], volume.to(device), class_index=predicted) for i in chosen],
                              axis=0)
                save_gradcam_png(volume[0].numpy(), cam, out / EXPLANATIONS / f"{item.id}.png",
                                 count=int(meta.get("gradcam_slices", 3)),
                                 title=f"{item.id}: {classes[predicted]} (p = {probs[predicted]:.2f})")
            return {"id": item.id, "probs": probs, "predicted": classes[predicted], "index": predicted,
                    "label": item.label, "members": chosen}

        rows, files, failed = [], [], []
        for item in items:
            if item.error is not None:  # refused unread
                code, message = item.error
                log.warning("infer: %s failed: %s", item.id, message)
                failed.append({"id": item.id, "code": code, "message": message})
                record.add(StudyStatus(id=item.id, status="failed", code=code, message=message))
        runnable = [item for item in items if item.error is None]
        for outcome in run_batch(runnable, classify, key=lambda it: it.id, desc="classify"):
            if outcome.ok and outcome.result is not None:
                rows.append(outcome.result)
                record.add(StudyStatus(id=outcome.key, status="ok"))
                if explain:
                    files.append(out / EXPLANATIONS / f"{outcome.key}.png")
            else:
                log.warning("infer: %s failed: %s", outcome.key, outcome.message)
                failed.append({"id": outcome.key, "code": outcome.code, "message": outcome.message})
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        rows.sort(key=lambda r: r["id"])
        write_text_atomic(out / PREDICTIONS_CSV, _csv_text(rows, classes))  # ids from file names: any bytes
        files.append(out / PREDICTIONS_CSV)
        labelled = [r for r in rows if r["label"] is not None]
        if labelled and len(labelled) == len(rows):
            ev = config.evaluate
            result = probability_metrics(np.array([r["label"] for r in rows]), np.stack([r["probs"] for r in rows]),
                                         operating_point=operating_point, bootstrap=ev.bootstrap,
                                         confidence=ev.confidence, seed=ev.bootstrap_seed)
            write_json_atomic(out / METRICS_JSON, result)
            reliability_diagram(result["reliability"], out / "reliability.png")
            files += [out / METRICS_JSON, out / "reliability.png"]
            record.extra["metrics"] = {k: result[k] for k in ("auc", "accuracy", "balanced_accuracy", "ece")}
        names = [m.parent.name if len(members) > 1 else "model" for m in members]
        write_json_atomic(out / CLASSIFICATION_JSON, {
            "schema_version": 1, "task": "classification",
            "classes": {str(i): c for i, c in enumerate(classes)}, "operating_point": operating_point,
            "models": [{"name": n, "sha256": info.get("sha256"), **calibration.as_json(), "fold": info.get("fold")}
                       for n, (_, info), calibration in zip(names, loaded, calibrations, strict=True)],
            "out_of_fold": bool(held),
            "predicted_by": {r["id"]: [names[i] for i in r["members"]] for r in rows} if len(members) > 1 else None,
            "failed": failed})
        files.append(out / CLASSIFICATION_JSON)
        _remove_stale(out, set(files))
        record.extra["model"] = {"sha256": [info.get("sha256") for _, info in loaded],
                                 "config_hash": meta.get("config_hash")}
        return files

    call = {"task": "classification", "model": str(folder), "explain": explain, "out_of_fold": out_of_fold,
            "studies": sorted(studies) if studies is not None else None, "evaluate": config_dict(config.evaluate)}
    return execute_stage("infer", out, config=config, inputs=inputs, work=work, force=force, extra_hash=call)
