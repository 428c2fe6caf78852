"""Benchmark: MSD Task04 hippocampus, one cross-validation fold trained under a wall-clock budget.

    .venv/bin/python benchmarks/hippocampus.py --out /tmp/bench_hippo --fold 0 --minutes 30
    .venv/bin/python benchmarks/hippocampus.py --out /tmp/bench_hippo --fold 0 --minutes 30 \\
        --set train.network.name=dynunet                                   # any config override

Ingests ``../shared/data/Task04_Hippocampus`` (reused when up to date), preprocesses it,
trains fold ``--fold`` of the fixed splits in ``data_manifests/task04_hippocampus_splits.json``
for at most ``--minutes`` of training, then predicts the fold's held-out studies on their
original grids and prints the Dice per class (mean over studies), the training minutes and
the wall time, next to nnU-Net's published 5-fold cross-validation Dice. ``--fold all`` trains
the five folds in turn and prints the cross-validation means. Results go to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import InferConfig, load_config  # noqa: E402
from pipeline.fileio import read_json, write_json_atomic  # noqa: E402
from pipeline.inference.predictor import Predictor  # noqa: E402
from pipeline.io.nifti import load_nifti  # noqa: E402
from pipeline.metrics.segmentation import grid_spacing, segmentation_metrics  # noqa: E402
from pipeline.stages.ingest import ingest  # noqa: E402
from pipeline.stages.preprocess import preprocess  # noqa: E402
from pipeline.stages.train import train  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
SPLITS = REPO / "data_manifests" / "task04_hippocampus_splits.json"
CONFIG = REPO / "configs" / "hippocampus.yaml"
NNUNET_CV_DICE = {"Anterior": 0.8975, "Posterior": 0.8807}

log = logging.getLogger("benchmark")


def fold_dice(model_dir: Path, ingest_dir: Path, validation_ids: list[str], *, infer: InferConfig) -> dict[str, Any]:
    """Dice per class for each held-out study, predicted on its original grid from the ingested image."""
    predictor, bundle = Predictor.from_folder(model_dir, config=infer)
    labels = bundle.labels or {}
    manifest = {s["id"]: s for s in read_json(ingest_dir / "manifest.json")["studies"]}
    per_study: dict[str, dict[str, float]] = {}
    tick = time.monotonic()
    voxels = 0
    for study_id in validation_ids:
        study = manifest[study_id]
        image = load_nifti(ingest_dir / study["image"])
        reference = load_nifti(ingest_dir / study["label"])
        prediction = predictor.predict_volume(image)
        voxels += int(np.prod(image.spatial_shape))
        spacing, _ = grid_spacing(image.affine, what=study_id)
        metrics = segmentation_metrics(np.asarray(prediction.array), np.asarray(reference.array).astype(np.int64),
                                       spacing=spacing, classes=range(1, bundle.num_classes))
        per_study[study_id] = {labels.get(str(m.label), str(m.label)): m.dice for m in metrics}
    seconds = time.monotonic() - tick
    names = sorted({n for d in per_study.values() for n in d})
    mean = {n: statistics.fmean(d[n] for d in per_study.values()) for n in names}
    return {"dice": mean, "per_study": per_study, "infer_seconds": seconds,
            "infer_voxels_per_second": voxels / seconds if seconds else None}


def run_fold(fold: int, args: argparse.Namespace, ingest_dir: Path, preprocess_dir: Path) -> dict[str, Any]:
    config = load_config(args.config, overrides=[
        f"data.split_file={args.splits}", f"train.fold={fold}", f"train.max_minutes={args.minutes}", *args.set])
    out = args.out / "train"
    tick = time.monotonic()
    record = train(preprocess_dir, out, config=config)
    fold_dir = out / f"fold_{fold}"
    split = read_json(fold_dir / "split.json")
    train_record = read_json(fold_dir / "record.json")
    result = fold_dice(fold_dir / "model", ingest_dir, split["validation"], infer=config.infer)
    result.update({
        "fold": fold,
        "train_minutes": train_record.get("train_minutes"),
        "epochs_run": train_record.get("epochs_run"),
        "best_epoch": train_record.get("best_epoch"),
        "stage_wall_minutes": round((time.monotonic() - tick) / 60, 2),
        "status": record.get("status"),
    })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--splits", type=Path, default=SPLITS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fold", default="0", help="a fold index 0-4, or 'all'")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per fold (minutes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    wall = time.monotonic()

    base = load_config(args.config, overrides=[f"data.root={args.data}", *args.set])
    ingest_dir, preprocess_dir = args.out / "01_ingest", args.out / "02_preprocess"
    ingest(args.data, ingest_dir, config=base)
    preprocess(ingest_dir, preprocess_dir, config=base)
    folds = list(range(5)) if args.fold == "all" else [int(args.fold)]
    results = [run_fold(fold, args, ingest_dir, preprocess_dir) for fold in folds]

    summary: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "command": " ".join(sys.argv),
        "folds": [{k: v for k, v in r.items() if k != "per_study"} for r in results],
        "wall_minutes": round((time.monotonic() - wall) / 60, 2),
    }
    names = sorted(results[0]["dice"])
    summary["mean_dice"] = {n: statistics.fmean(r["dice"][n] for r in results) for n in names}
    write_json_atomic(args.out / "benchmark.json", {**summary, "per_study": {r["fold"]: r["per_study"]
                                                                               for r in results}})
    for r in results:
        dice = ", ".join(f"{n} {r['dice'][n]:.4f}" for n in names)
        print(f"fold {r['fold']}: Dice {dice}; {r['train_minutes']} min training, {r['epochs_run']} epochs "
              f"(best {r['best_epoch']}); inference {r['infer_voxels_per_second'] or 0:.0f} voxels/s")
    for n in names:
        ref = NNUNET_CV_DICE.get(n)
        versus = f" (nnU-Net 5-fold CV {ref:.4f}, ratio {summary['mean_dice'][n] / ref:.3f})" if ref else ""
        print(f"mean Dice {n}: {summary['mean_dice'][n]:.4f} over {len(results)} fold(s){versus}")
    print(f"wall time: {summary['wall_minutes']} min")
    print(json.dumps({k: summary[k] for k in ("date", "machine", "wall_minutes")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
