"""Post-hoc calibration of classifier logits: temperature scaling, optionally with one offset per class.

Temperature scaling divides the logits by one T > 0 fitted by maximum likelihood on the
validation studies; it cannot move the decision boundary. Class weights and class-balanced
sampling shift every logit of a class by roughly the log of its weight, so a classifier
trained with them over-predicts the rare class, and T alone can only flatten its probabilities
towards 1/K (accuracy at the 0.5 operating point then falls below the majority guess).
Bias-corrected temperature scaling (Alexandari et al., ICML 2020) fits T and a logit offset per
class together: ``softmax(logits / T + b)``, with ``b[0] = 0`` (only differences matter). For two
classes both maps are monotone in the logit difference, so the AUC is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

_T_RANGE = (0.05, 20.0)
_BIAS_LIMIT = 20.0
# Gaussian priors (MAP fit): log T ~ N(0, 1.5^2), each offset ~ N(0, 3^2). Against the summed NLL of
# a hundred studies they weigh little; on a handful of separable studies they keep T and the offsets
# finite instead of running to the limits.
_LOG_T_SD, _BIAS_SD = 1.5, 3.0
MIN_STUDIES_PER_CLASS = 5  # fewer validation studies of a class: no calibration (it would only fit noise)


@dataclass(frozen=True)
class Calibration:
    """``softmax(logits / temperature + bias)``; an empty ``bias`` means no offsets."""

    temperature: float = 1.0
    bias: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"calibration temperature must be a positive number, not {self.temperature!r}")
        if not all(math.isfinite(b) for b in self.bias):
            raise ValueError(f"calibration logit offsets must be finite numbers, not {list(self.bias)}")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) of logits (N, K)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.bias:
            if len(self.bias) != z.shape[1]:
                raise ValueError(f"{len(self.bias)} calibration offsets for logits of {z.shape[1]} classes")
            z = z + np.asarray(self.bias)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def as_json(self) -> dict[str, Any]:
        """The model.json fields: ``temperature`` and ``logit_bias`` (null without offsets)."""
        return {"temperature": self.temperature, "logit_bias": list(self.bias) or None}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], *, where: str, num_classes: int) -> Calibration:
        """The calibration recorded in a model.json (models from before ``logit_bias``: temperature only)."""
        bias = meta.get("logit_bias") or ()
        try:
            calibration = cls(float(meta.get("temperature", 1.0)), tuple(float(b) for b in bias))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad calibration ({exc}); retrain or restore the model folder",
                                  code="model_json_invalid") from None
        if calibration.bias and len(calibration.bias) != num_classes:
            raise CheckpointError(f"{where}: logit_bias has {len(calibration.bias)} values for {num_classes} classes; "
                                  "retrain or restore the model folder", code="model_json_invalid")
        return calibration


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, temperature: bool = True, bias: bool = True,
                    max_iter: int = 200) -> Calibration:
    """T (with ``temperature``; else 1) and per-class offsets (with ``bias``) maximising the posterior on
    (logits, labels): the summed NLL plus weak Gaussian priors centred on no change, by LBFGS.

    Nothing is fitted when a class occurring in ``labels`` has fewer than 5 studies. Offsets are
    fitted only when every class occurs: an absent class's offset would run off to minus infinity.
    T is kept within [0.05, 20] and offsets within +-20.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = z.shape[1]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    if (temperature or bias) and counts[counts > 0].min(initial=np.iinfo(np.int64).max) < MIN_STUDIES_PER_CLASS:
        log.warning("calibration: left out, with only %s validation studies per class (it needs %d of each class "
                    "present)", "/".join(str(c) for c in counts), MIN_STUDIES_PER_CLASS)
        return Calibration()
    present = int((counts > 0).sum())
    if bias and present < k:
        log.warning("calibration: %d of %d classes among the validation studies; fitting the temperature only",
                    present, k)
        bias = False
    log_t = torch.zeros(1, dtype=torch.float64)
    offsets = torch.zeros(k - 1 if bias else 0, dtype=torch.float64, requires_grad=True)
    log_t.requires_grad_(temperature)
    params = [p for p, fitted in ((log_t, temperature), (offsets, bias)) if fitted]
    if not params:
        return Calibration()
    optimizer = torch.optim.LBFGS(params, lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def full_bias() -> torch.Tensor:
        return torch.cat([torch.zeros(k - len(offsets), dtype=torch.float64), offsets])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp() + full_bias(), y, reduction="sum")
        loss = loss + 0.5 * (log_t / _LOG_T_SD).square().sum() + 0.5 * (offsets / _BIAS_SD).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(*_T_RANGE))
    values = full_bias().detach().clamp(-_BIAS_LIMIT, _BIAS_LIMIT).tolist() if bias else []
    return Calibration(temperature, tuple(values))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T), without offsets."""
    return fit_calibration(logits, labels, temperature=True, bias=False, max_iter=max_iter).temperature


def describe(calibration: Calibration) -> str:
    """``T = 0.61, offsets +0.00 / -3.24`` for titles and reports."""
    text = f"T = {calibration.temperature:.2f}"
    if calibration.bias:
        text += ", offsets " + " / ".join(f"{b:+.2f}" for b in calibration.bias)
    return text
