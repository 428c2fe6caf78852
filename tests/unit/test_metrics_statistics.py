"""Cohort statistics (describe, bootstrap intervals, worst cases, paired test) and the per-study table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pipeline.errors import ManifestError
from pipeline.metrics.statistics import bootstrap_ci, describe, paired_comparison, worst
from pipeline.metrics.table import PER_STUDY_COLUMNS, REQUIRED_COLUMNS, per_study_csv, read_per_study


def test_describe_spread_and_nan_counting() -> None:
    d = describe([1.0, 3.0, float("nan"), 2.0, 4.0])
    assert d["n"] == 4 and d["n_nan"] == 1
    assert d["mean"] == 2.5 and d["median"] == 2.5 and d["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert (d["q1"], d["q3"], d["iqr"]) == (1.75, 3.25, 1.5)  # numpy's linear percentiles
    assert (d["min"], d["max"]) == (1.0, 4.0) and "ci_low" not in d
    empty = describe([float("nan")], samples=100)
    assert empty["mean"] is None and empty["n_nan"] == 1 and empty["ci_low"] is None


def test_bootstrap_ci_is_seeded_deterministic_and_keyed() -> None:
    values = np.random.default_rng(3).normal(10.0, 2.0, size=50)
    first = bootstrap_ci(values, samples=500, confidence=0.95, seed=7, key=(1, "dice"))
    assert first == bootstrap_ci(values, samples=500, confidence=0.95, seed=7, key=(1, "dice"))
    assert first != bootstrap_ci(values, samples=500, confidence=0.95, seed=8, key=(1, "dice"))
    assert first != bootstrap_ci(values, samples=500, confidence=0.95, seed=7, key=(2, "dice"))
    lo, hi = first
    assert lo < values.mean() < hi
    assert bootstrap_ci(np.full(9, 0.7), samples=200, confidence=0.95, seed=0) == (pytest.approx(0.7),
                                                                                   pytest.approx(0.7))
    assert bootstrap_ci(np.array([]), samples=200, confidence=0.95, seed=0) == (None, None)


def test_bootstrap_ci_width_matches_the_normal_theory_for_a_large_sample() -> None:
    """For n = 400 the percentile interval of the mean is close to mean +- 1.96 sd / sqrt(n)."""
    values = np.random.default_rng(5).normal(0.8, 0.1, size=400)
    lo, hi = bootstrap_ci(values, samples=4000, confidence=0.95, seed=0)
    expected = 2 * 1.959964 * values.std() / math.sqrt(values.size)
    assert hi - lo == pytest.approx(expected, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.002)


def test_worst_lists_undefined_first_then_lowest_or_highest() -> None:
    rows = [{"study": "a", "dice": 0.9, "hd95": 2.0}, {"study": "b", "dice": 0.5, "hd95": float("nan")},
            {"study": "c", "dice": 0.5, "hd95": 9.0}, {"study": "d", "dice": 0.95, "hd95": 1.0}]
    assert [r["study"] for r in worst(rows, metric="dice", count=3)] == ["b", "c", "a"]
    assert [r["study"] for r in worst(rows, metric="hd95", count=2, higher_is_better=False)] == ["b", "c"]


def test_paired_comparison_matches_scipy_and_known_differences() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.6, 0.9, size=30)
    b = a + rng.normal(0.03, 0.02, size=30)
    b[3] = a[3]  # one zero difference: dropped by the 'wilcox' zero method
    a_nan, b_nan = np.append(a, np.nan), np.append(b, 0.5)
    out = paired_comparison(a_nan, b_nan, samples=1000, confidence=0.95, seed=0, key=("x",))
    reference = stats.wilcoxon(b - a, zero_method="wilcox")
    assert out["n"] == 30 and out["n_dropped"] == 1 and out["n_nonzero"] == 29
    assert out["p_value"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert out["wilcoxon_statistic"] == reference.statistic
    assert out["mean_diff"] == pytest.approx(np.mean(b - a)) and out["median_diff"] == pytest.approx(np.median(b - a))
    assert out["mean_a"] == pytest.approx(a.mean()) and out["mean_b"] == pytest.approx(b.mean())
    assert out["ci_low"] < out["mean_diff"] < out["ci_high"] and out["ci_low"] > 0
    same = paired_comparison(a, a, samples=100, confidence=0.95, seed=0)
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0 and (same["ci_low"], same["ci_high"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        paired_comparison([1.0], [1.0, 2.0], samples=10, confidence=0.95, seed=0)


def test_per_study_table_columns_round_trip_and_refusals(tmp_path: Path) -> None:
    assert PER_STUDY_COLUMNS[:9] == REQUIRED_COLUMNS == (
        "study", "class", "dice", "iou", "hd95", "assd", "nsd", "volume_ref_ml", "volume_pred_ml")
    row = {"study": "case,1", "class": 2, "class_name": 'a "b"', "dice": 0.5, "iou": 1 / 3, "hd95": float("nan"),
           "assd": 1.25, "nsd": 0.75, "volume_ref_ml": 1.0, "volume_pred_ml": 0.5, "rel_volume_error": -0.5,
           "nsd_tolerance_mm": 2.0}
    text = per_study_csv([row])
    assert text.splitlines()[0] == ",".join(PER_STUDY_COLUMNS)
    assert ',0.333333,,1.250000,' in text
    path = tmp_path / "per_study.csv"
    path.write_text(text)
    (back,) = read_per_study(path)
    assert back["study"] == "case,1" and back["class"] == 2 and back["class_name"] == 'a "b"'
    assert math.isnan(back["hd95"]) and back["iou"] == 0.333333 and back["rel_volume_error"] == -0.5
    path.write_text("study,class,dice\nx,1,0.5\n")
    with pytest.raises(ManifestError, match="expected the columns"):
        read_per_study(path)
    with pytest.raises(ManifestError, match="run 'medpipe evaluate'"):
        read_per_study(tmp_path / "missing.csv")
