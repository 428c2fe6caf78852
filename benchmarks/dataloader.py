"""Benchmark: training data loader throughput with the full augmentation, and loader vs model step time.

    .venv/bin/python benchmarks/dataloader.py                        # Task04 images (or phantoms), CPU/GPU auto
    .venv/bin/python benchmarks/dataloader.py --workers 0 1 2 4 8 --device cuda --seconds 20
    .venv/bin/python benchmarks/dataloader.py --preprocessed RUN/02_preprocess

Data: a preprocess folder (``--preprocessed``), else the first ``--cases`` images of
``../shared/data/Task04_Hippocampus`` z-scored in memory, else hippocampus-sized phantoms.
Three measurements, medians over ``--seconds`` each (after warm-up batches):
1. the loader alone, per number of worker processes: patches per second;
2. training steps (forward, Dice+CE loss, backward, SGD) on one fixed batch ("model alone"),
   alternating with steps fed by the loader (waiting for the batch included), so both see the
   same machine load; the ratio of the two medians. The issue's goal on the GPU: within 1.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monai.data import CacheDataset  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import DynUNet  # noqa: E402

from pipeline.config import AugmentationConfig  # noqa: E402
from pipeline.fileio import read_json  # noqa: E402
from pipeline.io.nifti import load_nifti  # noqa: E402
from pipeline.training.data import read_preprocessed, study_items, train_dataset, train_loader  # noqa: E402
from pipeline.transforms.augmentation import training_transforms  # noqa: E402

TASK04 = REPO.parent / "shared" / "data" / "Task04_Hippocampus"


def _task04_items(folder: Path, cases: int) -> list[dict]:
    entries = read_json(folder / "dataset.json")["training"][:cases]
    items = []
    for i, entry in enumerate(entries):
        image = load_nifti(folder / entry["image"]).array.astype(np.float32)
        label = load_nifti(folder / entry["label"]).array.astype(np.float32)
        image = (image - image.mean()) / max(float(image.std()), 1e-6)
        items.append({"id": f"case{i}", "image": image[None], "label": label[None]})
    return items


def _phantom_items(cases: int) -> list[dict]:
    from pipeline.demo_data import phantom

    rng = np.random.default_rng(0)
    items = []
    for i in range(cases):
        image, label = phantom(rng, shape=(36, 50, 36))
        array = (image.array - image.array.mean()) / image.array.std()
        items.append({"id": f"case{i}", "image": array[None].astype(np.float32),
                      "label": label.array[None].astype(np.float32)})
    return items


def _dataset(args: argparse.Namespace, transform_args: dict) -> tuple[CacheDataset, str]:
    if args.preprocessed:
        plans, entries = read_preprocessed(args.preprocessed)
        items = study_items(args.preprocessed, entries, [e["id"] for e in entries][: args.cases])
        transform = training_transforms(args.augmentation, num_classes=int(plans["num_classes"]), **transform_args)
        return train_dataset(items, transform), f"{args.preprocessed} ({len(items)} studies)"
    if TASK04.is_dir() and not args.phantoms:
        items, source = _task04_items(TASK04, args.cases), f"{TASK04} (first {args.cases}, z-scored)"
    else:
        items, source = _phantom_items(args.cases), f"{args.cases} phantoms 36x50x36"
    transform = training_transforms(args.augmentation, num_classes=3, **transform_args)
    return CacheDataset(items, transform, progress=False, copy_cache=False), source


def _batches(loader, generator: torch.Generator):
    """Endless batches, one epoch after another (generator reseeded per epoch, as the training loop does)."""
    epoch = 0
    while True:
        generator.manual_seed(1000 + epoch)
        yield from loader
        epoch += 1


def _loader_only(dataset, workers: int, args: argparse.Namespace) -> float:
    generator = torch.Generator()
    batches = _batches(train_loader(dataset, batch_size=args.batch_size, num_workers=workers,
                                    generator=generator), generator)
    for _ in range(args.warmup):
        next(batches)
    times, end = [], time.monotonic() + args.seconds
    while time.monotonic() < end and len(times) < args.max_steps:
        tick = time.perf_counter()
        batch = next(batches)
        times.append(time.perf_counter() - tick)
    patches = int(batch["image"].shape[0])
    return patches / statistics.median(times)


def _step_fn(args: argparse.Namespace, device: str, patch: tuple[int, ...]):
    filters = args.filters or ([32, 64, 128, 256] if device == "cuda" else [8, 16, 32, 64])
    levels = len(filters)
    model = DynUNet(3, 1, 3, kernel_size=[[3, 3, 3]] * levels, strides=[[1, 1, 1]] + [[2, 2, 2]] * (levels - 1),
                    upsample_kernel_size=[[2, 2, 2]] * (levels - 1), filters=filters, norm_name="instance",
                    res_block=False).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = device == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(image: torch.Tensor, label: torch.Tensor) -> None:
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, filters


def _interleaved_steps(step, fixed: dict, batches, args: argparse.Namespace) -> tuple[float, float, float]:
    """Alternate a model-only step (on ``fixed``) with a loader-fed step, so both see the same machine load.

    Returns the median model-only step, the median loader-fed step (waiting for the batch
    included) and the median wait for the batch.
    """
    for _ in range(args.warmup):
        batch = next(batches)
        step(batch["image"], batch["label"])
        step(fixed["image"], fixed["label"])
    alone, fed, waits, end = [], [], [], time.monotonic() + args.seconds
    while time.monotonic() < end and len(fed) < args.max_steps:
        tick = time.perf_counter()
        step(fixed["image"], fixed["label"])
        alone.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        step(batch["image"], batch["label"])
        fed.append(time.perf_counter() - tick)
        waits.append(got - tick)
    return statistics.median(alone), statistics.median(fed), statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preprocessed", type=Path, help="a preprocess stage folder (plans.json, dataset.json)")
    parser.add_argument("--phantoms", action="store_true", help="use generated phantoms even if Task04 is present")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="default: the plans' or 40 56 40")
    parser.add_argument("--batch-size", type=int, default=9, help="volumes per batch (nnU-Net hippocampus: 9)")
    parser.add_argument("--samples-per-volume", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--elastic", action="store_true", help="also elastic deformation (p 0.2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--filters", type=int, nargs="+", default=None,
                        help="DynUNet filters per level (default 32 64 128 256 on CUDA, 8 16 32 64 on CPU)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.augmentation = AugmentationConfig(elastic_prob=0.2 if args.elastic else 0.0)

    patch = tuple(args.patch) if args.patch else None
    if patch is None and args.preprocessed:
        patch = tuple(int(v) for v in read_json(args.preprocessed / "plans.json")["patch_size"])
    patch = patch or (40, 56, 40)
    transform_args = {"patch_size": patch, "samples_per_volume": args.samples_per_volume}
    tick = time.perf_counter()
    dataset, source = _dataset(args, transform_args)
    print(f"data: {source}; cached in {time.perf_counter() - tick:.1f} s; patch {patch}; "
          f"batch {args.batch_size} x {args.samples_per_volume} patches; elastic {'on' if args.elastic else 'off'}")
    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name})")

    print("\nloader alone (median over batches)")
    for workers in args.workers:
        print(f"  workers {workers}: {_loader_only(dataset, workers, args):8.1f} patches/s", flush=True)

    step, filters = _step_fn(args, device, patch)
    fixed = next(iter(train_loader(dataset, batch_size=args.batch_size, num_workers=0,
                                   generator=torch.Generator().manual_seed(0))))
    patches = int(fixed["image"].shape[0])
    print(f"\ntraining steps, DynUNet filters {filters}: model alone on a fixed batch, alternating with steps fed "
          "by the loader (medians)")
    for workers in args.workers:
        generator = torch.Generator()
        loader = train_loader(dataset, batch_size=args.batch_size, num_workers=workers, generator=generator)
        alone, fed, wait = _interleaved_steps(step, fixed, _batches(loader, generator), args)
        print(f"  workers {workers}: model alone {alone * 1000:8.1f} ms ({patches / alone:6.1f} patches/s), "
              f"with loader {fed * 1000:8.1f} ms (wait {wait * 1000:6.1f} ms), ratio {fed / alone:5.2f}", flush=True)
        del loader
    if device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

if __name__ == "__main__":
    main()
