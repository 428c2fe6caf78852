"""The Volume type and NIfTI reading/writing with validation."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import GeometryError, IngestError
from pipeline.fileio import sha256_file
from pipeline.io.nifti import load_nifti, nifti_stem, save_nifti
from pipeline.io.volume import Volume, shear_magnitude


def _affine(spacing=(0.8, 1.0, 1.5), flip_x: bool = False) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    if flip_x:
        a[0, 0] = -a[0, 0]
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def test_volume_geometry_properties() -> None:
    v = Volume(np.zeros((4, 5, 6), np.float32), _affine(flip_x=True))
    assert v.spacing == pytest.approx((0.8, 1.0, 1.5))
    assert v.orientation == "LAS"
    assert v.spatial_shape == (4, 5, 6)
    assert v.same_grid(Volume(np.ones((4, 5, 6)), _affine(flip_x=True)))
    assert not v.same_grid(Volume(np.ones((4, 5, 6)), _affine()))


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.full((4, 4), np.nan), np.eye(3)])
def test_volume_rejects_bad_affines(bad: np.ndarray) -> None:
    with pytest.raises(GeometryError):
        Volume(np.zeros((2, 2, 2)), bad)


def test_shear_magnitude() -> None:
    a = np.eye(4)
    assert shear_magnitude(a) == 0
    a[0, 1] = 0.2
    assert shear_magnitude(a) > 0.1


def test_save_load_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = Volume(rng.normal(size=(5, 6, 7)).astype(np.float32), _affine(flip_x=True))
    a = save_nifti(v, tmp_path / "a.nii.gz")
    b = save_nifti(v, tmp_path / "b.nii.gz")
    assert sha256_file(a) == sha256_file(b)
    back = load_nifti(a)
    np.testing.assert_array_equal(back.array, v.array)
    np.testing.assert_allclose(back.affine, v.affine, atol=1e-5)
    hdr = nib.load(str(a)).header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_gzip_output_holds_exactly_nibabels_bytes(tmp_path: Path, dtype: type) -> None:
    """save_nifti compresses with ISA-L (python-isal), not nibabel's zlib writer: the .nii.gz must inflate, with
    Python's own gzip module, to the very bytes nibabel writes uncompressed, carry no time stamp or file name in
    its gzip header (so reruns are byte-identical), and be about as small as zlib's level 1."""
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(40, 30, 20)) * 100).astype(dtype)
    array[:10] = 0  # compressible, like background
    v = Volume(array, _affine())
    gz = save_nifti(v, tmp_path / "v.nii.gz", dtype=dtype)
    plain = save_nifti(v, tmp_path / "v.nii", dtype=dtype)
    packed = gz.read_bytes()
    assert gzip.decompress(packed) == plain.read_bytes()
    assert packed[:4] == b"\x1f\x8b\x08\x00"  # deflate, no flags: no FNAME, FEXTRA or FCOMMENT
    assert packed[4:8] == b"\0\0\0\0"  # MTIME 0
    reference = tmp_path / "nibabel.nii.gz"
    nib.save(nib.load(str(plain)), str(reference))  # nibabel's own writer: zlib level 1
    assert len(packed) <= 1.05 * reference.stat().st_size
    np.testing.assert_array_equal(load_nifti(gz).array, array)
    assert save_nifti(v, tmp_path / "again.nii.gz", dtype=dtype).read_bytes() == packed


def _write_raw(path: Path, img: nib.Nifti1Image) -> Path:
    nib.save(img, str(path))
    return path


def test_qform_sform_disagreement_is_refused(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), _affine())
    img.set_qform(_affine(), code=1)
    img.set_sform(_affine(spacing=(2, 2, 2)), code=1)
    with pytest.raises(GeometryError, match="qform and sform disagree"):
        load_nifti(_write_raw(tmp_path / "x.nii.gz", img))


def test_no_orientation_codes_is_refused(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), _affine())
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    with pytest.raises(GeometryError, match="both qform_code and sform_code are 0"):
        load_nifti(_write_raw(tmp_path / "x.nii", img))


def test_shear_is_refused(tmp_path: Path) -> None:
    a = _affine()
    a[0, 2] = 0.5
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), None)
    img.set_sform(a, code=1)
    img.set_qform(None, code=0)
    with pytest.raises(GeometryError, match="sheared"):
        load_nifti(_write_raw(tmp_path / "x.nii.gz", img))


def test_nan_voxels_and_4d(tmp_path: Path) -> None:
    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(IngestError, match="1 NaN or infinite voxels"):
        load_nifti(_write_raw(tmp_path / "n.nii.gz", nib.Nifti1Image(data, _affine())))
    four = nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), _affine())
    with pytest.raises(IngestError, match="4D image"):
        load_nifti(_write_raw(tmp_path / "f.nii.gz", four))
    single = nib.Nifti1Image(np.ones((3, 3, 3, 1), np.float32), _affine())
    assert load_nifti(_write_raw(tmp_path / "s.nii.gz", single)).shape == (3, 3, 3)


def test_truncated_files_name_the_problem(tmp_path: Path) -> None:
    good = save_nifti(Volume(np.arange(4000, dtype=np.float32).reshape(10, 20, 20), _affine()), tmp_path / "g.nii.gz")
    raw = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IngestError, match="cut.nii.gz") as info:
        load_nifti(cut)
    assert info.value.code == "nifti_corrupt"
    plain = tmp_path / "short.nii"
    plain.write_bytes(gzip.decompress(raw)[:1000])
    with pytest.raises(IngestError, match="short.nii"):
        load_nifti(plain)


def test_nifti_stem() -> None:
    assert nifti_stem(Path("a/b/case_1.nii.gz")) == "case_1"
    assert nifti_stem(Path("x.NII")) == "x"


def test_ingest_imports_no_pydicom_and_dicom_extensions_stay_opaque(tmp_path: Path) -> None:
    """pipeline.io imports nibabel without pydicom (0.15-0.4 s a command): ingesting NIfTI studies beside a
    README (which discovery refuses as DICOM without asking pydicom) never imports it. A NIfTI file carrying
    a DICOM header extension (code 2) still loads, its extension kept as bytes."""
    import subprocess
    import sys

    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "README.txt").write_text("exported by the scanner\n")
    path = scan / "ext.nii.gz"
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), _affine())
    img.header.extensions.append(nib.nifti1.Nifti1Extension(2, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"))
    nib.save(img, str(path))
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from pipeline.stages.ingest import ingest\n"
            f"record = ingest(Path({str(scan)!r}), Path({str(tmp_path / 'out')!r}))\n"
            "assert record['status'] == 'complete', record\n"
            "from pipeline.io.nifti import load_nifti\n"
            f"v = load_nifti({str(path)!r})\n"
            "import nibabel\n"
            "ext = nibabel.load(" + repr(str(path)) + ").header.extensions[0]\n"
            "print('pydicom' in sys.modules, int(v.array.sum()), type(ext).__name__, ext.get_code())\n"
            "import pydicom\n"  # and pydicom still imports normally afterwards
            "print(pydicom.Dataset.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", str(sum(range(24))), "Nifti1Extension", "2", "Dataset"]
