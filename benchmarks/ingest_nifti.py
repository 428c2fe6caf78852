"""Benchmark: `medpipe ingest` of large NIfTI volumes against a bare nibabel copy (median wall, peak memory).

    .venv/bin/python benchmarks/ingest_nifti.py                       # a generated 512 x 512 x 300 CT
    .venv/bin/python benchmarks/ingest_nifti.py --shape 256 256 200 --repeats 7
    .venv/bin/python benchmarks/ingest_nifti.py --folder SCANS        # your own .nii.gz files

The baseline, run interleaved with medpipe in the same run, is what a script would do by hand:
``nib.load`` each file, read its voxels and ``nib.save`` them to a new ``.nii.gz`` (nibabel's
zlib, level 1), with no checks. ``medpipe ingest --workers 1`` does more: it checks the gzip
CRC-32 and length, validates the geometry, writes atomically with a deterministic header,
and takes the checksums of the inputs and outputs for the manifest. Both run as fresh
processes, so both pay their imports. The generated volume is CT-like (smooth structures plus
noise, int16), so it compresses about as well as a real CT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from _timed import timed

_NIBABEL_COPY = (
    "import sys\nfrom pathlib import Path\nimport nibabel as nib\nimport numpy as np\n"
    "src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
    "for path in sorted(src.glob('*.nii.gz')):\n"
    "    img = nib.load(str(path))\n"
    "    data = np.asanyarray(img.dataobj)\n"
    "    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(dst / path.name))\n"
)


def ct_like(shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-like int16 volume: smooth structures plus noise (compresses about as well as a real CT)."""
    rng = np.random.default_rng(0)
    x, y, z = (np.linspace(0.0, 1.0, n) for n in shape)
    body = 1000 * np.sin(6 * x)[:, None, None] * np.cos(5 * y)[None, :, None] + 300 * z[None, None, :]
    return body.astype(np.int16) + rng.integers(-20, 20, size=shape, dtype=np.int16)


def make_ct(folder: Path, shape: tuple[int, int, int]) -> Path:
    """ct_like at 0.8 x 0.8 x 1.5 mm as folder/ct.nii.gz, qform = sform."""
    import nibabel as nib

    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    img = nib.Nifti1Image(ct_like(shape), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = folder / "ct.nii.gz"
    nib.save(img, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a folder of .nii.gz files (default: one generated CT)")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    medpipe = [sys.executable, "-m", "pipeline"]
    with tempfile.TemporaryDirectory(prefix="medpipe_bench_nifti_") as tmp:
        scratch = Path(tmp)
        folder = args.folder
        if folder is None:
            folder = scratch / "scans"
            folder.mkdir()
            make_ct(folder, tuple(args.shape))
        files = sorted(folder.glob("*.nii.gz"))
        if not files:
            raise SystemExit(f"{folder}: no .nii.gz files")
        runs: dict[str, list[dict]] = {"nibabel copy": [], "medpipe ingest": []}
        for r in range(args.repeats):
            copy_out = scratch / f"copy_{r}"
            copy_out.mkdir()
            runs["nibabel copy"].append(timed([sys.executable, "-c", _NIBABEL_COPY, str(folder), str(copy_out)]))
            runs["medpipe ingest"].append(timed([*medpipe, "ingest", str(folder), "--out", str(scratch / f"in_{r}"),
                                                    "--workers", "1"]))
        size = sum(p.stat().st_size for p in files)
    medians = {name: statistics.median(x["wall"] for x in results) for name, results in runs.items()}
    print(f"{len(files)} file(s), {size / 1e6:.1f} MB compressed, {args.repeats} repetitions, medians:")
    for name, results in runs.items():
        print(f"  {name:<15} {medians[name]:.3f} s   peak RSS {max(x['rss_kb'] for x in results) / 1024:.0f} MB")
    print(f"  ratio medpipe / nibabel copy: {medians['medpipe ingest'] / medians['nibabel copy']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
