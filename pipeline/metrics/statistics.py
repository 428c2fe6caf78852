"""Cohort statistics: robust summaries, seeded bootstrap confidence intervals, worst cases, paired comparisons.

Every function looks only at finite values (an undefined metric is NaN, see
``pipeline.metrics.segmentation``) and counts the others as ``n_nan``. Standard deviations
are population ones (ddof=0). Bootstrap intervals are percentile intervals of the mean over
``samples`` resamples of the studies, drawn from a generator seeded by ``seed`` and a stable
key (class and metric), so the same inputs give the same interval whatever else is computed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats

STD = "population (ddof=0)"
CI_METHOD = "percentile bootstrap of the mean over studies"
PAIRED_TEST = "Wilcoxon signed-rank, two-sided, zero differences dropped (scipy.stats.wilcoxon, zero_method='wilcox')"


def finite(values: Iterable[float]) -> tuple[np.ndarray, int]:
    """(the finite values as float64, how many were NaN or infinite)."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


def _generator(seed: int, key: Sequence[str | int]) -> np.random.Generator:
    words = [int(seed) & 0xFFFFFFFF, *(zlib.crc32(str(k).encode("utf-8")) for k in key)]
    return np.random.default_rng(np.random.SeedSequence(words))


def bootstrap_ci(values: np.ndarray, *, samples: int, confidence: float, seed: int,
                 key: Sequence[str | int] = ()) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of ``values`` (finite, 1D); (None, None) when not computable."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or samples <= 0:
        return None, None
    rng = _generator(seed, key)
    means = np.empty(samples, dtype=np.float64)
    chunk = max(1, (1 << 22) // max(values.size, 1))  # bounded memory for large cohorts
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def describe(values: Iterable[float], *, samples: int = 0, confidence: float = 0.95, seed: int = 0,
             key: Sequence[str | int] = ()) -> dict[str, Any]:
    """n, n_nan, mean, std, median, q1, q3, iqr, min, max and (with ``samples``) ci_low/ci_high of the mean."""
    arr, n_nan = finite(values)
    out: dict[str, Any] = {"n": int(arr.size), "n_nan": n_nan}
    if arr.size == 0:
        out.update(dict.fromkeys(("mean", "std", "median", "q1", "q3", "iqr", "min", "max"), None))
    else:
        q1, median, q3 = (float(v) for v in np.percentile(arr, [25, 50, 75]))
        out.update({"mean": float(arr.mean()), "std": float(arr.std()), "median": median, "q1": q1, "q3": q3,
                    "iqr": q3 - q1, "min": float(arr.min()), "max": float(arr.max())})
    if samples > 0:
        out["ci_low"], out["ci_high"] = bootstrap_ci(arr, samples=samples, confidence=confidence, seed=seed, key=key)
    return out


def worst(rows: Sequence[dict[str, Any]], *, metric: str, count: int, higher_is_better: bool = True,
          key: str = "study") -> list[dict[str, Any]]:
    """The ``count`` rows worst in ``metric`` (undefined values first: they are failures), ties by ``key``."""
    def order(row: dict[str, Any]) -> tuple[int, float, str]:
        value = float(row[metric])
        if not math.isfinite(value):
            return 0, 0.0, str(row[key])
        return 1, value if higher_is_better else -value, str(row[key])

    return sorted(rows, key=order)[:count]


def paired_comparison(a: Sequence[float], b: Sequence[float], *, samples: int, confidence: float, seed: int,
                      key: Sequence[str | int] = ()) -> dict[str, Any]:
    """Paired statistics of ``b - a`` over pairs where both are finite: means, mean/median difference, its
    bootstrap interval, and the Wilcoxon signed-rank test (p = 1 when every difference is zero)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} and {len(b)})")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    diff = y - x
    out: dict[str, Any] = {"n": int(diff.size), "n_dropped": int(keep.size - keep.sum()),
                           "mean_a": None, "mean_b": None, "mean_diff": None, "median_diff": None,
                           "ci_low": None, "ci_high": None, "n_nonzero": int(np.count_nonzero(diff)),
                           "wilcoxon_statistic": None, "p_value": None}
    if diff.size == 0:
        return out
    out.update({"mean_a": float(x.mean()), "mean_b": float(y.mean()), "mean_diff": float(diff.mean()),
                "median_diff": float(np.median(diff))})
    out["ci_low"], out["ci_high"] = bootstrap_ci(diff, samples=samples, confidence=confidence, seed=seed, key=key)
    if out["n_nonzero"] == 0:
        out["wilcoxon_statistic"], out["p_value"] = 0.0, 1.0
    else:
        result = stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
        out["wilcoxon_statistic"], out["p_value"] = float(result.statistic), float(result.pvalue)
    return out
