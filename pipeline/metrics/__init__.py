"""Metrics: per-class segmentation metrics and their summaries."""

from __future__ import annotations

from pipeline.metrics.segmentation import (
    DECIMALS,
    EMPTY_POLICY,
    PER_STUDY_COLUMNS,
    ClassMetrics,
    class_metrics,
    describe,
    fmt,
    integer_labels,
    per_study_csv,
    present_labels,
    read_per_study,
    segmentation_metrics,
)

__all__ = ["DECIMALS", "EMPTY_POLICY", "PER_STUDY_COLUMNS", "ClassMetrics", "class_metrics", "describe", "fmt",
           "integer_labels", "per_study_csv", "present_labels", "read_per_study", "segmentation_metrics"]
