"""Contract-test fixtures: tests that run the CLI in-process get the logging set-up they found back."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``pipeline.cli.main`` replaces the root handlers (console on this test's captured stderr, a log
    file in the output folder); put the previous ones back so later tests never log to closed streams."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
