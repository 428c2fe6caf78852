"""File names whose bytes are not UTF-8 (Latin-1 names from old exports, archives unpacked without a code
page) or that hold characters that do not print (a newline, a terminal escape): they are read like any
other and named in manifests, records and logs as ``\\xNN``, as ``ls -b`` shows them; the batch never
dies on one, and no name forges a log line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.manifest import Manifest, load_manifest
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import small_stored
from tests.fixtures.dicom_writer import write_series


def _bytes_path(base: Path, *names: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(str(base)), *names)))


@pytest.fixture
def latin1_scan(tmp_path: Path) -> Path:
    """A scan folder named in Latin-1, holding a series in a Latin-1 folder, a series with a truncated slice
    named in Latin-1, a NIfTI image and a corrupt one, and a dangling link, all named in Latin-1."""
    scan = _bytes_path(tmp_path, b"sc\xe4n")
    first = write_series(scan / "a", small_stored(1), series_tag="first")
    folder = _bytes_path(scan, b"M\xfcller")
    folder.mkdir()
    for path in first.files:
        path.rename(folder / path.name)
    (scan / "a").rmdir()
    second = write_series(scan / "b", small_stored(2), series_tag="second")
    data = second.files[1].read_bytes()
    second.files[1].unlink()
    _bytes_path(scan / "b", b"sl\xefce.dcm").write_bytes(data[:-9])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), _bytes_path(scan, b"h\xf6rn.nii.gz"))
    _bytes_path(scan, b"brok\xe9n.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    _bytes_path(scan, b"l\xeenk.dcm").symlink_to(tmp_path / "missing")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan / "x\nWARNING forged\x1b[2J.nii.gz")
    return scan


def test_names_that_are_not_utf8_are_read_and_written_escaped(latin1_scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "ingest", str(latin1_scan), "--out", str(out), "--workers", "2"]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert done.returncode == 3, done.stderr.decode(errors="replace")  # partial: the broken ones fail alone
    texts = {p.name: p.read_bytes().decode("utf-8") for p in out.iterdir() if p.is_file()}  # strict UTF-8
    assert {"manifest.json", "record.json", "medpipe.log"} <= set(texts)
    json.loads(texts["record.json"])
    studies = {s.source: s for s in load_manifest(out).studies}
    assert studies["M\\xfcller"].status == "ok" and studies["M\\xfcller"].shape == [6, 5, 4]
    assert studies["h\\xf6rn.nii.gz"].status == "ok"
    assert studies["x\\x0aWARNING forged\\x1b[2J.nii.gz"].status == "ok"  # one line, no terminal escape
    assert "\nWARNING forged" not in texts["medpipe.log"] and "\x1b" not in done.stderr.decode(errors="replace")
    assert studies["b"].error is not None and studies["b"].error.code == "dicom_pixel_length"
    assert studies["b"].error.message.startswith("b/sl\\xefce.dcm: ")
    broken = studies["brok\\xe9n.nii.gz"].error
    assert broken is not None and broken.code == "nifti_corrupt"
    assert str(tmp_path) not in broken.message  # the library's message names the file, not where the scan lies
    assert sum(s.status == "skipped" for s in studies.values()) == 1  # the link
    assert "brok\\xe9n.nii.gz" in texts["medpipe.log"] and "Logging error" not in done.stderr.decode(errors="replace")
    # a rerun: the same names, the same ids, the converted studies reused
    record = ingest(latin1_scan, out, force=True)
    assert record["reused_studies"] == 3 and [s.id for s in load_manifest(out).studies] == [
        s.id for s in sorted(studies.values(), key=lambda s: (s.source, s.id))]


def test_names_written_alike_keep_a_study_each(tmp_path: Path) -> None:
    """A Latin-1 byte is written ``\\xfc``; a name spelled with a backslash and ``xfc`` is written the same way.
    Both are studies of their own: two ids, two images, neither overwriting the other, on every rerun."""
    scan = tmp_path / "scan"
    scan.mkdir()
    raw = np.zeros((4, 4, 4), np.int16)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), _bytes_path(scan, b"M\xfc.nii.gz"))
    nib.save(nib.Nifti1Image(raw + 7, np.eye(4)), scan / "M\\xfc.nii.gz")
    out = tmp_path / "out"
    ingest(scan, out)
    studies = load_manifest(out).studies
    assert [s.source for s in studies] == ["M\\xfc.nii.gz"] * 2 and len({s.id for s in studies}) == 2
    assert all(s.status == "ok" for s in studies)
    values = sorted(int(np.asarray(nib.load(out / s.image).dataobj).max()) for s in studies if s.image)
    assert values == [0, 7]  # both images, neither overwritten
    assert sorted(len(s.problems) for s in studies) == [0, 1]
    assert [p.code for s in studies for p in s.problems] == ["name_written_alike"]
    record = ingest(scan, out, force=True)
    assert record["reused_studies"] == 2 and [s.id for s in load_manifest(out).studies] == [s.id for s in studies]


def test_a_manifest_refuses_one_id_for_two_studies() -> None:
    study = {"id": "case_1", "source": "a.nii.gz", "format": "nifti", "status": "ok"}
    with pytest.raises(ValidationError, match="case_1 given to several studies"):
        Manifest.model_validate({"studies": [study, {**study, "source": "b.nii.gz"}]})
