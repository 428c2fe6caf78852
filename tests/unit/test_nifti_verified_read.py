"""Reading outside NIfTI files with one checked inflate (ISA-L) and in the file's own voxel order."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import IngestError
from pipeline.io.nifti import inflate_checked, load_nifti, save_nifti
from pipeline.io.volume import Volume


def _image(shape: tuple[int, ...] = (6, 7, 8), *, slope: float | None = None) -> nib.Nifti1Image:
    data = np.random.default_rng(3).integers(-500, 1500, size=shape).astype(np.int16)
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment that moves vox_offset"))
    if slope is not None:
        img.header.set_slope_inter(slope, -3.0)
    return img


def _members(raw: bytes, cut: int) -> bytes:
    """``raw`` as two gzip members (as bgzip and concatenated streams write)."""
    return gzip.compress(raw[:cut], mtime=0) + gzip.compress(raw[cut:], mtime=0)


@pytest.mark.parametrize("slope", [None, 2.0])
def test_verified_read_equals_nibabels_in_the_files_order(tmp_path: Path, slope: float | None) -> None:
    path = tmp_path / "a.nii.gz"
    nib.save(_image(slope=slope), str(path))
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    kept = load_nifti(path, verify_gzip=True, order="K")
    np.testing.assert_array_equal(kept.array, expected)
    assert kept.array.flags.f_contiguous and kept.array.flags.writeable
    assert kept.meta["source_dtype"] == "int16"
    np.testing.assert_allclose(kept.affine, np.diag([0.8, 0.9, 1.5, 1.0]), atol=1e-6)
    default = load_nifti(path)
    np.testing.assert_array_equal(default.array, expected)
    assert default.array.flags.c_contiguous


def test_every_gzip_member_is_inflated_and_checked(tmp_path: Path) -> None:
    raw = _image().to_bytes()
    path = tmp_path / "two.nii.gz"
    path.write_bytes(_members(raw, 500))
    np.testing.assert_array_equal(load_nifti(path, verify_gzip=True).array, np.asanyarray(_image().dataobj))
    broken = bytearray(path.read_bytes())
    broken[-6] ^= 0xFF  # the second (last) member's CRC-32
    path.write_bytes(bytes(broken))
    with pytest.raises(IngestError, match="two.nii.gz: corrupt gzip stream") as caught:
        load_nifti(path, verify_gzip=True)
    assert caught.value.code == "nifti_corrupt"


def test_only_the_bytes_asked_for_are_kept_but_all_are_checked(tmp_path: Path) -> None:
    raw = bytes(range(256)) * 12_000  # 3 MB: several read blocks
    path = tmp_path / "blob.gz"
    path.write_bytes(_members(raw, 1_000_000))
    assert inflate_checked(path, keep=100) == raw[:100]
    assert inflate_checked(path, keep=10**8) == raw
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # the length field of the last member, far past the kept bytes
    path.write_bytes(bytes(data))
    with pytest.raises(IngestError, match="corrupt gzip stream"):
        inflate_checked(path, keep=100)
    path.write_bytes(gzip.compress(raw, mtime=0)[:-4000])
    with pytest.raises(IngestError, match="ends early"):
        inflate_checked(path, keep=100)


def test_voxels_past_the_end_of_the_inflated_data_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(_image().to_bytes()[:-50], mtime=0))  # a valid stream, too few voxels
    with pytest.raises(IngestError, match="short.nii.gz") as caught:
        load_nifti(path, verify_gzip=True, order="K")
    assert caught.value.code == "nifti_corrupt"


def test_an_uncompressed_file_kept_in_its_order_is_a_private_copy(tmp_path: Path) -> None:
    path = tmp_path / "plain.nii"
    nib.save(_image(), str(path))
    volume = load_nifti(path, order="K")
    assert not isinstance(volume.array, np.memmap) and volume.array.flags.writeable
    before = volume.array.copy()
    path.write_bytes(b"\0" * path.stat().st_size)  # the file changes after reading: the volume does not
    np.testing.assert_array_equal(volume.array, before)


def test_fortran_and_c_ordered_volumes_write_identical_files(tmp_path: Path) -> None:
    data = np.asanyarray(_image((9, 10, 11)).dataobj)
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    c_file = save_nifti(Volume(np.ascontiguousarray(data), affine), tmp_path / "c.nii.gz")
    f_file = save_nifti(Volume(np.asfortranarray(data), affine), tmp_path / "f.nii.gz")
    assert c_file.read_bytes() == f_file.read_bytes()
