"""Benchmark: a 3D classifier on AdrenalMNIST3D (64^3): validation AUC, accuracy and minutes on this machine.

    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal                     # from scratch
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_ft --seed 0 \\
        --pretrained /tmp/adrenal_pre/train/model/model.pt --freeze-epochs 1      # transfer learning

Imports the official train and validation splits with ``import_medmnist`` (cached in
OUT/import), trains on train and selects the epoch with the best validation AUC, then prints
the validation AUC (with its bootstrap 95% CI), accuracy, the best epoch and the minutes
spent. The per-epoch curve is OUT/train/history.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.classification.medmnist import import_medmnist  # noqa: E402
from pipeline.config import validate  # noqa: E402
from pipeline.stages.train import train  # noqa: E402

DEFAULT = REPO.parent / "shared" / "data" / "adrenalmnist3d" / "adrenalmnist3d_64_trainval.npz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=DEFAULT)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--network", default="resnet10")
    parser.add_argument("--widen", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-minutes", type=float, default=28.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", type=Path, default=None)
    parser.add_argument("--freeze-epochs", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    imported = args.out / "import"
    if not (imported / "manifest.json").is_file():
        import_medmnist(args.npz, imported)
    config = validate({"seed": args.seed, "task": "classification", "classify": {
        "network": args.network, "network_kwargs": {"widen_factor": args.widen, "conv1_t_stride": 2},
        "input_size": [args.size] * 3, "epochs": args.epochs, "max_minutes": args.max_minutes,
        "batch_size": args.batch_size, "learning_rate": args.lr, "optimizer": "adamw", "balance": "weights",
        "label_smoothing": 0.05, "pretrained": str(args.pretrained) if args.pretrained else None,
        "freeze_epochs": args.freeze_epochs, "threads": args.threads, "device": "cpu"}})
    began = time.monotonic()
    record = train(imported, args.out / "train", config=config, force=True)
    minutes = (time.monotonic() - began) / 60
    metrics = json.loads((args.out / "train" / "validation_metrics.json").read_text())["calibrated"]
    extra = record.get("extra", record)
    print(f"validation AUC {metrics['auc']:.4f} (95% CI {metrics['auc_ci'][0]:.3f}-{metrics['auc_ci'][1]:.3f}), "
          f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}, "
          f"ECE {metrics['ece']:.4f}, best epoch {extra.get('best_epoch')} of {extra.get('epochs_run')}, "
          f"{minutes:.1f} min (training {extra.get('train_minutes')} min)")
    print((args.out / "train" / "history.csv").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
