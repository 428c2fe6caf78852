"""Bad-input contract, files and parsing (cases 1-9): junk, truncation, mutations, sizes, decoder faults."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage

from pipeline.batch import run_batch
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import IngestError
from pipeline.io.nifti import load_nifti
from pipeline.isolation import FAULT_ENV, Isolation
from pipeline.manifest import Study, load_manifest
from pipeline.stages import ingest as ingest_module
from pipeline.stages.ingest import ingest
from tests.fixtures.bad_inputs import mutate, single_slice_copies, small_stored, write_deflate_bomb
from tests.fixtures.dicom_writer import write_series

REPO = Path(__file__).resolve().parents[2]


def _studies(out: Path) -> dict[str, Study]:
    return {s.source: s for s in load_manifest(out).studies}


def _config(*overrides: str) -> PipelineConfig:
    return load_config(None, overrides=list(overrides))


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(str(path))
    change(ds)
    ds.save_as(str(path), enforce_file_format=True)


# ---- case 2: junk needs SOPClassUID, Rows, Columns and PixelData to count as an image --------------


def test_junk_gzipped_dicom_dicomdir_and_near_empty_datasets_are_never_images(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    good = write_series(scan / "good", small_stored(1), series_tag="good")
    (scan / "good" / "IM0009.dcm.gz").write_bytes(gzip.compress(good.files[0].read_bytes()))
    shutil.copy(get_testdata_file("DICOMDIR"), scan / "good" / "DICOMDIR")
    near_empty = Dataset()  # what dcmread(force=True) makes of many non-DICOM files: a few tags, no image
    near_empty.SOPClassUID, near_empty.SeriesInstanceUID, near_empty.Modality = MRImageStorage, "1.2.3.4.5", "MR"
    near_empty.SOPInstanceUID = "1.2.3.4.6"
    near_empty.file_meta = FileMetaDataset()
    near_empty.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    near_empty.file_meta.MediaStorageSOPClassUID = MRImageStorage
    near_empty.file_meta.MediaStorageSOPInstanceUID = near_empty.SOPInstanceUID
    pydicom.dcmwrite(str(scan / "good" / "stub.dcm"), near_empty, enforce_file_format=True)
    record = ingest(scan, tmp_path / "out")
    studies = load_manifest(tmp_path / "out").studies
    assert record["ignored_files"] == 1  # the DICOMDIR: not a DICOM object of a series
    ok = [s for s in studies if s.status == "ok"]
    assert len(ok) == 1 and ok[0].shape == [6, 5, 4]
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / ok[0].image).array,
                                  good.expected_values.astype(np.float32))
    skipped = {s.problems[0].code: s for s in studies if s.status != "ok"}
    assert set(skipped) == {"dicom_no_pixel_data", "archive_not_unpacked"} and record["status"] == "complete"
    packed = skipped["archive_not_unpacked"]  # never read as an image, but said: it may hold scans
    assert packed.format == "unknown" and "a gzip file" in packed.problems[0].message
    assert re.fullmatch(r"good/phi-[0-9a-f]{8}", packed.source)  # its name withheld: nothing inside was read


@pytest.mark.parametrize("kind", ["zip", "tar", "gzip", "bzip2", "xz", "7z", "rar", "zstd"])
def test_archives_and_compressed_files_are_recorded_not_ignored(tmp_path: Path, kind: str) -> None:
    scan = tmp_path / "scan"
    good = write_series(scan / "good", small_stored(1), series_tag="good")
    slice_bytes = good.files[0].read_bytes()
    if kind == "zip":
        with zipfile.ZipFile(scan / "export.zip", "w") as archive:
            archive.writestr("IM0001.dcm", slice_bytes)
    elif kind == "tar":
        with tarfile.open(scan / "export.tar", "w") as archive:
            archive.add(good.files[0], arcname="IM0001.dcm")
    elif kind in ("gzip", "bzip2", "xz"):
        module = {"gzip": gzip, "bzip2": bz2, "xz": lzma}[kind]
        (scan / "export.bin").write_bytes(module.compress(slice_bytes))
    else:  # no compressor in the standard library: the format's signature, then bytes
        magic = {"7z": b"7z\xbc\xaf\x27\x1c", "rar": b"Rar!\x1a\x07\x01\x00", "zstd": b"\x28\xb5\x2f\xfd"}[kind]
        (scan / "export.bin").write_bytes(magic + bytes(range(256)) * 4)
    (scan / "notes.txt").write_text("exported by the scanner\n")  # junk: counted, as before
    record = ingest(scan, tmp_path / "out")
    studies = load_manifest(tmp_path / "out").studies
    (packed,) = [s for s in studies if s.status == "skipped"]
    assert packed.problems[0].code == "archive_not_unpacked" and f"a {kind} file" in packed.problems[0].message
    assert record["ignored_files"] == 1 and record["counts"] == {"ok": 1, "failed": 0, "skipped": 1}


def test_a_slice_compressed_beside_its_series_warns_the_series_it_may_miss_slices(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    write_series(scan / "kept", small_stored(1), series_tag="kept")
    cut = write_series(scan / "cut", small_stored(2), series_tag="cut")
    last = cut.files[-1]
    last.with_name(f"{last.name}.gz").write_bytes(gzip.compress(last.read_bytes()))
    last.unlink()
    with zipfile.ZipFile(scan / "export.zip", "w") as archive:  # beside no series: warns none
        archive.writestr("IM0001.dcm", b"")
    ingest(scan, tmp_path / "out")
    studies = _studies(tmp_path / "out")
    assert studies["cut"].status == "ok" and studies["kept"].status == "ok" and studies["kept"].problems == []
    (problem,) = studies["cut"].problems
    assert problem.code == "dicom_unreadable_neighbour" and "1 compressed file(s) or archive(s)" in problem.message
    assert sorted(s.problems[0].code for s in studies.values() if s.status == "skipped") == ["archive_not_unpacked"] * 2


# ---- case 3: truncated in the header and in the pixel data --------------------------------------


def test_truncated_files_fail_their_series_by_name_or_are_accounted_for(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    header_cut = write_series(scan / "header_cut", small_stored(2), series_tag="h")
    pixel_cut = write_series(scan / "pixel_cut", small_stored(3), series_tag="p")
    data = header_cut.files[3].read_bytes()
    header_cut.files[3].write_bytes(data[:data.index(b"\x28\x00\x30\x00")])  # cut before PixelSpacing
    data = pixel_cut.files[1].read_bytes()
    pixel_cut.files[1].write_bytes(data[:-7])
    record = ingest(scan, tmp_path / "out")
    studies = _studies(tmp_path / "out")
    failed = studies["pixel_cut"]
    assert failed.status == "failed" and failed.error.code == "dicom_pixel_length"
    assert "pixel_cut/IM0002.dcm" in failed.error.message and "truncated" in failed.error.message
    # the header-truncated file lost its PixelSpacing and pixels: set apart (never stacked) and reported
    partial = [s for s in load_manifest(tmp_path / "out").studies if s.source == "header_cut"]
    accounted = record["ignored_files"] + sum(1 for s in partial if s.status == "skipped")
    assert accounted >= 1 and any(s.status == "ok" and s.shape == [6, 5, 3] for s in partial)


# ---- case 4: corrupt lengths, invalid VRs, and random byte mutations (a seeded property test) ------


@pytest.mark.parametrize("corrupt", ["length", "vr"])
def test_corrupt_element_length_or_vr_fails_or_sets_the_file_apart(tmp_path: Path, corrupt: str) -> None:
    written = write_series(tmp_path / "scan" / "s", small_stored(4), series_tag="c")
    data = bytearray(written.files[2].read_bytes())
    at = data.index(b"\x28\x00\x30\x00DS")  # PixelSpacing
    if corrupt == "length":
        data[at + 6:at + 8] = (0xFFF0).to_bytes(2, "little")
    else:
        data[at + 4:at + 6] = b"Q?"
    written.files[2].write_bytes(bytes(data))
    record = ingest(tmp_path / "scan", tmp_path / "out")
    studies = load_manifest(tmp_path / "out").studies
    assert record["status"] in ("partial", "failed", "complete")
    for study in studies:
        assert study.status == "ok" or (study.error or study.problems[0]).code
    # the stack never silently includes a slice whose geometry could not be read
    assert all(s.shape != [6, 5, 4] for s in studies if s.status == "ok")


def test_a_header_reader_crash_on_one_file_fails_that_file_only(tmp_path: Path) -> None:
    """A file meta element cut inside its 4-byte length (found by the mutation test below) once made the
    fast header reader raise struct.error during discovery, ending the whole batch."""
    scan = tmp_path / "scan"
    write_series(scan / "good", small_stored(13), series_tag="good")
    (scan / "cut").mkdir()
    (scan / "cut" / "meta.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\x00\x00")
    record = ingest(scan, tmp_path / "out")
    studies = _studies(tmp_path / "out")
    assert studies["good"].status == "ok"
    # The fast reader now rejects the cut element itself; the file holds no image, so it is junk.
    cut = studies.get("cut/meta.dcm")
    if cut is None:
        assert record["status"] == "complete" and record["ignored_files"] == 1
    else:
        assert cut.status == "failed" and cut.error.code in ("dicom_reader_error", "dicom_unreadable")


@pytest.mark.timeout(240)
def test_random_byte_mutations_end_as_ok_failed_or_skipped_never_a_dead_batch(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    files, header_end = single_slice_copies(scan, 400, seed=5)
    rng = np.random.default_rng(20260101)
    for path in files:
        path.write_bytes(mutate(path.read_bytes(), rng, header_end=header_end)[0])
    config = _config("ingest.workers=2", "ingest.timeout_s=60")
    record = ingest(scan, tmp_path / "out", config=config)
    studies = load_manifest(tmp_path / "out").studies
    folders = {s.source.split("/")[0] for s in studies}
    assert len(folders) + record["ignored_files"] == len(files)  # every file is a study or counted as ignored
    assert len(studies) == len(record["studies"]) and record["status"] in ("complete", "partial", "failed")
    for study in studies:
        if study.status == "ok":
            assert np.prod(load_nifti(tmp_path / "out" / study.image).shape) == 16 * 12
        else:
            problem = study.error or study.problems[0]
            assert problem.code and problem.message
    states = {s.status for s in studies}
    assert {"ok", "failed"} <= states and record["ignored_files"] > 0  # the mutations did bite


# ---- case 6: RescaleSlope NaN -------------------------------------------------------------------


def test_nan_rescale_slope_is_refused(tmp_path: Path) -> None:
    written = write_series(tmp_path / "scan" / "s", small_stored(6), series_tag="nan")
    _edit(written.files[1], lambda ds: setattr(ds, "RescaleSlope", "NaN"))
    ingest(tmp_path / "scan", tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    assert study.error.code == "dicom_bad_rescale" and "s/IM0002.dcm" in study.error.message


# ---- case 7: declared size larger than the data; huge declared dimensions ------------------------


def test_more_pixel_data_than_declared_is_refused(tmp_path: Path) -> None:
    written = write_series(tmp_path / "scan" / "s", small_stored(7), series_tag="big")
    _edit(written.files[0], lambda ds: setattr(ds, "PixelData", ds.PixelData + bytes(64)))
    ingest(tmp_path / "scan", tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    assert study.error.code == "dicom_pixel_length"


def test_huge_declared_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    written = write_series(scan / "huge", small_stored(8, (6, 5, 2)), series_tag="huge")
    for path in written.files:
        _edit(path, lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)))
    write_series(scan / "fine", small_stored(9), series_tag="fine")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), str(scan / "claims.nii"))
    raw = bytearray((scan / "claims.nii").read_bytes())
    raw[40:56] = np.array([3, 4000, 4000, 4000, 1, 1, 1, 1], "<i2").tobytes()  # dim[]: 64e9 voxels declared
    (scan / "claims.nii").write_bytes(bytes(raw))
    record = ingest(scan, tmp_path / "out")
    studies = _studies(tmp_path / "out")
    assert studies["fine"].status == "ok" and record["status"] == "partial"
    for name in ("huge", "claims.nii"):
        assert studies[name].error.code == "too_large", name
        assert "ingest.max_voxels" in studies[name].error.message and name in studies[name].error.message


# ---- case 8: decoder crashes, resource exhaustion and a deflate bomb ------------------------------


@pytest.mark.parametrize(("fault", "code"), [
    ("segfault", "worker_crashed"), ("abort", "worker_crashed"), ("panic", "decoder_panic"),
    ("sigkill", "worker_crashed"), ("exit", "worker_died"), ("memory", "out_of_memory"), ("hang", "timeout")])
def test_a_crashing_decoder_fails_only_its_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str,
                                                code: str) -> None:
    scan = tmp_path / "scan"
    for name in ("alpha", "crash_here", "omega"):
        write_series(scan / name, small_stored(len(name)), series_tag=name)
    monkeypatch.setenv(FAULT_ENV, f"{fault}:crash_here")
    record = ingest(scan, tmp_path / "out", config=_config("ingest.timeout_s=3", "ingest.memory_limit_mb=2048"))
    studies = _studies(tmp_path / "out")
    assert studies["crash_here"].status == "failed" and studies["crash_here"].error.code == code
    assert studies["alpha"].status == studies["omega"].status == "ok"
    assert record["status"] == "partial"
    if code == "worker_crashed":
        signal = {"segfault": "SIGSEGV", "abort": "SIGABRT", "sigkill": "SIGKILL"}[fault]
        assert signal in studies["crash_here"].error.message
    if code == "out_of_memory":
        assert "ingest.memory_limit_mb" in studies["crash_here"].error.message


def _double(x: int) -> int:
    return 2 * x


def test_pool_replaces_dead_workers_so_pending_items_survive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlike ProcessPoolExecutor (BrokenProcessPool for every pending item), each crash costs one item."""
    monkeypatch.setenv(FAULT_ENV, "segfault:7")  # items 7 and 17 crash (their reprs hold "7")
    for method in ("fork", "forkserver"):
        outcomes = list(run_batch(list(range(20)), _double, key=str, workers=2,
                                  isolation=Isolation(start_method=method, timeout_s=30)))
        assert [o.key for o in outcomes if not o.ok] == ["7", "17"], method
        assert all(o.code == "worker_crashed" for o in outcomes if not o.ok)
        assert [o.result for o in outcomes if o.ok] == [2 * x for x in range(20) if x not in (7, 17)]


