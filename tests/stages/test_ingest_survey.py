"""`medpipe ingest --dry-run`: each study with what ingest would do with it, the same ids and verdicts as the real
run, patient data scrubbed, and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.io.nifti import save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from pipeline.stages.ingest_survey import survey
from tests.fixtures.bad_inputs import small_stored, write_canary_series
from tests.fixtures.dicom_kinds import write_object
from tests.fixtures.dicom_writer import write_series


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    """A patient's folder with a series, a large series, an SR, a NIfTI image and a stray text file."""
    root = tmp_path / "scan"
    write_canary_series(root / "CANARY_NAME" / "t1", 1, "t1")
    write_series(root / "big", small_stored(2, (16, 12, 6)), series_tag="big")
    write_object(root / "report" / "sr.dcm", "sr")
    save_nifti(Volume(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.diag([1.0, 1.0, 2.0, 1.0])),
               root / "nifti" / "image.nii.gz")
    (root / "notes.txt").write_text("not a scan\n")
    return root


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_the_dry_run_gives_the_real_run_s_ids_and_verdicts_and_writes_nothing(scan: Path, tmp_path: Path) -> None:
    config = load_config(None, overrides=["ingest.max_voxels=1000"])  # "big" (1152 voxels) fails from its headers
    before = _listing(tmp_path)
    surveyed = survey(scan, config=config)
    assert _listing(tmp_path) == before  # nothing written anywhere below, the scan folder included
    ingest(scan, tmp_path / "out", config=config)
    real = {s.id: s for s in load_manifest(tmp_path / "out").studies}
    verdict = {"to_convert": "ok", "skipped": "skipped", "failed": "failed"}
    assert {s.id: (s.source, verdict[s.status]) for s in surveyed} == {i: (s.source, s.status) for i, s in real.items()}
    by_source = {s.source: s for s in surveyed}
    assert by_source["big"].reason is not None and by_source["big"].reason[0] == "too_large"
    assert by_source["report"].reason is not None and by_source["report"].reason[0] == "dicom_non_image"
    assert by_source["nifti/image.nii.gz"].status == "to_convert"
    assert any(re.fullmatch(r"phi-[0-9a-f]{8}/t1", s.source) for s in surveyed)  # scrubbed as in the manifest


def test_the_dry_run_command_prints_each_study_and_needs_no_out(scan: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = _listing(tmp_path)
    assert main(["ingest", str(scan), "--dry-run", "--set", "ingest.max_voxels=1000"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"ingest (dry run): 4 studies under {scan}; nothing was written")
    assert "  to convert: 2 (1 dicom, 1 nifti; 0 with a label)" in printed
    assert "  skipped: 1 (1 dicom_non_image)" in printed and "  failed: 1 (1 too_large)" in printed
    assert "canary" not in printed.lower()
    assert main(["ingest", str(scan), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert _listing(tmp_path) == before  # no output folder, no log file
    assert main(["ingest", str(scan)]) == 2
    assert "needs --out OUT" in capsys.readouterr().err
