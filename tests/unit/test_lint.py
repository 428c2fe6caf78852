"""The code base passes ruff with the rules pinned in pyproject.toml ([tool.ruff.lint])."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_RUFF = importlib.util.find_spec("ruff") is None


@pytest.mark.skipif(NO_RUFF, reason="ruff is a dev dependency: pip install -e '.[dev]'")
def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "pipeline", "tests", "benchmarks"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, f"ruff findings (fix them, or run ruff check --fix):\n{done.stdout}{done.stderr}"
