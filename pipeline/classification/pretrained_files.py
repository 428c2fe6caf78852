"""Where ``classify.pretrained`` points: the weights file, and for ``segmentation_encoder`` the architecture.

No torch here, so stages can hash the weights file before deciding to train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.fileio import read_json
from pipeline.inference.model_files import MODEL_JSON, MODEL_WEIGHTS, read_model_json, resolve_model_dir

ENCODER_NETWORK = "segmentation_encoder"


def segmentation_spec(pretrained: Path | None) -> dict[str, Any] | None:
    """What ``network_kwargs["segmentation"]`` records: the network, plans and classes of the segmentation model
    at ``pretrained`` (a model folder, a train folder holding ``model/``, or the model.pt in one)."""
    if pretrained is None:
        return None
    folder = resolve_model_dir(pretrained.parent if pretrained.name == MODEL_WEIGHTS else pretrained)
    try:
        task = read_json(folder / MODEL_JSON).get("task", "segmentation")
    except (OSError, ValueError, AttributeError):
        task = "segmentation"  # read_model_json says what is wrong with the file
    if task != "segmentation":
        raise CheckpointError(f"{folder}: a {task} model; classify.network '{ENCODER_NETWORK}' takes the encoder "
                              "of a segmentation model", code="checkpoint_mismatch")
    meta = read_model_json(folder)
    return {"network": meta["network"], "plans": meta["plans"], "out_channels": int(meta["out_channels"])}


def weights_path(pretrained: Path) -> Path:
    """The weights file of ``classify.pretrained``: itself, or the model.pt of the model folder it names."""
    return resolve_model_dir(pretrained) / MODEL_WEIGHTS if pretrained.is_dir() else pretrained
