"""medpipe: a reproducible medical-imaging pipeline (ingest -> preprocess -> train -> infer -> evaluate -> report)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
