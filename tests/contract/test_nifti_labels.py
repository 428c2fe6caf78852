"""Bad-input contract, NIfTI and labels (cases 17-20): the gaps the unit tests leave, through the stage."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.io.nifti import load_nifti, save_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import load_manifest
from pipeline.stages.ingest import ingest


def _image(seed: int = 0, shape=(5, 6, 7)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None, *, sform_only: bool = False) -> Path:
    img = nib.Nifti1Image(data, None)
    img.set_sform(np.diag([1.2, 1.2, 2.0, 1.0]) if affine is None else affine, code=1)
    img.set_qform(None if sform_only else img.get_sform(), code=0 if sform_only else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _gzip_crc_broken(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    path.write_bytes(bytes(raw))


def _patched(path: Path, offset: int, value: np.ndarray) -> None:
    """Overwrite header bytes of a .nii.gz (nibabel refuses to write such headers itself)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset:offset + value.nbytes] = value.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _more_voxels_declared(path: Path) -> None:
    _patched(path, 42, np.array([60], "<i2"))  # dim[1]: 5 -> 60 voxels, the data left as it was


def _nan_spacing(path: Path) -> None:
    _patched(path, 296, np.array([0, np.nan, 0, 0], "<f4"))  # srow_y: the second axis has no length


CASES = {
    "zero_spacing.nii.gz": (lambda p: _write(p, _image(), np.diag([1.0, 0.0, 2.0, 1.0]), sform_only=True),
                            "nifti_bad_spacing"),
    "nan_spacing.nii.gz": (lambda p: _nan_spacing(_write(p, _image(), sform_only=True)), "nifti_bad_affine"),
    "bad_crc.nii.gz": (lambda p: _gzip_crc_broken(_write(p, _image())), "nifti_corrupt"),
    "short_data.nii.gz": (lambda p: _more_voxels_declared(_write(p, _image())), "nifti_corrupt"),
    "infinite.nii.gz": (lambda p: _write(p, np.where(_image() > 130, np.inf, _image())), "nifti_nonfinite"),
    "four_d.nii.gz": (lambda p: _write(p, np.stack([_image(), _image(1)], axis=-1)), "nifti_4d"),
}


def test_broken_nifti_files_fail_alone_with_their_code(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    for name, (make, _) in CASES.items():
        make(scan / name)
    _write(scan / "fine.nii.gz", _image(3))
    _write(scan / "singleton.nii.gz", _image(4)[..., np.newaxis])  # X*Y*Z*1: squeezed, not refused
    record = ingest(scan, tmp_path / "out")
    studies = {s.source: s for s in load_manifest(tmp_path / "out").studies}
    assert record["counts"] == {"ok": 2, "failed": len(CASES), "skipped": 0}
    for name, (_, code) in CASES.items():
        assert studies[name].error.code == code, (name, studies[name].error)
        assert studies[name].error.message.startswith(f"{name}:")
    assert studies["singleton.nii.gz"].shape == [5, 6, 7]


def test_background_only_label_is_kept_with_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "msd"
    image = Volume(_image(5, (8, 9, 10)), np.diag([1.0, 1.0, 1.5, 1.0]))
    save_nifti(image, root / "imagesTr" / "empty.nii.gz", dtype=np.float32)
    save_nifti(image.with_array(np.zeros((8, 9, 10), np.uint8)), root / "labelsTr" / "empty.nii.gz", dtype=np.uint8)
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "labels": {"0": "background", "1": "organ"},
        "training": [{"image": "./imagesTr/empty.nii.gz", "label": "./labelsTr/empty.nii.gz"}]}))
    record = ingest(root, tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    assert record["status"] == "complete" and study.status == "ok"
    assert [p.code for p in study.problems] == ["label_background_only"]
    assert "labelsTr/empty.nii.gz" in study.problems[0].message
    assert not load_nifti(tmp_path / "out" / study.label).array.any()


@pytest.mark.parametrize("labels", [{"0": "background", "1": "a"}, None])
def test_label_outside_the_declared_set_or_negative_fails(tmp_path: Path, labels) -> None:
    root = tmp_path / "msd"
    image = Volume(_image(6, (6, 6, 6)), np.eye(4))
    values = np.zeros((6, 6, 6), np.int16)
    values[2, 2, 2] = 3 if labels else -1
    save_nifti(image, root / "imagesTr" / "x.nii.gz", dtype=np.float32)
    save_nifti(image.with_array(values), root / "labelsTr" / "x.nii.gz", dtype=np.int16)
    (root / "dataset.json").write_text(json.dumps({"name": "t", "labels": labels, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    ingest(root, tmp_path / "out")
    (study,) = load_manifest(tmp_path / "out").studies
    assert study.error.code == "label_undeclared_values" and ("[3]" if labels else "[-1]") in study.error.message
