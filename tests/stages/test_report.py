"""The report stage: files, parseable escaped HTML with metrics and embedded pictures, no leaks, provenance."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.config import config_hash, load_config
from pipeline.demo_data import phantom
from pipeline.fileio import read_json, sha256_file, write_json_atomic
from pipeline.io.nifti import save_nifti
from pipeline.manifest import Manifest, Problem, Study, load_manifest, save_manifest
from pipeline.provenance import StageRecord
from pipeline.stages.evaluate import evaluate
from pipeline.stages.report import report, safe_name

SECRET = "Doe^Jane"


class Collector(HTMLParser):
    """Collects tags, links, images and text; counts unbalanced structural tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a":
            self.links.append(a.get("href") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Collector:
    parser = Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.errors == [] and parser.stack == []
    return parser


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """ingest (images, labels, problems), infer-style predictions, evaluate, and stage records."""
    rng = np.random.default_rng(11)
    root = tmp_path / "run"
    ingest, infer_dir = root / "01_ingest", root / "04_infer"
    studies, entries = [], []
    for i, shift in enumerate([0, 3]):
        image, label = phantom(rng, shape=(24, 28, 20), spacing=(0.9, 1.0, 1.4), flip_x=(i == 1))
        sid = f"case_{i:04d}abcd"
        save_nifti(image, ingest / "images" / f"{sid}.nii.gz", dtype=np.float32)
        save_nifti(label, ingest / "labels" / f"{sid}.nii.gz", dtype=np.uint8)
        pred = np.roll(label.array, shift, axis=1)
        save_nifti(label.with_array(pred), infer_dir / "predictions" / f"{sid}.nii.gz", dtype=np.uint8)
        source = f"{SECRET}_{i}/scan_{SECRET}.nii.gz"
        checksums = {k: sha256_file(ingest / f"{k}s" / f"{sid}.nii.gz") for k in ("image", "label")}
        studies.append(Study(id=sid, source=source, format="nifti", status="ok", image=f"images/{sid}.nii.gz",
                             label=f"labels/{sid}.nii.gz", sha256=checksums,
                             problems=[Problem(code="rounded_affine",
                                               message=f"scan_{SECRET}.nii.gz: affine rounded")]))
        entries.append({"id": sid, "image": f"images/{sid}.nii.gz", "prediction": f"predictions/{sid}.nii.gz"})
    save_manifest(Manifest(dataset="demo", labels={"0": "background", "1": "core<script>", "2": "shell"},
                           studies=studies), ingest)
    write_json_atomic(infer_dir / "predictions.json", {"schema_version": 1, "model": {"labels": None},
                                                       "predictions": entries, "failed": []})
    ingest_record = StageRecord(stage="ingest", stage_dir=ingest, config={"data": {"root": str(tmp_path / SECRET)}},
                                config_hash="feedc0de", seed=7, device={"type": "cpu", "cpu": "x86_64"})
    ingest_record.finish(outputs=[])
    evaluate(infer_dir, ingest, root / "05_evaluate")
    return root


def decode_png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return mpimg.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")[..., :3]


def test_report_files_html_metrics_and_pictures(run: Path) -> None:
    out = run / "06_report"
    result = report(run / "05_evaluate", out, predictions=run / "04_infer", ingest=run / "01_ingest",
                    config=load_config(None, overrides=["report.title=Phantom report"]),
                    provenance=[run / "01_ingest", run / "05_evaluate" / "record.json"])
    assert result["status"] == "complete"
    ids = ["case_0000abcd", "case_0001abcd"]
    for sid in ids:
        for ext in ("json", "html", "png"):
            assert (out / "studies" / f"{sid}.{ext}").is_file()
    index = parse(out / "index.html")
    index_text = " ".join(index.text)
    assert "Phantom report" in index_text
    # worst first: case_0001 has its prediction shifted by 3 voxels, case_0000 is perfect; the overall worst
    # cases come first, then the worst cases of each class, then the study table
    worst_first = ["studies/case_0001abcd.html", "studies/case_0000abcd.html"]
    assert index.links[:2] == worst_first and index.links[-2:] == worst_first and set(index.links) == set(worst_first)
    summary = read_json(run / "05_evaluate" / "summary.json")
    core = summary["classes"]["1"]["dice"]
    assert f"{core['mean']:.3f} \u00b1 {core['std']:.3f}" in index_text
    assert f"[{core['ci_low']:.3f}, {core['ci_high']:.3f}]" in index_text  # bootstrap CI of the mean
    assert f"{core['median']:.3f} [{core['q1']:.3f}, {core['q3']:.3f}]" in index_text
    hd95 = summary["classes"]["2"]["hd95"]
    assert f"{hd95['median']:.2f} [{hd95['q1']:.2f}, {hd95['q3']:.2f}]" in index_text
    assert "feedc0de" in index_text and "x86_64" in index_text  # provenance block
    manifest = load_manifest(run / "01_ingest")
    assert manifest.studies[0].sha256["image"][:16] in index_text  # data checksums
    assert sha256_file(run / "04_infer" / "predictions" / "case_0000abcd.nii.gz")[:16] in index_text
    assert config_hash(load_config(None, overrides=["report.title=Phantom report"])) in index_text
    assert "monai" in index_text and "Wilcoxon" not in index_text
    (box_plot,) = index.images
    rgb = decode_png(box_plot)
    assert rgb.std() > 0.05 and rgb.shape[1] > 3 * rgb.shape[0]  # four panels side by side

    per_study = read_json(out / "studies" / "case_0001abcd.json")
    assert per_study["schema_version"] == 1 and per_study["id"] == "case_0001abcd"
    assert per_study["problems"][0]["code"] == "rounded_affine"
    assert per_study["paths"]["prediction"] == "predictions/case_0001abcd.nii.gz"
    segmentation = per_study["segmentation"]
    core_row = next(m for m in segmentation["classes"] if m["class"] == 1)
    assert set(core_row) >= {"dice", "iou", "nsd", "nsd_tolerance_mm", "hd95", "assd", "volume_ref_ml",
                             "volume_pred_ml", "rel_volume_error"}
    page = parse(out / "studies" / "case_0001abcd.html")
    page_text = " ".join(page.text)
    assert 0 < core_row["dice"] < 1 and f"{core_row['dice']:.4f}" in page_text
    assert f"{core_row['nsd']:.4f}" in page_text and f"{core_row['assd']:.2f}" in page_text
    assert "rounded_affine" in page_text and page.links == ["../index.html"]
    assert len(page.images) == 1
    png = base64.b64decode(page.images[0].split(",", 1)[1])
    assert png == (out / "studies" / "case_0001abcd.png").read_bytes()
    rgb = decode_png(page.images[0])
    assert rgb.std() > 0.05
    assert np.all(np.abs(rgb - [0, 1, 0]) < 0.15, axis=-1).sum() > 20  # reference contour
    assert np.all(np.abs(rgb - [1, 0, 1]) < 0.15, axis=-1).sum() > 20  # prediction contour


def test_secrets_in_configs_never_reach_the_pages(run: Path, tmp_path: Path) -> None:
    out = run / "06_report"
    config = load_config(None, overrides=[f"data.root={tmp_path / SECRET}", "ingest.pseudonym_key=hunter2-key"])
    report(run / "05_evaluate", out, ingest=run / "01_ingest", config=config, provenance=[run / "01_ingest"])
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "hunter2" not in text and "Doe" not in text and str(tmp_path) not in text
    assert "&lt;redacted&gt;" in text


def test_no_source_names_or_absolute_paths_and_text_is_escaped(run: Path, tmp_path: Path) -> None:
    out = run / "06_report"
    report(run / "05_evaluate", out, predictions=run / "04_infer", ingest=run / "01_ingest",
           provenance=[run / "01_ingest"])
    for path in sorted(out.rglob("*")):
        if path.suffix in (".html", ".json"):
            content = path.read_text(encoding="utf-8")
            assert "Doe" not in content and "Jane" not in content, path.name
            assert str(tmp_path) not in content, path.name
            if path.suffix == ".html":
                assert "<script>" not in content and "core&lt;script&gt;" in content


def test_report_is_deterministic_and_skips_when_up_to_date(run: Path) -> None:
    out = run / "06_report"
    args = {"predictions": run / "04_infer", "ingest": run / "01_ingest", "provenance": [run / "01_ingest"]}
    report(run / "05_evaluate", out, **args)
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.name not in ("record.json",)}
    assert report(run / "05_evaluate", out, **args).get("skipped") is True
    report(run / "05_evaluate", out, force=True, **args)
    second = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
              if p.is_file() and p.name not in ("record.json",)}
    assert second == first


