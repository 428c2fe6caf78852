"""Metrics: per-class segmentation metrics, the per-study table, and cohort statistics."""

from __future__ import annotations

from pipeline.metrics.segmentation import (
    EMPTY_POLICY,
    SURFACE_DEFINITION,
    ClassMetrics,
    class_metrics,
    integer_labels,
    nsd_tolerances,
    present_labels,
    segmentation_metrics,
    surface_distances,
)
from pipeline.metrics.statistics import bootstrap_ci, describe, paired_comparison, worst
from pipeline.metrics.table import DECIMALS, PER_STUDY_COLUMNS, REQUIRED_COLUMNS, fmt, per_study_csv, read_per_study

__all__ = ["DECIMALS", "EMPTY_POLICY", "PER_STUDY_COLUMNS", "REQUIRED_COLUMNS", "SURFACE_DEFINITION", "ClassMetrics",
           "bootstrap_ci", "class_metrics", "describe", "fmt", "integer_labels", "nsd_tolerances",
           "paired_comparison", "per_study_csv", "present_labels", "read_per_study", "segmentation_metrics",
           "surface_distances", "worst"]
