"""The report pages in a real browser: headless Chromium (via chromedriver) loads every page without console errors,
its images decode, links lead to the study pages, screenshots are not blank; the checks themselves can fail; PDF.

About 15 s. Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package ``selenium``:
skipped with the reason when they are missing, failed instead under CI (CI=true).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.demo_data import phantom
from pipeline.io.nifti import save_nifti
from pipeline.manifest import Manifest, Problem, Study, save_manifest
from pipeline.reporting.pdf import HEADLESS_FLAGS, export_pdf
from pipeline.stages.compare import compare
from pipeline.stages.evaluate import evaluate
from pipeline.stages.report import report


def _require(what: str, found: Any) -> Any:
    if not found:
        reason = f"{what} not found (Debian: apt-get install -y chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    return _require("chromium", shutil.which("chromium") or shutil.which("chromium-browser"))


@pytest.fixture(scope="module")
def driver(chromium: str) -> Iterator[Any]:
    chromedriver = _require("chromedriver", shutil.which("chromedriver"))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require("the selenium package", None)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="medpipe-chromium-")
    for flag in (*HEADLESS_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1400", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def visit(browser: Any, page: Path) -> dict[str, Any]:
    """Load a page; return its console entries (SEVERE ones are errors), broken images and a screenshot."""
    browser.get_log("browser")  # drop entries of earlier pages
    browser.get(page.resolve().as_uri())
    state = browser.execute_script("return document.readyState")
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
    logs = browser.get_log("browser")
    return {"state": state, "title": browser.title, "errors": [e for e in logs if e.get("level") == "SEVERE"],
            "broken_images": broken, "screenshot": browser.get_screenshot_as_png()}


def blank(png: bytes) -> bool:
    """A screenshot with (almost) nothing on it: one colour, or under 1 % of pixels differing from the background."""
    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    background = np.median(rgb.reshape(-1, 3), axis=0)
    differs = np.abs(rgb - background).max(axis=-1) > 0.1
    return bool(rgb.std() < 0.01 or differs.mean() < 0.01)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of three phantom studies (with an ingest problem) and a paired comparison page."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(4)
    ingest, preds_a, preds_b = root / "01_ingest", root / "pred_a", root / "pred_b"
    studies = []
    for i, shift in enumerate([0, 2, 4]):
        sid = f"case_{i:04d}"
        image, label = phantom(rng, shape=(28, 32, 24), spacing=(0.9, 1.0, 1.3))
        save_nifti(image, ingest / "images" / f"{sid}.nii.gz", dtype=np.float32)
        save_nifti(label, ingest / "labels" / f"{sid}.nii.gz", dtype=np.uint8)
        save_nifti(label.with_array(np.roll(label.array, shift, axis=0)), preds_a / f"{sid}.nii.gz", dtype=np.uint8)
        save_nifti(label.with_array(np.roll(label.array, shift // 2, axis=0)), preds_b / f"{sid}.nii.gz",
                   dtype=np.uint8)
        studies.append(Study(id=sid, source=f"scan{i}.nii.gz", format="nifti", status="ok",
                             image=f"images/{sid}.nii.gz", label=f"labels/{sid}.nii.gz",
                             problems=[Problem(code="rounded_affine", message="affine rounded")] if i == 1 else []))
    save_manifest(Manifest(dataset="phantoms", labels={"0": "background", "1": "core", "2": "shell"},
                           studies=studies), ingest)
    config = load_config(None, overrides=["evaluate.bootstrap=200"])
    evaluate(preds_a, ingest, root / "eval_a", config=config)
    evaluate(preds_b, ingest, root / "eval_b", config=config)
    report(root / "eval_a", root / "report", predictions=preds_a, ingest=ingest, config=config,
           provenance=[ingest.parent / "eval_a"])
    compare(root / "eval_a", root / "eval_b", root / "compare", names=("old", "new"), config=config)
    return root


def test_every_page_loads_without_console_errors_and_is_not_blank(driver: Any, site: Path) -> None:
    pages = [site / "report" / "index.html", *sorted((site / "report" / "studies").glob("*.html")),
             site / "compare" / "comparison.html"]
    assert len(pages) == 5
    for page in pages:
        seen = visit(driver, page)
        assert seen["state"] == "complete", page.name
        assert seen["errors"] == [], f"{page.name}: console errors {seen['errors']}"
        assert seen["broken_images"] == 0, page.name
        assert not blank(seen["screenshot"]), page.name
        (site / "screens").mkdir(exist_ok=True)
        (site / "screens" / f"{page.parent.name}_{page.stem}.png").write_bytes(seen["screenshot"])
    assert visit(driver, site / "report" / "index.html")["title"].endswith("segmentation report")


def test_worst_case_links_open_the_study_pages(driver: Any, site: Path) -> None:
    from selenium.webdriver.common.by import By

    visit(driver, site / "report" / "index.html")
    links = driver.find_elements(By.CSS_SELECTOR, "a[href^='studies/']")
    assert links and links[0].text == "case_0002"  # the worst study: the largest shift
    links[0].click()
    assert driver.current_url.endswith("/studies/case_0002.html") and "case_0002" in driver.title
    images = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(images) == 1 and images[0] > 500


def test_the_checks_catch_script_errors_missing_images_and_blank_pages(driver: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><h1>Broken</h1>"
                      "<img src='missing.png' alt='gone'><script>throw new Error('boom');</script></body></html>")
    seen = visit(driver, broken)
    assert any("boom" in e["message"] for e in seen["errors"])
    assert any("missing.png" in e["message"] for e in seen["errors"]) and seen["broken_images"] == 1
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><head><title>e</title></head><body></body></html>")
    assert blank(visit(driver, empty)["screenshot"])


def test_pdf_export_from_python_and_the_cli(chromium: str, site: Path, tmp_path: Path) -> None:
    out = export_pdf(site / "report" / "index.html", tmp_path / "report.pdf", browser=chromium)
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 20_000 and b"/Type /Page" in data
    study = sorted((site / "report" / "studies").glob("*.html"))[0]
    assert main(["export-pdf", str(study), "--out", str(tmp_path / "study.pdf")]) == 0
    assert (tmp_path / "study.pdf").read_bytes().startswith(b"%PDF-")
