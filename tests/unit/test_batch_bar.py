"""Progress bars: drawn on a terminal, and tqdm not even imported where it would draw nothing."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from pipeline import batch


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm.std import tqdm

    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = batch._bar(3, "ingest")
    try:
        assert isinstance(bar, tqdm) and not bar.disable
        bar.update()
        assert bar.n == 1
    finally:
        bar.close()


@pytest.mark.parametrize("stream", [io.StringIO(), None], ids=["file", "none"])
def test_no_terminal_no_bar(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO | None) -> None:
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = batch._bar(3, "ingest")
    assert isinstance(bar, batch._NoBar)
    bar.update()
    bar.close()


def test_a_batch_with_logs_to_a_file_never_imports_tqdm() -> None:
    code = ("import sys\n"
            "from pipeline.batch import run_batch\n"
            "out = list(run_batch([1, 2, 3], abs, key=str, workers=1, desc='x'))\n"
            "print(len(out), 'tqdm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL)
    assert done.stdout.split() == ["3", "False"]
