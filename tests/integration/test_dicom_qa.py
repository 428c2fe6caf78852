"""Real scanner DICOM against references: dcm2niix's NIfTI (dcm_qa_nih, dcm_qa_enh), NRRD masks, a CT grid."""

from __future__ import annotations

import dataclasses
import gzip
import io
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.io.dicom_header import _pydicom_header, header_from_bytes
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest
from tests.shared_data import shared_data

# input series folder -> the dcm2niix reference made from it (Ref/<name>.nii)
NIH_REFS = {
    "20180918GE/mr_0004": "DCM2NIIX_regression_test_4", "20180918GE/mr_0005": "DCM2NIIX_regression_test_5",
    "20180918GE/mr_0006": "DCM2NIIX_regression_test_6", "20180918GE/mr_0007": "DCM2NIIX_regression_test_7",
    "20180918Si/mr_0003": "EPI_PE=AP_3", "20180918Si/mr_0004": "EPI_PE=PA_4",
    "20180918Si/mr_0005": "EPI_PE=RL_5", "20180918Si/mr_0006": "EPI_PE=LR_6",
}
ENH_REFS = {"XA10": "Siemens_REST1_w_SMS_PF7-8_6"}


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asanyarray(image.dataobj), image.affine


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return _canonical(image.get_fdata(dtype=np.float64), image.affine)  # scl_slope/inter applied, if any


def _ingested(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, object]]:
    result = {}
    for study in load_manifest(out).studies:
        assert study.status == "ok", (study.source, study.error)
        image = nib.load(str(out / study.image))
        result[study.source] = (*_canonical(np.asanyarray(image.dataobj), image.affine), study)
    return result


