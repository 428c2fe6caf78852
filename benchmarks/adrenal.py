"""Benchmark: a 3D classifier on AdrenalMNIST3D (64^3): validation AUC, accuracy and minutes on this machine.

    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal                     # the target run
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal1 --ensemble 1       # one seed
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_ft --seed 0 --ensemble 1 \\
        --pretrained /tmp/adrenal_pre/train/model/model.pt --freeze-epochs 1      # transfer learning
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_seg --network segmentation_encoder \\
        --pretrained RUN/03_train/model --freeze-epochs 1 --ensemble 1     # from a segmentation model's encoder
    .venv/bin/python benchmarks/adrenal.py --out /tmp/adrenal_seg0 --network segmentation_encoder \\
        --segmentation-model RUN/03_train/model --ensemble 1   # same architecture from scratch

The recipe is configs/adrenal.yaml (what ``medpipe run configs/adrenal.yaml`` trains); the
options above override it. Imports the official train and validation splits with
``import_medmnist`` (cached in OUT/import), trains on train into OUT/train and selects the epoch
with the best validation AUC, then prints the validation AUC (with its bootstrap 95% CI), accuracy,
the best epoch and the minutes spent. The per-epoch curve is history.csv in the model's folder. ``--ensemble N`` is
``classify.seeds: N``: N seeds trained into OUT/train/seed_S, their average scored on the
validation studies (OUT/train/validation_metrics.json) exactly as ``medpipe infer
OUT/train/model`` averages their calibrated probabilities. ``--max-minutes`` bounds the whole run,
each seed getting an equal share. The default, 8 seeds of 30 epochs, takes 18-22 minutes on the
faster 2-core VMs; on slower ones the 28-minute budget stops each seed after 14-28 epochs. Why 8,
the spread of single seeds and of their averages, and why a budget-shortened schedule was not kept,
are in benchmarks/RESULTS.md.
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
from pipeline.classification.pretrained_files import segmentation_spec  # noqa: E402
from pipeline.config import PipelineConfig, parse_yaml, validate  # noqa: E402
from pipeline.stages.train import train  # noqa: E402

DEFAULT = REPO.parent / "shared" / "data" / "adrenalmnist3d" / "adrenalmnist3d_64_trainval.npz"
CONFIG = REPO / "configs" / "adrenal.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=DEFAULT)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--network", default=None, help="classify.network (default: the config's)")
    parser.add_argument("--widen", type=float, default=None, help="a ResNet's widen_factor (default: the config's)")
    parser.add_argument("--size", type=int, default=None, help="input edge in voxels (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=28.0,
                        help="training budget of the whole run; with N seeds, each gets 1/N of it")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="the first seed (default: the config's)")
    parser.add_argument("--pretrained", type=Path, default=None, help="weights to start from: a state-dict file "
                        "or a medpipe model folder (with --network segmentation_encoder: a segmentation model)")
    parser.add_argument("--segmentation-model", type=Path, default=None,
                        help="with --network segmentation_encoder and no --pretrained: take only the architecture "
                             "of this segmentation model folder (the from-scratch baseline of a transfer run)")
    parser.add_argument("--freeze-epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ensemble", type=int, default=None, help="train this many seeds (seed, seed+1, ...) "
                        "into OUT/train/seed_S (classify.seeds; default: the config's) and print their average's AUC")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    imported = args.out / "import"
    if not (imported / "manifest.json").is_file():
        import_medmnist(args.npz, imported)
    config = _config(args)
    began = time.monotonic()
    record = train(imported, args.out / "train", config=config, force=True)
    minutes = (time.monotonic() - began) / 60
    seeds = record.get("seeds") or [config.seed]
    for seed in seeds:
        _print_model(args.out / "train" / (f"seed_{seed}" if len(seeds) > 1 else ""), seed=seed)
    if len(seeds) > 1:
        metrics = json.loads((args.out / "train" / "validation_metrics.json").read_text())
        cal = metrics["calibrated"]
        print(f"ensemble of {len(seeds)} seeds: validation AUC {cal['auc']:.4f} (95% CI {cal['auc_ci'][0]:.3f}-"
              f"{cal['auc_ci'][1]:.3f}), accuracy {cal['accuracy']:.4f}, balanced accuracy "
              f"{cal['balanced_accuracy']:.4f}, ECE {cal['ece']:.4f} (calibrated members); AUC of the raw softmax "
              f"mean {metrics['uncalibrated']['auc']:.4f}; {minutes:.1f} min in all")
    return 0


def _config(args: argparse.Namespace) -> PipelineConfig:
    """configs/adrenal.yaml with the options given on the command line, on the CPU."""
    data = parse_yaml(CONFIG.read_text(encoding="utf-8"), source=str(CONFIG))
    c = data["classify"]
    if args.network is not None:
        c["network"] = args.network
    if not c["network"].startswith("resnet"):
        c["network_kwargs"] = {}
    elif args.widen is not None:
        c["network_kwargs"] = {**c.get("network_kwargs", {}), "widen_factor": args.widen}
    if args.segmentation_model is not None:
        c["network_kwargs"]["segmentation"] = segmentation_spec(args.segmentation_model)
    given = {"input_size": [args.size] * 3 if args.size else None, "epochs": args.epochs, "seeds": args.ensemble,
             "batch_size": args.batch_size, "learning_rate": args.lr, "freeze_epochs": args.freeze_epochs,
             "pretrained": str(args.pretrained) if args.pretrained else None, "threads": args.threads}
    c.update({k: v for k, v in given.items() if v is not None})
    c.update({"device": "cpu", "max_minutes": args.max_minutes / c.get("seeds", 1)})
    data["data"]["root"] = str(args.npz)
    if args.seed is not None:
        data["seed"] = args.seed
    return validate(data, source=str(CONFIG))


def _print_model(folder: Path, *, seed: int) -> None:
    metrics = json.loads((folder / "validation_metrics.json").read_text())["calibrated"]
    record = json.loads((folder / "record.json").read_text())
    print(f"seed {seed}: validation AUC {metrics['auc']:.4f} (95% CI {metrics['auc_ci'][0]:.3f}-"
          f"{metrics['auc_ci'][1]:.3f}), accuracy {metrics['accuracy']:.4f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f}, ECE {metrics['ece']:.4f}, best epoch {record.get('best_epoch')} of "
          f"{record.get('epochs_run')} (training {record.get('train_minutes')} min)")
    print((folder / "history.csv").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
