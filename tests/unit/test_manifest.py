"""Manifest models and pseudonymous ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ManifestError
from pipeline.fileio import sha256_file
from pipeline.manifest import Manifest, Study, load_manifest, pseudonym, save_manifest


def test_pseudonym_is_keyed_stable_and_opaque() -> None:
    source = "DOE^JOHN_1970/series_3"
    a = pseudonym(source, key="k1")
    assert a == pseudonym(source, key="k1")
    assert a != pseudonym(source, key="k2")
    assert a != pseudonym("other", key="k1")
    assert "DOE" not in a and "JOHN" not in a and "1970" not in a
    assert a.startswith("case_") and len(a) == len("case_") + 12


def test_manifest_round_trip_is_byte_stable(tmp_path: Path) -> None:
    m = Manifest(dataset="d", labels={"0": "bg", "1": "x"},
                 studies=[Study(id="case_1", source="a.nii.gz", format="nifti", status="ok",
                                image="images/case_1.nii.gz")])
    first = save_manifest(m, tmp_path / "a")
    second = save_manifest(load_manifest(first), tmp_path / "b")
    assert sha256_file(first) == sha256_file(second)
    assert load_manifest(tmp_path / "a").ok_studies()[0].id == "case_1"


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="run 'medpipe ingest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"studies": [{"id": 1}]}')
    with pytest.raises(ManifestError, match="not a valid medpipe manifest"):
        load_manifest(tmp_path)
