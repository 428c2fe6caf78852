"""A trained fold's validation: its best model over its validation studies, Dice with and without postprocessing.

The studies are predicted in the preprocessed space (the preprocess stage's arrays, already
on the plans' grid and normalised) with the full sliding window of inference (``infer``'s
overlap, blending and mirroring settings). validation.json holds, per study and class, the
Dice of the argmax labels and of the labels with only that class's largest 26-connected
component kept, and their means over the studies; inference's ``postprocess: auto`` reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.errors import GeometryError
from pipeline.fileio import write_json_atomic
from pipeline.inference.model_loading import load_model
from pipeline.inference.postprocess import CONNECTIVITY, VALIDATION_JSON, class_dice, mean_over
from pipeline.inference.predictor import Predictor
from pipeline.io.channels import channel_first, channel_names, load_channels
from pipeline.io.nifti import load_nifti

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def validate_model(model_dir: Path, items: Sequence[Mapping[str, Any]], out: Path, *, config: PipelineConfig,
                   device: str, fold: int | None = None) -> Path:
    """Predict ``items`` (``{"id", "image", "label"}``, preprocessed files) with the model; write validation.json."""
    bundle = load_model(model_dir)
    settings = config.infer.model_copy(update={"device": device})
    predictor = Predictor.from_bundles([bundle], config=settings, device=device)
    classes = list(range(1, bundle.num_classes))
    rows = []
    for item in items:
        image, label = load_channels(item["image"], channel_names(bundle.plans)), load_nifti(item["label"])
        if not image.same_grid(label):
            raise GeometryError(f"study {item['id']}: preprocessed image and label grids differ; rerun preprocess")
        probs = predictor.probabilities(channel_first(np.asarray(image.array, dtype=np.float32)))
        pred = np.argmax(probs, axis=0)
        rows.append({"id": str(item["id"]), **class_dice(pred, np.rint(label.array).astype(np.int64), classes)})
        log.info("validation %s: Dice %s", item["id"], rows[-1]["dice"])
    names = [str(c) for c in classes]
    means = {"dice": mean_over(rows, "dice", names), "dice_lcc": mean_over(rows, "dice_lcc", names)}
    path = out / VALIDATION_JSON
    write_json_atomic(path, {
        "schema_version": SCHEMA_VERSION,
        "fold": fold,
        "model_sha256": bundle.sha256,
        "labels": bundle.labels,
        "settings": {"overlap": settings.overlap, "mode": settings.mode, "tta": settings.tta,
                     "flip_axes": list(predictor.flip_axes) if settings.tta else [], "connectivity": CONNECTIVITY,
                     "space": "preprocessed"},
        "mean": {**means, "mean_dice": _mean_of(means["dice"]), "mean_dice_lcc": _mean_of(means["dice_lcc"])},
        "studies": rows,
    })
    return path


def _mean_of(values: Mapping[str, float | None]) -> float | None:
    finite = [v for v in values.values() if v is not None]
    return round(sum(finite) / len(finite), 6) if finite else None