def _assert_matches(ours: tuple, reference: tuple, name: str) -> None:
    (data, affine, _), (ref_data, ref_affine) = ours, reference
    assert data.shape == ref_data.shape, name
    np.testing.assert_allclose(affine, ref_affine, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(data.astype(np.float64), ref_data, err_msg=name)


def test_dcm_qa_nih_matches_dcm2niix(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "dcm_qa_nih")
    # This public test set is already de-identified; its folder names carry acquisition dates
    # (e.g. 20180918GE), which PHI scrubbing would otherwise replace by tokens.
    config = PipelineConfig.model_validate({"ingest": {"scrub_phi": False}})
    record = ingest(root / "In", tmp_path / "out", config=config)
    assert record["counts"] == {"ok": 8, "failed": 0, "skipped": 0}
    studies = _ingested(tmp_path / "out")
    assert set(studies) == set(NIH_REFS)
    for source, name in NIH_REFS.items():
        _assert_matches(studies[source], _reference(root / "Ref" / f"{name}.nii"), source)
        assert "dicom_4d" in [p.code for p in studies[source][2].problems]  # 10 (GE) or 2 (mosaic) volumes


def test_dcm_qa_enh_siemens_matches_dcm2niix(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "dcm_qa_enh")
    ingest(root / "In" / "Siemens", tmp_path / "out")
    studies = _ingested(tmp_path / "out")
    assert set(studies) == set(ENH_REFS)
    for source, name in ENH_REFS.items():
        _assert_matches(studies[source], _reference(root / "Ref" / f"{name}.nii"), source)


def test_dcm_qa_enh_philips_matches_dcm2niix_with_philips_precise_scaling(tmp_path: Path) -> None:
    """One Philips enhanced file, a magnitude image and a B0 field map. dcm2niix writes Philips magnitude frames as
    Philips' floating-point values by default; with ``ingest.philips_scaling: precise`` ours equal them (float32
    against dcm2niix's int16 times its float32 slope: 1e-6). The field map is within 2e-5 of dcm2niix's: dcm2niix
    scales it by its Real World Value Mapping's slope, 0.2442, where its RescaleSlope is 0.24420024."""
    root = shared_data("dicom_qa", "dcm_qa_enh")
    config = PipelineConfig.model_validate({"ingest": {"philips_scaling": "precise", "scrub_phi": False}})
    ingest(root / "In" / "Philips", tmp_path / "out", config=config)
    studies = [(*_canonical(np.asanyarray(nib.load(str(tmp_path / "out" / s.image)).dataobj),
                            nib.load(str(tmp_path / "out" / s.image)).affine), s)
               for s in load_manifest(tmp_path / "out").studies]
    assert len(studies) == 2 and all("dicom_philips_precise" in [p.code for p in s.problems] for *_, s in studies)
    for name, rtol in (("Philips_WIP_B0_NS_801_e1", 1e-6), ("Philips_WIP_B0_NS_801_e2_fieldmaphz", 2e-5)):
        ref_data, ref_affine = _reference(root / "Ref" / f"{name}.nii")
        scale = float(np.abs(ref_data).max())
        close = [s for data, affine, s in studies if data.shape == ref_data.shape
                 and np.allclose(affine, ref_affine, atol=1e-3)
                 and np.allclose(data, ref_data, rtol=0, atol=rtol * scale)]
        assert len(close) == 1, name


def _dcm2niix() -> str | None:
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.is_file() else shutil.which("dcm2niix")


def test_totalsegmentator_ct_lands_on_the_segmentation_grid(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "totalsegmentator_ct")
    ingest(root / "example_ct_dicom", tmp_path / "out")
    ((data, affine, study),) = _ingested(tmp_path / "out").values()
    seg = nib.load(str(root / "example_seg_dicom.nii.gz"))
    seg_data, seg_affine = _canonical(np.asanyarray(seg.dataobj), seg.affine)
    assert data.shape == seg_data.shape == (512, 512, 20)
    np.testing.assert_allclose(affine, seg_affine, atol=1e-3)
    assert {"dicom_no_series_uid", "dicom_decoder"} <= {p.code for p in study.problems}  # blank UIDs, JPEG 2000
    assert data.min() == -1024 and 1000 < data.max() < 3100  # Hounsfield units after the -1024 intercept
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix not installed: values not compared")
    subprocess.run([exe, "-z", "n", "-f", "ct", "-o", str(tmp_path), str(root / "example_ct_dicom")], check=True,
                   capture_output=True)
    _assert_matches((data, affine, None), _reference(tmp_path / "ct.nii"), "example_ct_dicom")


def _nrrd_affine(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine from a NRRD header (space directions/origin; LPS or RAS space)."""
    fields = {}
    with open(path, "rb") as handle:
        for line in handle:
            text = line.decode("latin-1").strip()
            if not text:
                break
            if ":" in text and not text.startswith("#"):
                key, value = text.split(":", 1)
                fields[key.strip()] = value.strip().lstrip("=").strip()
    def vectors(s: str) -> list[list[float]]:
        return [[float(v) for v in part.strip("()").split(",")] for part in s.split()]

    directions = np.array(vectors(fields["space directions"])).T
    origin = np.array(vectors(fields["space origin"])[0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = directions, origin
    if fields["space"] in ("left-posterior-superior", "LPS"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return tuple(int(v) for v in fields["sizes"].split()), affine


def test_dcmqi_ct_3slice_matches_its_nrrd_masks(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "dcmqi_segmentations")
    ingest(root / "ct-3slice", tmp_path / "out")
    ((data, affine, _),) = _ingested(tmp_path / "out").values()
    for mask in ("liver_seg.nrrd", "spine_seg.nrrd", "heart_seg.nrrd"):
        shape, mask_affine = _nrrd_affine(root / mask)
        mask_data, mask_canonical = _canonical(np.zeros(shape, np.uint8), mask_affine)
        assert data.shape == mask_data.shape, mask
        np.testing.assert_allclose(affine, mask_canonical, atol=1e-3, err_msg=mask)


def _real_files() -> list[Path]:
    base = shared_data("dicom_qa")
    files = sorted((base / "dcm_qa_nih" / "In").rglob("*.dcm"))[::15]
    files += sorted((base / "dcm_qa_enh" / "In").rglob("*.dcm"))
    files += sorted((base / "totalsegmentator_ct" / "example_ct_dicom").iterdir())[:3]
    files += sorted((base / "dcmqi_segmentations").rglob("*.dcm"))
    files += sorted(shared_data("hippocampus_dicom").rglob("*.dcm"))[::20]
    return files


def test_fast_header_reader_agrees_with_pydicom_on_real_files() -> None:
    checked = 0
    for path in _real_files():
        data = path.read_bytes()
        fast, raw, _ = header_from_bytes(data, path=str(path), rel=path.name)
        slow, _ = _pydicom_header(io.BytesIO(data), path=str(path), rel=path.name, full=True)
        if fast is None or slow is None:
            assert fast is slow, path
            continue
        reset = {"pixel_offset": None, "pixel_length": None, "header_sha256": None}
        assert dataclasses.replace(fast, **reset) == slow, path
        checked += raw is not None
    assert checked > 30


def test_highdicom_objects_are_skipped_with_reasons_and_the_ct_converts_with_its_seg(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "highdicom_seg")
    record = ingest(root, tmp_path / "out")
    assert record["status"] == "complete"
    studies = load_manifest(tmp_path / "out").studies
    ok = [s for s in studies if s.status == "ok"]
    assert [s.modality for s in ok] == ["CT"]
    reasons = {s.problems[0].code for s in studies if s.status == "skipped"}
    assert reasons == {"dicom_segmentation", "dicom_non_image", "dicom_non_volume"}
    assert sum(1 for s in studies if s.status == "skipped" and s.problems[0].code == "dicom_segmentation") >= 10
    # the one SEG of the CT is its label; the others segment series that are not here or not volumes
    assert ok[0].label_source == "seg_image_ct_binary_single_frame.dcm" and ok[0].label is not None
    label = nib.load(str(tmp_path / "out" / ok[0].label))
    assert label.shape == nib.load(str(tmp_path / "out" / str(ok[0].image))).shape
    assert np.asanyarray(label.dataobj).any()


def _nrrd_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (gzip-encoded little-endian shorts, the first axis fastest) and RAS affine of a NRRD file."""
    shape, affine = _nrrd_affine(path)
    raw = path.read_bytes()
    data = np.frombuffer(gzip.decompress(raw[raw.index(b"\n\n") + 2:]), "<i2")
    return data.reshape(shape[::-1]).transpose(2, 1, 0), affine


@pytest.mark.parametrize("case", ["23x38x3", "24x38x3"])
def test_dcmqi_label_segs_land_on_their_series_as_their_nrrd_masks(tmp_path: Path, case: str) -> None:
    root = shared_data("dicom_qa", "dcmqi_segmentations", case)
    ingest(root, tmp_path / "out")
    labelled = [s for s in load_manifest(tmp_path / "out").studies if s.label is not None]
    assert [(s.source, s.label_source) for s in labelled] == [("image", "seg/label.seg")]
    label = nib.load(str(tmp_path / "out" / str(labelled[0].label)))
    ours, our_affine = _canonical(np.asanyarray(label.dataobj), label.affine)
    mask, mask_affine = _canonical(*_nrrd_volume(root / "nrrd" / "label.nrrd"))
    np.testing.assert_allclose(our_affine, mask_affine, atol=1e-3)
    assert ours.shape == mask.shape and np.array_equal(ours, mask) and ours.sum() > 300


def test_label_map_segs_sharing_a_series_uid_are_told_apart_and_land_as_their_nrrd_masks(tmp_path: Path) -> None:
    """dcmqi's two sparse LABELMAP SEGs of one series share a SeriesInstanceUID: each file is a segmentation of its
    own (two of the series, so neither without a choice), and the one ingest.seg_label_pattern picks lands on the
    series' voxels as dcmqi's NRRD has it (its PixelPaddingValue 5, slices the SEG leaves out, as background)."""
    root = shared_data("dicom_qa", "dcmqi_segmentations")
    scan = tmp_path / "scan"
    shutil.copytree(root / "24x38x3" / "image", scan / "image")
    for name in ("sparse-labelmap-noppv.dcm", "sparse-labelmap-ppv5.dcm"):
        shutil.copy(root / name, scan / name)
    ingest(scan, tmp_path / "neither")
    manifest = load_manifest(tmp_path / "neither")
    assert [s.label for s in manifest.studies if s.status == "ok"] == [None]
    assert sorted(s.problems[0].message.partition(";")[0] for s in manifest.studies if s.status == "skipped") == [
        "sparse-labelmap-noppv.dcm: a DICOM SEG object", "sparse-labelmap-ppv5.dcm: a DICOM SEG object"]
    for name, nrrd in (("sparse-labelmap-noppv.dcm", "sparse_labelmap_noppv_seg.nrrd"),
                       ("sparse-labelmap-ppv5.dcm", "sparse_labelmap_ppv5_seg.nrrd")):
        out = tmp_path / name
        ingest(scan, out, config=load_config(None, overrides=[f"ingest.seg_label_pattern={name}"]))
        manifest = load_manifest(out)
        (study,) = [s for s in manifest.studies if s.status == "ok"]
        assert study.label_source == name and manifest.labels == {"0": "background", "1": "Liver"}
        label = nib.load(str(out / str(study.label)))
        ours, our_affine = _canonical(np.asanyarray(label.dataobj), label.affine)
        mask, mask_affine = _canonical(*_nrrd_volume(root / nrrd))
        np.testing.assert_allclose(our_affine, mask_affine, atol=1e-3)
        assert ours.shape == mask.shape and np.array_equal(ours, np.where(mask == 5, 0, mask)) and ours.sum() > 500


def test_a_dicom_seg_becomes_its_series_label_as_dcmqi_s_nrrd_mask_has_it(tmp_path: Path) -> None:
    root = shared_data("dicom_qa", "dcmqi_segmentations")
    scan, out = tmp_path / "scan", tmp_path / "out"
    shutil.copytree(root / "ct-3slice", scan / "ct")  # a copy: links leaving the scan folder are not followed
    shutil.copy(root / "liver.dcm", scan / "liver.dcm")
    ingest(scan, out)
    manifest = load_manifest(out)
    (study,) = manifest.studies
    assert study.status == "ok" and study.label_source == "liver.dcm" and study.label is not None
    assert study.problems == []  # dcmqi wrote it, not medpipe
    assert manifest.labels == {"0": "background", "1": "Liver"}
    label = nib.load(str(out / study.label))
    ours, our_affine = _canonical(np.asanyarray(label.dataobj), label.affine)
    mask, mask_affine = _canonical(*_nrrd_volume(root / "liver_seg.nrrd"))
    assert ours.shape == mask.shape and set(np.unique(mask)) == {0, 1}
    np.testing.assert_allclose(our_affine, mask_affine, atol=1e-3)
    assert np.array_equal(ours, mask) and ours.sum() > 100_000
    assert ingest(scan, out, force=True)["reused_studies"] == 1
    # a second SEG of the series: which is its label is unknown, so neither; both accounted for
    shutil.copy(root / "partial_overlaps.dcm", scan / "overlaps.dcm")
    ingest(scan, out)
    studies = {s.status: s for s in load_manifest(out).studies}
    assert studies["ok"].label is None and load_manifest(out).labels is None
    skipped = [s for s in load_manifest(out).studies if s.status == "skipped"]
    assert len(skipped) == 2 and all("one of 2 segmentations of series ct" in s.problems[0].message for s in skipped)
    # the overlapping one alone: segments that overlap cannot make one label map; refused by the SEG's name
    (scan / "liver.dcm").unlink()
    ingest(scan, out)
    (failed,) = load_manifest(out).studies
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "dicom_seg_overlap"
    assert failed.error.message == "ct: overlaps.dcm: its segments overlap, so one label map cannot hold them; " \
        "split it into SEGs whose segments do not overlap"
