"""Model export: a trained model folder (model.json + model.pt) to TorchScript and ONNX, checked for output parity.

The exported networks take what the network takes: a preprocessed image patch, float32, shape
(batch, channels, x, y, z) with x, y, z multiples of the product of the strides; they return
logits (batch, classes, x, y, z). Preprocessing (the plans) and sliding-window inference are
not part of them; ``export.json`` carries the plans and labels a caller needs. Each export is
loaded back from its file and run against the PyTorch network on seeded random inputs of two
shapes; a difference beyond ``atol + rtol * |reference|`` fails the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.fileio import atomic_path, sha256_file, write_json_atomic
from pipeline.inference.predictor import MODEL_JSON, MODEL_WEIGHTS, ModelBundle, load_model
from pipeline.io.channels import channel_names

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"
FORMATS = ("torchscript", "onnx")
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def _divisor(meta: dict[str, Any]) -> int:
    strides = meta.get("network", {}).get("strides") or (2, 2, 2)
    return int(np.prod([int(s) for s in strides])) if meta.get("network", {}).get("name", "unet") == "unet" else 16


def parity_inputs(bundle: ModelBundle, *, seed: int = 0) -> list[torch.Tensor]:
    """Two seeded random inputs: one patch of the plans' size and one of another admissible size."""
    channels = int(bundle.meta.get("in_channels", 1))
    patch = [int(s) for s in bundle.plans["patch_size"]]
    step = _divisor(bundle.meta)
    other = [p + step if i != 1 else max(step, p - step) for i, p in enumerate(patch)]
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((1, channels, *shape), generator=generator) for shape in (patch, other)]


def _torchscript(network: torch.nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch marks TorchScript deprecated; still asked for
        try:
            return torch.jit.script(network), "script"
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            log.info("torch.jit.script failed (%s); tracing instead", str(exc).splitlines()[0][:200])
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(network, example), "trace"


def _onnx(network: torch.nn.Module, example: torch.Tensor, *, opset: int) -> bytes:
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO,
            4: torch.export.Dim.AUTO}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": dims})
    if program is None:
        raise StageError("torch.onnx.export returned no program", code="export_failed")
    return program.model_proto.SerializeToString()


def _max_excess(reference: np.ndarray, other: np.ndarray, *, atol: float, rtol: float) -> tuple[float, float]:
    """(max |difference|, max of |difference| - (atol + rtol |reference|)); the second must be <= 0."""
    diff = np.abs(reference - other)
    return float(diff.max()), float((diff - (atol + rtol * np.abs(reference))).max())


def export_model(
    model_dir: Path,
    out: Path,
    *,
    formats: Sequence[str] = FORMATS,
    opset: int = 18,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Export the model in ``model_dir`` to ``out/model.torchscript.pt`` and/or ``out/model.onnx`` with a parity check;
    write ``out/export.json`` (files and checksums, input/output layout, plans, labels, parity) and return it."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise StageError(f"unknown export format(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(FORMATS)}", code="export_format")
    out = Path(out)
    bundle = load_model(model_dir)
    network = bundle.network.cpu().eval()
    inputs = parity_inputs(bundle)
    with torch.no_grad():
        references = [network(x).numpy() for x in inputs]
    files: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    if "torchscript" in formats:
        scripted, method = _torchscript(network, inputs[0])
        path = out / TORCHSCRIPT_FILE
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, str(tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            outputs = [loaded(x).numpy() for x in inputs]
        files["torchscript"] = {"file": TORCHSCRIPT_FILE, "sha256": sha256_file(path), "method": method}
        parity["torchscript"] = outputs
    if "onnx" in formats:
        import onnxruntime as ort

        path = out / ONNX_FILE
        blob = _onnx(network, inputs[0], opset=opset)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] for x in inputs]
        files["onnx"] = {"file": ONNX_FILE, "sha256": sha256_file(path), "opset": opset}
        parity["onnx"] = outputs
    checks: dict[str, Any] = {}
    for name, outputs in parity.items():
        results = []
        for x, ref, got in zip(inputs, references, outputs, strict=True):
            if got.shape != ref.shape:
                raise StageError(f"{name} export: output shape {got.shape} differs from PyTorch's {ref.shape} for "
                                 f"input {tuple(x.shape)}", code="export_parity")
            max_abs, excess = _max_excess(ref, got, atol=atol, rtol=rtol)
            results.append({"input_shape": list(x.shape), "max_abs_diff": max_abs})
            if excess > 0:
                raise StageError(f"{name} export: outputs differ from PyTorch's by up to {max_abs:.3g} for input "
                                 f"{tuple(x.shape)} (allowed {atol} + {rtol} x |value|)", code="export_parity")
        checks[name] = results
    folder = bundle.folder
    record = {
        "schema_version": 1, "task": bundle.meta.get("task", "segmentation"),
        "source": {"model_json_sha256": sha256_file(folder / MODEL_JSON), "weights_sha256": bundle.sha256,
                   "files": [MODEL_JSON, MODEL_WEIGHTS]},
        "files": files,
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "batch, channel, x, y, z",
                  "channels": int(bundle.meta.get("in_channels", 1)), "spatial_multiple_of": _divisor(bundle.meta),
                  "channel_names": channel_names(bundle.plans),  # several: in this order (null: one channel)
                  "preprocessing": "the plans (orientation, spacing, normalisation) as in 'medpipe infer'"},
        "output": {"name": OUTPUT_NAME, "layout": "batch, class, x, y, z", "classes": bundle.num_classes,
                   "meaning": "logits; softmax over the class axis, argmax gives labels"},
        "plans": bundle.plans, "labels": bundle.labels, "network": bundle.meta.get("network"),
        "parity": {"atol": atol, "rtol": rtol, "seed": 0, "checks": checks},
        "versions": _versions(),
    }
    write_json_atomic(out / EXPORT_JSON, record)
    log.info("exported %s to %s", " and ".join(files), out)
    return record


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
