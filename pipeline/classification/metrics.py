"""Classification metrics (scikit-learn), bootstrap CIs, expected calibration error and reliability diagrams."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from pipeline.classification.calibration import Calibration
from pipeline.metrics.statistics import bootstrap_ci

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC: of the positive class for 2 classes, macro one-vs-rest for more; None when one class only."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))
    return float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic over mid-ranks (ties count one half): scikit-learn's value, faster."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """``auc`` by ranks (for bootstrap resamples): equal to it, without scikit-learn's per-call overhead."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return _binary_auc(labels == 1, probs[:, 1])
    values = [_binary_auc(labels == c, probs[:, c]) for c in present]
    return float(np.mean([v for v in values if v is not None]))


def predict(probs: np.ndarray, operating_point: float = 0.5) -> np.ndarray:
    """Predicted classes: positive when p(1) >= operating_point for 2 classes, else the argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= operating_point).astype(np.int64)
    return probs.argmax(axis=1)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, *, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the top-class confidence over ``bins`` equal-width bins, and the bins (for a reliability diagram)."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                      "accuracy": acc, "confidence": conf})
    return float(ece), table


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes under ``probs`` (N, K)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def _point_metrics(labels: np.ndarray, probs: np.ndarray, operating_point: float) -> dict[str, Any]:
    k = probs.shape[1]
    pred = predict(probs, operating_point)
    out: dict[str, Any] = {
        "auc": auc(labels, probs),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)) if len(np.unique(labels)) > 1 else None,
        "f1": float(skm.f1_score(labels, pred, average="binary" if k == 2 else "macro", zero_division=0)),
    }
    cm = skm.confusion_matrix(labels, pred, labels=list(range(k)))
    if k == 2:
        tn, fp, fn, tp = cm.ravel()
        out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else None
        out["specificity"] = float(tn / (tn + fp)) if tn + fp else None
    else:
        recall = skm.recall_score(labels, pred, labels=list(range(k)), average=None, zero_division=0)
        out["sensitivity_per_class"] = [float(v) for v in recall]
    out["confusion_matrix"] = cm.astype(int).tolist()
    return out


def _rates(labels: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float | None]:
    """Balanced accuracy, F1 (binary; macro over the classes present otherwise) and, for 2 classes, sensitivity
    and specificity, from one confusion matrix (numpy: fast enough for bootstrap resamples; equals scikit-learn)."""
    cm = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    out: dict[str, float | None] = {
        "balanced_accuracy": float(np.mean(tp[present] / support[present])) if present.sum() > 1 else None}
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(k), where=(support + predicted) > 0)
    out["f1"] = float(f1[1]) if k == 2 else float(np.mean(f1[(support + predicted) > 0]))
    if k == 2:
        out["sensitivity"] = float(tp[1] / support[1]) if support[1] else None
        out["specificity"] = float(tp[0] / support[0]) if support[0] else None
    return out


def _interval(draws: list[float], confidence: float) -> list[float] | None:
    if not draws:
        return None
    alpha = (1 - confidence) / 2
    return [float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))]


def probability_metrics(labels: np.ndarray, probs: np.ndarray, *, operating_point: float = 0.5,
                        bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """AUC, accuracy, balanced accuracy, F1, sensitivity/specificity, confusion matrix and ECE of class
    probabilities (N, K), with percentile bootstrap CIs over studies (``bootstrap`` resamples, seeded).

    Point values come from scikit-learn. ``accuracy_ci`` is ``bootstrap_ci`` of per-study 0/1
    correctness; the other CIs feed the same resampled indices to each metric (resamples where
    a metric is undefined, e.g. one class only for AUC, are left out).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    out = _point_metrics(labels, probs, operating_point)
    out["ece"], out["reliability"] = expected_calibration_error(labels, probs)
    out.update({"n": int(len(labels)), "operating_point": float(operating_point)})
    if bootstrap > 0 and len(labels) > 1:
        pred = predict(probs, operating_point)
        correct = (pred == labels).astype(np.float64)
        lo, hi = bootstrap_ci(correct, samples=bootstrap, confidence=confidence, seed=seed, key=("accuracy",))
        out["accuracy_ci"] = [lo, hi]
        rng = np.random.default_rng(seed)
        k = probs.shape[1]
        names = ["balanced_accuracy", "f1", *(["sensitivity", "specificity"] if k == 2 else [])]
        draws: dict[str, list[float]] = {name: [] for name in ["auc", *names]}
        for _ in range(bootstrap):
            idx = rng.integers(0, len(labels), len(labels))
            value = fast_auc(labels[idx], probs[idx])
            if value is not None:
                draws["auc"].append(value)
            rates = _rates(labels[idx], pred[idx], k)
            for name in names:
                if rates[name] is not None:
                    draws[name].append(rates[name])
        for name, values in draws.items():
            out[f"{name}_ci"] = _interval(values, confidence)
    return out


def classification_metrics(labels: np.ndarray, logits: np.ndarray, *, calibration: Calibration | None = None,
                           operating_point: float = 0.5, bootstrap: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> dict[str, Any]:
    """probability_metrics of the (calibrated) logits, plus the NLL, the temperature and the logit offsets."""
    labels = np.asarray(labels, dtype=np.int64)
    calibration = calibration or Calibration()
    probs = calibration.probabilities(logits)
    out = probability_metrics(labels, probs, operating_point=operating_point, bootstrap=bootstrap,
                              confidence=confidence, seed=seed)
    out.update({"nll": nll(labels, probs), **calibration.as_json()})
    return out


def reliability_diagram(table: list[dict], path: str | Path, *, title: str = "Reliability") -> Path:
    """PNG of bin accuracy against confidence (the diagonal is perfect calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.fileio import atomic_path

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if table:
        centres = [(r["low"] + r["high"]) / 2 for r in table]
        ax.bar(centres, [r["accuracy"] for r in table], width=[r["high"] - r["low"] for r in table],
               edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], "ro", ms=4, label="confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
