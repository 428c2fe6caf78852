"""Entry point for ``python -m pipeline``."""

from __future__ import annotations

from pipeline.cli import entry

if __name__ == "__main__":
    entry()
