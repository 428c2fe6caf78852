"""Classification inference: per-study class probabilities (predictions.csv), Grad-CAM PNGs, metrics when labelled."""

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
from pipeline.classification.data import to_input
from pipeline.classification.explain import gradcam_map, save_gradcam_png
from pipeline.classification.metrics import classification_metrics, predict, reliability_diagram, softmax
from pipeline.classification.networks import build_classifier
from pipeline.config import PipelineConfig, config_dict
from pipeline.errors import CheckpointError, StageError
from pipeline.fileio import atomic_path, read_json, write_json_atomic
from pipeline.io.nifti import is_nifti, load_nifti, nifti_stem
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.runtime import device_description, resolve_device
from pipeline.stages.common import execute_stage
from pipeline.training.checkpoints import load_weights

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
EXPLANATIONS = "explanations"


@dataclass(frozen=True)
class _Item:
    id: str
    path: Path
    label: int | None = None


def is_classification_model(model_dir: str | Path) -> bool:
    """True when ``model_dir`` (or its ``model/``) holds a model.json with ``"task": "classification"``."""
    for folder in (Path(model_dir), Path(model_dir) / "model"):
        meta = folder / "model.json"
        if meta.is_file():
            try:
                return read_json(meta).get("task") == "classification"
            except (ValueError, AttributeError):
                return False
    return False


def _model_folder(model_dir: Path) -> Path:
    for folder in (model_dir, model_dir / "model"):
        if (folder / "model.json").is_file() and (folder / "model.pt").is_file():
            return folder
    raise CheckpointError(f"no model.json and model.pt in {model_dir} or {model_dir / 'model'}; pass the trained "
                          "model folder (RUN/03_train/model)", code="model_missing")


def _items(input: Path) -> list[_Item]:
    if input.is_dir() and (input / MANIFEST_NAME).is_file():
        manifest = load_manifest(input)
        return [_Item(s.id, input / str(s.image), s.class_label)
                for s in sorted(manifest.ok_studies(), key=lambda s: s.id) if s.image]
    if input.is_file() and is_nifti(input):
        return [_Item(nifti_stem(input), input)]
    if input.is_dir():
        files = sorted(p for p in input.rglob("*") if p.is_file() and is_nifti(p))
        if files:
            return [_Item(nifti_stem(p), p) for p in files]
    raise StageError(f"{input}: not an ingest folder, a folder of NIfTI images or a NIfTI file", code="no_inputs")


def load_classifier(model_dir: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (eval mode, on ``device``) and its model.json."""
    folder = _model_folder(Path(model_dir))
    meta = read_json(folder / "model.json")
    model = build_classifier(meta["network"], spatial_dims=len(meta["input_size"]), in_channels=meta["in_channels"],
                             num_classes=meta["num_classes"], kwargs=meta.get("network_kwargs") or {})
    model.load_state_dict(load_weights(folder / "model.pt"))
    return model.to(device).eval(), meta


def _csv_text(rows: list[dict[str, Any]], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study", *(f"prob_{c}" for c in classes), "predicted"])
    for row in rows:
        writer.writerow([row["id"], *(f"{p:.6f}" for p in row["probs"]), row["predicted"]])
    return buffer.getvalue()


def infer_classifier(model_dir: Path, input: Path, out: Path, *, config: PipelineConfig | None = None,
                     force: bool = False, explain: bool = True) -> dict[str, Any]:
    """Classify every study of ``input``: predictions.csv, explanations/<id>.png, metrics.json when labelled."""
    config = config or PipelineConfig()
    model_dir, input, out = Path(model_dir), Path(input), Path(out)
    folder = _model_folder(model_dir)
    items = _items(input)
    inputs = {"model.json": folder / "model.json", "model.pt": folder / "model.pt"}
    if (input / MANIFEST_NAME).is_file():
        inputs["manifest"] = input / MANIFEST_NAME
    else:
        inputs.update({f"image:{it.id}": it.path for it in items})

    def work(record: StageRecord) -> list[Path]:
        device = resolve_device(config.infer.device)
        record.device = device_description(device)
        model, meta = load_classifier(folder, device=device)
        classes = [meta["classes"].get(str(i), str(i)) for i in range(meta["num_classes"])]
        size, temperature = tuple(meta["input_size"]), float(meta.get("temperature", 1.0))

        def classify(item: _Item) -> dict[str, Any]:
            volume = to_input(load_nifti(item.path).array, size, meta["normalization"])
            with torch.no_grad():
                logits = model(volume[None].to(device)).float().cpu().numpy().astype(np.float64)
            probs = softmax(logits, temperature)[0]
            predicted = int(predict(probs[None], float(meta["operating_point"]))[0])
            if explain:
                cam = gradcam_map(model, volume.to(device), class_index=predicted)
                save_gradcam_png(volume[0].numpy(), cam, out / EXPLANATIONS / f"{item.id}.png",
                                 count=int(meta.get("gradcam_slices", 3)),
                                 title=f"{item.id}: {classes[predicted]} (p = {probs[predicted]:.2f})")
            return {"id": item.id, "logits": logits[0], "probs": probs, "predicted": classes[predicted],
                    "index": predicted, "label": item.label}

        rows, files = [], []
        for outcome in run_batch(items, classify, key=lambda it: it.id, desc="classify"):
            if outcome.ok and outcome.result is not None:
                rows.append(outcome.result)
                record.add(StudyStatus(id=outcome.key, status="ok"))
                if explain:
                    files.append(out / EXPLANATIONS / f"{outcome.key}.png")
            else:
                log.warning("infer: %s failed: %s", outcome.key, outcome.message)
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        rows.sort(key=lambda r: r["id"])
        with atomic_path(out / PREDICTIONS_CSV) as tmp:
            tmp.write_text(_csv_text(rows, classes), encoding="utf-8")
        files.append(out / PREDICTIONS_CSV)
        labelled = [r for r in rows if r["label"] is not None]
        if labelled and len(labelled) == len(rows):
            ev = config.evaluate
            result = classification_metrics(np.array([r["label"] for r in rows]),
                                            np.stack([r["logits"] for r in rows]), temperature=temperature,
                                            operating_point=float(meta["operating_point"]),
                                            bootstrap=ev.bootstrap, confidence=ev.confidence,
                                            seed=ev.bootstrap_seed)
            write_json_atomic(out / "metrics.json", result)
            reliability_diagram(result["reliability"], out / "reliability.png")
            files += [out / "metrics.json", out / "reliability.png"]
            record.extra["metrics"] = {k: result[k] for k in ("auc", "accuracy", "balanced_accuracy", "ece")}
        record.extra["model"] = {"sha256": meta.get("sha256"), "config_hash": meta.get("config_hash")}
        return files

    call = {"task": "classification", "model": str(folder), "explain": explain,
            "evaluate": config_dict(config.evaluate)}
    return execute_stage("infer", out, config=config, inputs=inputs, work=work, force=force, extra_hash=call)
