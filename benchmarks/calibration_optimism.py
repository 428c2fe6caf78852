"""How much does scoring a calibration on the studies it was fitted on flatter it? (issue 5)

    .venv/bin/python benchmarks/calibration_optimism.py                    # simulation only
    .venv/bin/python benchmarks/calibration_optimism.py --run /tmp/adrenal/train   # and a real run's seeds

A classifier's calibration (temperature plus one logit offset per class, ``fit_calibration``) is
fitted on the validation studies, and validation_metrics.json scores it on the same studies.
This script measures the optimism that causes, against the two alternatives:

- **simulation**: logits and labels drawn from a known calibration, a validation set of
  ``--n`` studies (AdrenalMNIST3D's has 98, 22 positive), repeated ``--repeats`` times. For
  each, the NLL and ECE of the fitted calibration on the validation set itself (in-sample), on
  5-fold stratified cross-fitting (each fold scored by a calibration fitted on the others) and
  on 20,000 fresh studies (the truth the other two estimate). Prints the mean error of each
  estimate against the truth.
- **--run**: for each seed of a trained ensemble (OUT/train/seed_S/validation_predictions.csv),
  the in-sample and cross-fitted NLL, ECE and accuracy of its validation studies.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.classification.calibration import Calibration, fit_calibration  # noqa: E402
from pipeline.classification.cv import MODEL_DIR, VALIDATION_PREDICTIONS, read_validation_predictions  # noqa: E402
from pipeline.classification.metrics import expected_calibration_error, nll, predict  # noqa: E402
from pipeline.fileio import read_json  # noqa: E402


def draw(n: int, *, rng: np.random.Generator, truth: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """Logits ~ N(0, 2^2) per class, labels drawn from ``truth``'s probabilities of them."""
    logits = rng.normal(0.0, 2.0, (n, len(truth.bias)))
    cumulative = np.cumsum(truth.probabilities(logits), axis=1)
    return logits, (rng.random(n)[:, None] > cumulative).sum(axis=1)


def cross_fitted(logits: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each study's probabilities from the calibration fitted on the other folds."""
    probs = np.zeros_like(logits, dtype=np.float64)
    for fit, score in StratifiedKFold(folds, shuffle=True, random_state=seed).split(logits, labels):
        probs[score] = fit_calibration(logits[fit], labels[fit]).probabilities(logits[score])
    return probs


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"nll": nll(labels, probs), "ece": expected_calibration_error(labels, probs)[0],
            "accuracy": float(np.mean(predict(probs, 0.5) == labels))}


def simulate(*, n: int, repeats: int, truth: Calibration, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fresh_logits, fresh_labels = draw(20000, rng=rng, truth=truth)
    rows: dict[str, list[dict[str, float]]] = {"in-sample": [], "cross-fitted": [], "fresh (truth)": []}
    positives = []
    for _ in range(repeats):
        logits, labels = draw(n, rng=rng, truth=truth)
        positives.append(labels.mean())
        fitted = fit_calibration(logits, labels)
        rows["in-sample"].append(scores(labels, fitted.probabilities(logits)))
        rows["cross-fitted"].append(scores(labels, cross_fitted(logits, labels)))
        rows["fresh (truth)"].append(scores(fresh_labels, fitted.probabilities(fresh_logits)))
    print(f"\nsimulation: {repeats} validation sets of {n} studies ({np.mean(positives):.0%} positive), truth "
          f"T = {truth.temperature}, offsets {list(truth.bias)}")
    truth_rows = rows["fresh (truth)"]
    for name, found in rows.items():
        means = {k: np.mean([r[k] for r in found]) for k in ("nll", "ece", "accuracy")}
        line = f"  {name:14s} NLL {means['nll']:.4f}  ECE {means['ece']:.4f}  accuracy {means['accuracy']:.4f}"
        if found is not truth_rows:
            error = {k: np.mean([r[k] - t[k] for r, t in zip(found, truth_rows, strict=True)])
                     for k in ("nll", "ece", "accuracy")}
            line += (f"   error against the truth: NLL {error['nll']:+.4f}, ECE {error['ece']:+.4f}, "
                     f"accuracy {error['accuracy']:+.4f}")
        print(line)


def real_run(train_dir: Path) -> None:
    folders = sorted(train_dir.glob("seed_*"), key=lambda p: int(p.name.split("_")[1])) or [train_dir]
    print(f"\n{train_dir}: in-sample -> cross-fitted (5 folds) on each model's validation studies")
    for folder in folders:
        _, labels, logits = read_validation_predictions(folder / VALIDATION_PREDICTIONS)
        labels = np.asarray(labels)
        model_json = folder / MODEL_DIR / "model.json"  # the calibration the model ships with
        shipped = Calibration.from_json(read_json(model_json), where=str(model_json), num_classes=logits.shape[1])
        inside = scores(labels, shipped.probabilities(logits))
        outside = scores(labels, cross_fitted(logits, labels))
        print(f"  {folder.name}: " + ", ".join(f"{k} {inside[k]:.4f} -> {outside[k]:.4f}" for k in inside))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[98, 300])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, help="a trained classifier's train folder (seed_S/ inside for ensembles)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # fit_calibration's notes on small folds
    # a classifier trained with class weights: logits shifted towards the rare class, and too sharp
    truth = Calibration(1.6, (0.0, -1.9))  # about 22% positive, like the validation split
    for n in args.n:
        simulate(n=n, repeats=args.repeats, truth=truth, seed=args.seed)
    if args.run is not None:
        real_run(args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
