"""Optional PDF export of a report page with headless Chromium (``chromium --headless --print-to-pdf``)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import StageError
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def find_browser() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def export_pdf(page: Path, out: Path, *, browser: str | None = None, timeout_s: float = 120.0) -> Path:
    """Print the HTML file ``page`` to ``out`` (PDF, A4/Letter as the browser defaults, no header or footer)."""
    page, out = Path(page).resolve(), Path(out)
    if not page.is_file():
        raise StageError(f"{page}: no such report page", code="pdf_no_page")
    browser = browser or find_browser()
    if browser is None:
        raise StageError("no Chromium found for the PDF export; install it (Debian: apt-get install chromium)",
                         code="pdf_no_browser")
    with tempfile.TemporaryDirectory(prefix="medpipe-chromium-") as profile, atomic_path(out) as tmp:
        command = [browser, *HEADLESS_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
                   f"--print-to-pdf={tmp}", page.as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StageError(f"{page.name}: Chromium did not print the page ({type(exc).__name__})",
                             code="pdf_failed") from None
        if done.returncode != 0 or not tmp.is_file() or not tmp.read_bytes()[:5] == b"%PDF-":
            log.debug("chromium stderr: %s", done.stderr[-2000:])
            raise StageError(f"{page.name}: Chromium exited with {done.returncode} without a PDF", code="pdf_failed")
    return out
