"""Benchmark: voxels per second of our sliding-window Predictor next to MONAI's sliding_window_inference.

    .venv/bin/python benchmarks/inference_speed.py                                   # DynUNet, 160x160x128
    .venv/bin/python benchmarks/inference_speed.py --shape 64 64 48 --patch 32 32 32 --no-tta   # short CPU run
    .venv/bin/python benchmarks/inference_speed.py --model RUN/03_train --image img.nii.gz

The model is a DynUNet built by ``build_segmenter`` from a plans topology (``--patch`` at
``--spacing``, filters 32 doubling to 320, 3 classes, random weights), or a trained model
folder (``--model``; a cross-validation folder's first fold). The input is a random volume of
``--shape`` (or ``--image``: a NIfTI preprocessed with the model's plans, or z-scored on its
own grid without ``--model``). On the same model and input, each device measures:

- ``ours``: ``Predictor.probabilities`` with the infer defaults (Gaussian blending, overlap
  0.5, ``sw_batch_size`` 4, fp16 autocast on CUDA; softmax per window), without and with
  mirroring TTA over the three axes (8 passes per window);
- ``monai``: ``monai.inferers.sliding_window_inference`` with its defaults (overlap 0.25,
  constant blending, ``sw_batch_size`` 1, fp32) returning logits.

Each is run once to warm up, then ``--repeats`` times (the methods taking turns); the median wall time gives voxels per
second (input voxels / s) and the ratio to MONAI's default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monai.inferers import sliding_window_inference  # noqa: E402

from pipeline.config import InferConfig, NetworkConfig  # noqa: E402
from pipeline.inference.model_loading import load_models  # noqa: E402
from pipeline.inference.predictor import Predictor  # noqa: E402
from pipeline.io.nifti import load_nifti  # noqa: E402
from pipeline.models.segmenters import build_segmenter  # noqa: E402
from pipeline.topology import network_topology  # noqa: E402


def synthetic_model(patch: list[int], spacing: list[float], classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    topology = network_topology(patch, spacing, exact=True)
    plans = {"orientation": "RAS", "target_spacing": spacing, "normalization": "none", "crop_foreground": False,
             "patch_size": patch, "num_classes": classes, "network": topology.as_dict(),
             "intensity": {"mean": 0.0, "std": 1.0, "p005": -3.0, "p995": 3.0}}
    torch.manual_seed(0)
    network = build_segmenter(NetworkConfig(name="dynunet", deep_supervision=False), in_channels=1,
                              out_channels=classes, plans=plans)
    return network.eval(), plans


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(methods: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall times per method; the methods take turns in each repeat so that load changes hit them alike."""
    for fn in methods.values():  # warm-up (allocations, cuDNN autotuning)
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def bench_device(network: torch.nn.Module, plans: dict[str, Any], image: torch.Tensor, device: torch.device,
                 repeats: int, *, tta: bool = True) -> list[dict[str, Any]]:
    voxels = int(np.prod(image.shape[1:]))
    roi = tuple(int(p) for p in plans["patch_size"])
    methods: dict[str, Callable[[], Any]] = {}
    for mirrored in (False, True) if tta else (False,):
        predictor = Predictor(network, plans, config=InferConfig(tta=mirrored, device=device.type),
                              device=str(device), flip_axes=(0, 1, 2))
        methods[f"ours gaussian 0.5{' + TTA x8' if mirrored else ''}"] = lambda p=predictor: p.probabilities(image)
    batch = image[None].to(device)
    net = network.to(device).eval()

    def monai_default() -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(batch, roi_size=roi, sw_batch_size=1, predictor=net)

    monai = "monai default (0.25, constant, sw 1)"
    methods[monai] = monai_default
    times = timed(methods, device, repeats)
    base = statistics.median(times[monai])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"method": name, "device": device.type, "median_s": round(median, 4),
                     "voxels_per_s": round(voxels / median), "speed_vs_monai": round(base / median, 3),
                     "seconds": [round(s, 4) for s in seconds]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a trained model folder (default: a random DynUNet)")
    parser.add_argument("--image", type=Path, help="a NIfTI input (default: random noise of --shape)")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU, and CUDA when available")
    parser.add_argument("--no-tta", action="store_true", help="skip the (8 times slower) mirroring TTA run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        bundle = load_models(args.model)[0]
        network, plans = bundle.network, bundle.plans
        source = f"model {args.model} (fold {bundle.fold})"
    else:
        network, plans = synthetic_model(args.patch, args.spacing, args.classes)
        source = f"random DynUNet, patch {args.patch}, filters {plans['network']['filters']}"
    if args.image:
        volume = load_nifti(args.image)
        if args.model:
            image = torch.as_tensor(Predictor(network, plans, device="cpu").preprocess(volume)).as_subclass(
                torch.Tensor).float()
        else:
            array = np.asarray(volume.array, dtype=np.float32)
            image = torch.from_numpy((array - array.mean()) / max(float(array.std()), 1e-6))[None]
    else:
        image = torch.from_numpy(np.random.default_rng(0).normal(size=args.shape).astype(np.float32))[None]

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        parser.error("no CUDA device here; use --device cpu")
    print(f"{source}; input {list(image.shape[1:])} ({int(np.prod(image.shape[1:])):,} voxels); "
          f"{args.repeats} repeats; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    results = []
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rows = bench_device(network, plans, image, device, args.repeats, tta=not args.no_tta)
        results.extend(rows)
        print(f"\n{name}:")
        print(f"  {'method':40s} {'median s':>9s} {'voxels/s':>12s} {'vs MONAI':>9s}")
        for row in rows:
            print(f"  {row['method']:40s} {row['median_s']:9.3f} {row['voxels_per_s']:12,d} "
                  f"{row['speed_vs_monai']:8.2f}x")
        if device.type == "cuda":
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "shape": list(image.shape[1:]), "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
