"""What ingest skips, with the reason: non-image objects, SEG, colour, burned-in text, localizers."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.dicom_kinds import NON_IMAGE_CLASSES, write_object
from tests.fixtures.dicom_writer import write_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"


def _stored(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 900, size=(6, 5, 3)).astype(np.int16)


def _sop_class(uid: str):
    def edit(ds, _k):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid
    return edit


def _rgb(ds, _k) -> None:
    _sop_class(SECONDARY_CAPTURE)(ds, _k)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)


def _anonymised(ds, _k) -> None:
    ds.SOPClassUID = ds.SOPInstanceUID = ds.SeriesInstanceUID = ""


@pytest.fixture
def mixed_export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    write_series(root / "good", _stored(1), series_tag="good")
    write_series(root / "seg", _stored(2), series_tag="seg", edit=_sop_class(SEG))
    write_series(root / "rgb", _stored(3), series_tag="rgb", edit=_rgb)
    write_series(root / "burned", _stored(4), series_tag="burned",
                 edit=lambda ds, _: setattr(ds, "BurnedInAnnotation", "YES"))
    write_series(root / "scout", _stored(5), series_tag="scout",
                 edit=lambda ds, _: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    write_series(root / "anon", _stored(6), series_tag="anon", edit=_anonymised)
    write_series(root / "xray", _stored(7), series_tag="xray", edit=_sop_class(DIGITAL_XRAY))
    for kind in NON_IMAGE_CLASSES:
        write_object(root / "objects" / f"{kind}.dcm", kind)
    return root


def test_skipped_series_carry_their_reason_and_the_rest_converts(mixed_export: Path, tmp_path: Path) -> None:
    record = ingest(mixed_export, tmp_path / "out")
    assert record["status"] == "complete"
    studies = load_manifest(tmp_path / "out").studies
    skipped = {(s.source, s.problems[0].code) for s in studies if s.status == "skipped"}
    assert skipped == {("seg", "dicom_segmentation"), ("rgb", "dicom_colour"),
                       ("burned", "dicom_burned_in_annotation"), ("scout", "dicom_localizer"),
                       ("xray", "dicom_non_volume"),
                       ("objects", "dicom_rtstruct"),  # its own code: one can be a label (test_rtstruct_labels.py)
                       *{("objects", "dicom_non_image") for kind in NON_IMAGE_CLASSES if kind != "rtstruct"}}
    assert sum(1 for s in studies if s.source == "objects") == len(NON_IMAGE_CLASSES)
    ok = {s.source: s for s in studies if s.status == "ok"}
    assert set(ok) == {"good", "anon"}
    assert [p.code for p in ok["anon"].problems] == ["dicom_no_series_uid"]
    assert all(s.image is None for s in studies if s.status == "skipped")
    messages = " ".join(p.message for s in studies for p in s.problems)
    assert "structured report" in messages and "encapsulated document" in messages
    assert "an RT structure set; the series it outlines is not an image series ingested" in messages


def test_log_keeps_the_skip_code_when_a_series_is_described_by_the_same_word(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SeriesDescription is scrubbed wherever it appears; the code in the log line is not rewritten."""
    def seg(ds, k) -> None:
        _sop_class(SEG)(ds, k)
        ds.SeriesDescription = "Segmentation"

    write_series(tmp_path / "scan" / "seg", _stored(2), series_tag="seg", edit=seg)
    write_series(tmp_path / "scan" / "Segmentation", _stored(1), series_tag="img")  # a folder named by it
    with caplog.at_level(logging.WARNING):
        ingest(tmp_path / "scan", tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines and all(re.search(r"\[dicom_segmentation\] seg/IM\d+\.dcm: a DICOM SEG object", line)
                         for line in lines)  # each SEG file is a segmentation of its own
    sources = {s.source for s in load_manifest(tmp_path / "out").studies}
    assert "seg" in sources and not any("egmentation" in s for s in sources)  # the folder still scrubbed
