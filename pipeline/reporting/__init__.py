"""Reporting: study figures and self-contained HTML pages built from evaluation outputs."""

from __future__ import annotations
