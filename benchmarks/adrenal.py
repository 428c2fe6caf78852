"""Benchmark: a 3D classifier on AdrenalMNIST3D (64^3): validation AUC, accuracy and minutes on this machine.

    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal                     # the target run
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal1 --ensemble 1       # one seed
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_ft --seed 0 --ensemble 1 \\
        --pretrained /tmp/adrenal_pre/train/model/model.pt --freeze-epochs 1      # transfer learning
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_seg --network segmentation_encoder \\
        --pretrained RUN/03_train/model --freeze-epochs 1 --ensemble 1     # from a segmentation model's encoder
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_seg0 --network segmentation_encoder \\
        --segmentation-model RUN/03_train/model --ensemble 1   # same architecture from scratch

Imports the official train and validation splits with ``import_medmnist`` (cached in
OUT/import), trains on train (into OUT/train, or OUT/seed_S/train for --ensemble N > 1) and
selects the epoch with the best validation AUC, then prints the validation AUC (with its
bootstrap 95% CI), accuracy, the best epoch and the minutes spent. The per-epoch curve is
history.csv in that train folder. ``--ensemble N`` trains N seeds into OUT/seed_S and also
scores the average of their calibrated validation probabilities (as ``medpipe infer`` averages
models); ``--max-minutes`` bounds the whole run, each seed getting an equal share of what is
left. The default, 8 seeds of 30 epochs, takes about 22 minutes on 2 CPU cores; why 8, and the
spread of single seeds and of their averages, is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipeline.classification.calibration import Calibration  # noqa: E402
from pipeline.classification.medmnist import import_medmnist  # noqa: E402
from pipeline.classification.metrics import probability_metrics  # noqa: E402
from pipeline.classification.pretrained_files import segmentation_spec  # noqa: E402
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
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-minutes", type=float, default=28.0,
                        help="training budget of the whole run; with --ensemble, each seed gets an equal share "
                             "of what is left when it starts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", type=Path, default=None, help="weights to start from: a state-dict file "
                        "or a medpipe model folder (with --network segmentation_encoder: a segmentation model)")
    parser.add_argument("--segmentation-model", type=Path, default=None,
                        help="with --network segmentation_encoder and no --pretrained: take only the architecture "
                             "of this segmentation model folder (the from-scratch baseline of a transfer run)")
    parser.add_argument("--freeze-epochs", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ensemble", type=int, default=8, help="train this many seeds (seed, seed+1, ...) into "
                        "OUT/seed_S and also print the AUC of their averaged calibrated validation probabilities")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    imported = args.out / "import"
    if not (imported / "manifest.json").is_file():
        import_medmnist(args.npz, imported)
    began = time.monotonic()
    outs = [args.out] if args.ensemble == 1 else [args.out / f"seed_{args.seed + i}" for i in range(args.ensemble)]
    for i, out in enumerate(outs):
        share = (args.max_minutes - (time.monotonic() - began) / 60) / (len(outs) - i)
        _train_one(args, imported, out, seed=args.seed + i, max_minutes=max(share, 0.1))
    minutes = (time.monotonic() - began) / 60
    if args.ensemble > 1:
        _print_ensemble(outs, minutes)
    return 0


def _train_one(args: argparse.Namespace, imported: Path, out: Path, *, seed: int, max_minutes: float) -> None:
    kwargs: dict = {"widen_factor": args.widen, "conv1_t_stride": 2} if args.network.startswith("resnet") else {}
    if args.segmentation_model is not None:
        kwargs["segmentation"] = segmentation_spec(args.segmentation_model)
    config = validate({"seed": seed, "task": "classification", "classify": {
        "network": args.network, "network_kwargs": kwargs,
        "input_size": [args.size] * 3, "epochs": args.epochs, "max_minutes": max_minutes,
        "batch_size": args.batch_size, "learning_rate": args.lr, "optimizer": "adamw", "balance": "weights",
        "label_smoothing": 0.05, "pretrained": str(args.pretrained) if args.pretrained else None,
        "freeze_epochs": args.freeze_epochs, "threads": args.threads, "device": "cpu"}})
    began = time.monotonic()
    record = train(imported, out / "train", config=config, force=True)
    minutes = (time.monotonic() - began) / 60
    metrics = json.loads((out / "train" / "validation_metrics.json").read_text())["calibrated"]
    print(f"seed {seed}: validation AUC {metrics['auc']:.4f} (95% CI {metrics['auc_ci'][0]:.3f}-"
          f"{metrics['auc_ci'][1]:.3f}), accuracy {metrics['accuracy']:.4f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f}, ECE {metrics['ece']:.4f}, best epoch {record.get('best_epoch')} of "
          f"{record.get('epochs_run')}, {minutes:.1f} min (training {record.get('train_minutes')} min)")
    print((out / "train" / "history.csv").read_text())


def _print_ensemble(outs: list[Path], minutes: float) -> None:
    """Score the mean of the members' validation probabilities (each member's best epoch): calibrated by each
    member's model.json as ``medpipe infer`` averages an ensemble, and raw (softmax of the logits)."""
    members = []
    for out in outs:
        with (out / "train" / "validation_predictions.csv").open(newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda r: r["study"])
        logits = np.array([[float(v) for k, v in r.items() if k.startswith("logit_")] for r in rows])
        model_json = out / "train" / "model" / "model.json"
        calibration = Calibration.from_json(json.loads(model_json.read_text()), where=str(model_json),
                                            num_classes=logits.shape[1])
        members.append((rows, calibration.probabilities(logits), Calibration().probabilities(logits)))
    labels = np.array([int(r["label"]) for r in members[0][0]])
    if any([r["study"] for r in m[0]] != [r["study"] for r in members[0][0]] for m in members):
        raise SystemExit("the ensemble members were validated on different studies")
    metrics = probability_metrics(labels, np.mean([m[1] for m in members], axis=0), bootstrap=2000, seed=0)
    raw = probability_metrics(labels, np.mean([m[2] for m in members], axis=0), bootstrap=0)
    print(f"ensemble of {len(outs)} seeds: validation AUC {metrics['auc']:.4f} (95% CI {metrics['auc_ci'][0]:.3f}-"
          f"{metrics['auc_ci'][1]:.3f}), accuracy {metrics['accuracy']:.4f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f}, ECE {metrics['ece']:.4f} (calibrated members); AUC of the raw "
          f"softmax mean {raw['auc']:.4f}; {minutes:.1f} min in all")


if __name__ == "__main__":
    raise SystemExit(main())