def test_report_without_ingest_still_draws_predictions(run: Path) -> None:
    out = run / "report_min"
    report(run / "05_evaluate", out, predictions=run / "04_infer")
    assert (out / "studies" / "case_0000abcd.png").is_file()
    parse(out / "index.html")


def test_unsafe_ids_become_hashed_file_names() -> None:
    assert safe_name("case_abc.1") == "case_abc.1"
    for bad in ("../etc/passwd", "a/b", "x;rm -rf", "$(id)", ".hidden"):
        name = safe_name(bad)
        assert name.startswith("study_") and "/" not in name and len(name) == 18


def test_studies_not_converted_at_ingest_are_listed_by_id_with_their_reason(run: Path) -> None:
    manifest = load_manifest(run / "01_ingest")
    unread = Study(id="case_unread0001", source=f"{SECRET}_9/phi-1a2b3c4d", format="unknown", status="failed",
                   error=Problem(code="folder_unreadable", message=f"{SECRET}_9/phi-1a2b3c4d: the folder cannot be "
                                                                    "read (Permission denied)"))
    scout = Study(id="case_scout00001", source=f"{SECRET}_9/scout", format="dicom", status="skipped",
                  problems=[Problem(code="dicom_localizer", message=f"{SECRET}_9/scout: a localizer; skipped")])
    save_manifest(manifest.model_copy(update={"studies": [*manifest.studies, unread, scout]}), run / "01_ingest")
    out = run / "06_report"
    report(run / "05_evaluate", out, predictions=run / "04_infer", ingest=run / "01_ingest")
    text = " ".join(parse(out / "index.html").text)
    assert "not converted at ingest: 2" in text
    assert "case_unread0001 failed folder_unreadable <source>: the folder cannot be read (Permission denied)" in text
    assert "case_scout00001 skipped dicom_localizer <source>: a localizer; skipped" in text
    assert "Doe" not in text and "phi-1a2b3c4d" not in text

    report(run / "05_evaluate", run / "no_ingest", predictions=run / "04_infer")
    text = " ".join(parse(run / "no_ingest" / "index.html").text)
    assert "not known: the report was made without the ingest folder" in text and "not converted at" not in text
