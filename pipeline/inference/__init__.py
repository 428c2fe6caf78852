"""Inference: loading trained model folders and predicting label volumes on each input's own grid.

The names below load torch when first used, not when the package is imported: a command that
only sends studies to worker processes or Ray actors (which load the models) never needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ModelBundle", "Predictor", "load_model", "prediction_paths", "read_predictions", "resample_to_grid",
           "resolve_model_dir"]

# What a process that predicts imports (seconds: torch, MONAI); the infer stage's workers import it up
# front (PredictRecipe.imports), and the CLI starts them on it before it imports the stage itself
PREDICTOR_IMPORTS = ("torch", "pipeline.inference.predictor")


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pipeline.inference.predictor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