def test_workers_that_cannot_start_stop_the_batch_with_the_reason(tmp_path: Path) -> None:
    """A script without a main guard, run with spawn/forkserver: every worker dies while starting. That is
    no study's fault, so the batch stops with one clear error instead of failing every study."""
    script = tmp_path / "unguarded.py"
    script.write_text("from pipeline.batch import Isolation, run_batch\n"
                      "print(list(run_batch([1, 2], abs, key=str, isolation=Isolation(start_method='spawn'))))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "StageError" in done.stderr and "if __name__ == '__main__':" in done.stderr


def test_deflate_bomb_is_refused_without_being_inflated(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    write_deflate_bomb(scan / "bomb" / "IM0001.dcm", inflated_mib=3072)  # 3 GB from 3 MB
    legit = write_series(scan / "deflated", small_stored(10), series_tag="dfl")
    for path in legit.files:
        _edit(path, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = ingest(scan, tmp_path / "out", config=_config("ingest.memory_limit_mb=1024"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    studies = _studies(tmp_path / "out")
    bomb = studies["bomb/IM0001.dcm"]
    assert bomb.status == "failed" and bomb.error.code == "too_large" and "deflated" in bomb.error.message
    assert studies["deflated"].status == "ok" and record["status"] == "partial"
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / studies["deflated"].image).array,
                                  legit.expected_values.astype(np.float32))
    assert grown_mb < 512  # this process inflated at most the 256 MB screening limit, never the 3 GB


# ---- case 9: a file changed or deleted between reading its header and its pixels ------------------


@pytest.mark.parametrize("change", ["delete", "rewrite", "truncate", "nifti"])
def test_file_changed_after_discovery_fails_its_study_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             change: str) -> None:
    scan = tmp_path / "scan"
    victim = write_series(scan / "victim", small_stored(11), series_tag="victim")
    write_series(scan / "bystander", small_stored(12), series_tag="bystander")
    nifti = scan / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(nifti))
    real_discover = ingest_module.discover

    def discover_then_change(*args, **kwargs):
        found = real_discover(*args, **kwargs)
        target = victim.files[2]
        if change == "delete":
            target.unlink()
        elif change == "rewrite":
            _edit(target, lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]))
        elif change == "truncate":
            target.write_bytes(target.read_bytes()[:-20])
        else:
            nifti.unlink()
        return found

    monkeypatch.setattr(ingest_module, "discover", discover_then_change)
    ingest(scan, tmp_path / "out")
    studies = _studies(tmp_path / "out")
    assert studies["bystander"].status == "ok"
    name, code = {"delete": ("victim", "dicom_unreadable"), "rewrite": ("victim", "dicom_changed"),
                  "truncate": ("victim", "dicom_pixel_length"), "nifti": ("volume.nii.gz", "file_unreadable")}[change]
    error = studies[name].error
    assert studies[name].status == "failed" and error.code == code
    assert (name if change == "nifti" else "victim/IM0003.dcm") in error.message
    assert str(tmp_path) not in error.message  # relative to the scan folder, never an absolute path


def test_process_study_raises_for_a_vanished_nifti(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    files = ingest_module.list_scan_files(tmp_path)
    tasks, _, _ = ingest_module.discover(tmp_path, files, out_dir=tmp_path / "out",
                                         config=PipelineConfig().ingest, previous={})
    (tmp_path / "a.nii.gz").unlink()
    with pytest.raises(IngestError) as info:
        ingest_module.process_study(tasks[0])
    assert info.value.code == "file_unreadable" and str(info.value).startswith("a.nii.gz:")
