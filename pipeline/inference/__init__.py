"""Inference: loading trained model folders and predicting label volumes on each input's own grid."""

from __future__ import annotations

from pipeline.inference.predictor import (
    ModelBundle,
    Predictor,
    load_model,
    prediction_paths,
    read_predictions,
    resample_to_grid,
    resolve_model_dir,
)

__all__ = ["ModelBundle", "Predictor", "load_model", "prediction_paths", "read_predictions", "resample_to_grid",
           "resolve_model_dir"]
