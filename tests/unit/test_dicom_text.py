"""PHI values read without pydicom (pipeline.io.dicom_text) give exactly what reading with pydicom gives."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline import phi_values as phi
from pipeline.io.dicom_tags import FastParseError, NeedMoreData
from pipeline.io.dicom_text import text_elements
from tests.fixtures.bad_inputs import CANARY_NAME, write_canary_series
from tests.shared_data import shared_data


def _with_pydicom(path: Path) -> dict[str, bool]:
    found: dict[str, bool] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        phi._values(ds, found)
        phi._values(ds.file_meta, found)
    return found


def _rewrite(path: Path, edit: Callable[[Dataset], None], *, implicit: bool = False) -> Path:
    ds = pydicom.dcmread(str(path))
    edit(ds)
    out = path.with_name(path.stem + "_edited.dcm")
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(str(out), enforce_file_format=True)
    return out


def _nested(ds: Dataset) -> None:
    """A request sequence two levels deep, multi-valued IDs and a UTF-8 name."""
    inner = Dataset()
    inner.ReferringPhysicianName = "NESTED_DOCTOR^INNER"
    item = Dataset()
    item.RequestedProcedureDescription = "NESTED_PROCEDURE"
    item.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([item, Dataset()])  # an empty item too
    ds.OtherPatientIDs = ["CANARYONE", "CANARYTWO"]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"


def test_fast_values_equal_pydicoms_on_canaries_nested_items_and_utf8(tmp_path: Path) -> None:
    written = write_canary_series(tmp_path / "s", 1, "s", slices=1)
    plain = written.files[0]
    nested = _rewrite(plain, _nested)
    for path in (plain, nested):
        assert phi._fast_values(path) == _with_pydicom(path)
    values = phi._fast_values(nested)
    for expected in ("NESTED_DOCTOR", "NESTED_PROCEDURE", "CANARYONE", "CANARYTWO", "Müller", "Jörg",
                     "CANARY_PRIVATE_TEXT holding CANARY_NAME^ZZQ again"):  # LT: one value, backslashes or not
        assert expected in values, expected
    assert values["Müller"] is True and "CANARY VENDOR" not in values  # a private creator is not PHI


@pytest.mark.parametrize("case", ["implicit", "un_element", "iso2022", "bad_utf8"])
def test_files_the_walker_leaves_to_pydicom_give_the_same_values(tmp_path: Path, case: str) -> None:
    plain = write_canary_series(tmp_path / "s", 2, "s", slices=1).files[0]

    def edit(ds: Dataset) -> None:
        if case == "un_element":
            ds.add_new(0x00321032, "UN", b"UN_DOCTOR^HIDDEN")  # RequestingPhysician written without its VR
        elif case == "iso2022":
            ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        elif case == "bad_utf8":
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.add_new(0x00081030, "LO", b"CANARY_\xff_STUDY")

    path = _rewrite(plain, edit, implicit=case == "implicit")
    if case == "un_element":  # pydicom writes the dictionary's VR: rewrite the element header as UN
        data = path.read_bytes()
        written = b"\x32\x00\x32\x10PN\x10\x00"
        assert data.count(written) == 1
        path.write_bytes(data.replace(written, b"\x32\x00\x32\x10UN\x00\x00\x10\x00\x00\x00"))
    with pytest.raises((FastParseError, UnicodeDecodeError)):
        phi._fast_values(path)
    assert phi.phi_values(path) == _with_pydicom(path)
    assert CANARY_NAME in phi.phi_values(path)
    if case == "un_element":
        assert "UN_DOCTOR" in phi.phi_values(path)  # pydicom knows the VR: PN


def test_walker_asks_for_more_data_until_the_header_ends(tmp_path: Path) -> None:
    path = _rewrite(write_canary_series(tmp_path / "s", 3, "s", slices=1).files[0], _nested)
    data = path.read_bytes()
    whole = text_elements(data)
    end = max(i for i in range(len(data)) if data[i:i + 4] == b"\xe0\x7f\x10\x00")
    for cut in (200, 700, end // 2, end - 3):
        with pytest.raises(NeedMoreData):
            text_elements(data[:cut])
    assert text_elements(data[:end + 12]) == whole  # the pixel data itself is never needed


def test_phi_tags_are_the_dictionarys() -> None:
    from pydicom.datadict import keyword_for_tag

    assert {tag: keyword_for_tag(tag) for tag in phi.PHI_ATTRIBUTES} == phi.PHI_ATTRIBUTES


def test_dicom_ingest_reads_phi_without_importing_pydicom(tmp_path: Path) -> None:
    """Importing pydicom costs a command 0.2-0.3 s; native explicit-VR series never need it."""
    scan = tmp_path / "scan"
    write_canary_series(scan / "a", 4, "a", slices=3)
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from pipeline.stages.ingest import ingest\n"
            f"record = ingest(Path({str(scan)!r}), Path({str(tmp_path / 'out')!r}))\n"
            "assert record['status'] == 'complete', record\n"
            "print('pydicom' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert "CANARY" not in manifest.upper()


def test_fast_values_equal_pydicoms_on_the_shared_dicom() -> None:
    root = shared_data("dicom_qa")
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix in (".gz", ".nii", ".nrrd", ".json", ".txt", ".md", ".csv", ".png", ".zip", ".bval", ".bvec"):
            continue
        try:
            expected = _with_pydicom(path)
        except Exception:  # noqa: BLE001, S112 - not a DICOM file: nothing to compare
            continue
        try:
            found = phi._fast_values(path)
        except (FastParseError, UnicodeDecodeError):
            continue
        assert found == expected, path
        checked += 1
    assert checked > 600
