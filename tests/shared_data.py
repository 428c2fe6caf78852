"""The one way tests find ../shared/data: MEDPIPE_SHARED_DATA, defaulting to ../shared/data.

Absent data skips the test with a reason, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


def shared_data_root() -> Path:
    return Path(os.environ.get("MEDPIPE_SHARED_DATA", _REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path under the shared data folder; skip (or fail under CI) when it is missing."""
    path = shared_data_root().joinpath(*parts)
    if not path.exists():
        reason = f"shared data {path} not found (set MEDPIPE_SHARED_DATA to the folder holding it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)
    return path
