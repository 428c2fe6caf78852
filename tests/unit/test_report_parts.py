"""Report building blocks: box plots, escaping and page safety, redaction of paths and keys, provenance block."""

from __future__ import annotations

import io
import math

import matplotlib.image as mpimg
import numpy as np

from pipeline.config import load_config
from pipeline.reporting import html, pages
from pipeline.reporting.figures import box_plots
from pipeline.reporting.provenance import REDACTED, data_digest, provenance_section, redact

METRICS = (("dice", "Dice"), ("hd95", "HD95 (mm)"))


def decode(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


def test_box_plots_draw_one_panel_per_metric_ignore_nan_and_are_deterministic() -> None:
    values = {"core": {"dice": [0.8, 0.9, 0.7, math.nan], "hd95": [2.0, 3.0, math.nan, 1.0]},
              "shell": {"dice": [0.95, 0.97, 0.9, 0.92], "hd95": [1.0, 1.5, 1.2, 0.8]}}
    png = box_plots(values, metrics=METRICS)
    assert png is not None and png == box_plots(values, metrics=METRICS)
    rgb = decode(png)
    assert rgb.shape[1] > 1.5 * rgb.shape[0] and rgb.std() > 0.05
    median_red = np.all(np.abs(rgb - [0xB0 / 255, 0, 0x20 / 255]) < 0.1, axis=-1)
    left, right = median_red[:, : rgb.shape[1] // 2], median_red[:, rgb.shape[1] // 2:]
    assert left.sum() > 20 and right.sum() > 20  # median lines in both panels
    assert box_plots({"core": {"dice": [math.nan], "hd95": []}}, metrics=METRICS) is None
    assert box_plots({}, metrics=METRICS) is None


def test_text_is_escaped_and_pages_load_nothing_external() -> None:
    row = html.table(["<b>"], [["<script>alert(1)</script>", html.link("studies/a.html", "a&b"), html.num(math.nan)]])
    assert "<script>" not in row and "&lt;script&gt;" in row and "a&amp;b" in row and html.DASH in row
    page = html.page("t<i>", row)
    assert page.count("<script") == 0 and "default-src 'none'" in page and "<title>t&lt;i&gt;</title>" in page
    assert html.number(None) == html.DASH and html.number(float("inf")) == html.DASH and html.number(2) == "2.0000"
    stats = {"mean": 0.5, "std": 0.1, "median": 0.4, "q1": 0.3, "q3": 0.6}
    assert html.mean_std(stats) == "0.500 \u00b1 0.100" and html.median_iqr(stats) == "0.400 [0.300, 0.600]"
    assert html.interval(None, 1.0) == html.DASH and html.interval(0.1, 0.2, digits=1) == "[0.1, 0.2]"


def test_redact_hides_paths_and_keys_but_keeps_settings() -> None:
    config = {"data": {"root": "/home/Doe^Jane/scans", "split_file": None},
              "ingest": {"pseudonym_key": "s3cret", "workers": 2},
              "notes": ["C:\\\\Users\\\\x", "plain"], "name": "run"}
    out = redact(config)
    assert out["data"] == {"root": REDACTED, "split_file": None}
    assert out["ingest"] == {"pseudonym_key": REDACTED, "workers": 2}
    assert out["notes"] == [REDACTED, "plain"] and out["name"] == "run"


def test_provenance_block_names_config_hash_records_packages_and_checksums() -> None:
    config = load_config(None, overrides=["seed=41", "data.root=/secret/place"])
    records = [{"stage": "train", "status": "complete", "config_hash": "c0ffee", "code_version": "0.1.0+gabc",
                "seed": 41, "device": "cuda / A100", "started": "2024-01-01T00:00:00+00:00", "duration_s": 12.5,
                "timings": {"epoch": 1.25}, "packages": {"torch": "9.9"}, "config": {"train": {"epochs": 3}}}]
    rows = [("case_1", "a" * 64, "b" * 64, None), ("case_2", "c" * 64, None, "d" * 64)]
    section = provenance_section(records, config=config, checksums=rows)
    body = section.body
    for expected in ("c0ffee", "0.1.0+gabc", "cuda / A100", "epoch 1.25", "torch", "9.9", "a" * 16, "d" * 16,
                     data_digest(rows), "seed 41"):
        assert expected in body, expected
    assert "/secret/place" not in body
    assert data_digest(rows) != data_digest(rows[:1])


def test_comparison_page_names_the_better_model_and_escapes() -> None:
    result = {"a": "old<model>", "b": "new", "confidence": 0.95, "test": "Wilcoxon", "ci": "bootstrap",
              "studies": ["x", "y"], "only_in_a": [], "only_in_b": ["z"],
              "classes": {"1": {"name": "core", "metrics": {"dice": {
                  "n": 2, "mean_a": 0.5, "mean_b": 0.7, "mean_diff": 0.2, "ci_low": 0.1, "ci_high": 0.3,
                  "median_diff": 0.2, "p_value": 0.01, "better": "b"}}}}}
    page = pages.comparison_page(title="cmp", result=result)
    assert "old&lt;model&gt;" in page and "<model>" not in page
    assert "<td>new</td>" in page and "[0.1000, 0.3000]" in page and "Only in new: z" in page
