"""Benchmark: `medpipe ingest` of large NIfTI volumes against a bare nibabel copy (median wall, peak memory).

    .venv/bin/python benchmarks/ingest_nifti.py                       # a generated 512 x 512 x 300 CT
    .venv/bin/python benchmarks/ingest_nifti.py --shape 256 256 200 --repeats 7
    .venv/bin/python benchmarks/ingest_nifti.py --folder SCANS        # your own .nii.gz files
    .venv/bin/python benchmarks/ingest_nifti.py --fmri 200 --workers 2  # a generated 64 x 64 x 36 x 200 fMRI run, split

The baseline, run interleaved with medpipe in the same run, is what a script would do by hand:
``nib.load`` each file, read its voxels and ``nib.save`` them to a new ``.nii.gz`` (nibabel's
zlib, level 1), with no checks. ``medpipe ingest --workers 1`` does more: it checks the gzip
CRC-32 and length, validates the geometry, writes atomically with a deterministic header,
and takes the checksums of the inputs and outputs for the manifest. Both run as fresh
processes, so both pay their imports. The generated volume is CT-like (smooth structures plus
noise, int16), so it compresses about as well as a real CT.

``--fmri VOLUMES`` times ``ingest.split_4d`` instead: a generated 4D run (a smooth head-sized blob
plus noise, int16, 3 x 3 x 3.5 mm, TR 2 s) split into a study per volume, against a script that
loads the file once and ``nib.save``s each volume (``_NIBABEL_SPLIT``).
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
_NIBABEL_SPLIT = (
    "import sys\nfrom pathlib import Path\nimport nibabel as nib\nimport numpy as np\n"
    "src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
    "for path in sorted(src.glob('*.nii.gz')):\n"
    "    img = nib.load(str(path))\n"
    "    data = np.asanyarray(img.dataobj)\n"
    "    for t in range(data.shape[3]):\n"
    "        nib.save(nib.Nifti1Image(data[..., t], img.affine), str(dst / f'{path.name[:-7]}_t{t:04d}.nii.gz'))\n"
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


def make_fmri(folder: Path, volumes: int) -> Path:
    """A 64 x 64 x 36 x ``volumes`` int16 run (a blob plus noise; 3 x 3 x 3.5 mm, TR 2 s) as folder/bold.nii.gz."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 1.0, 64)
    blob = 1000 * np.exp(-8 * ((x[:, None, None] - 0.5) ** 2 + (x[None, :, None] - 0.5) ** 2)) * np.ones((1, 1, 36))
    data = np.stack([blob + rng.normal(0.0, 20.0, blob.shape) for _ in range(volumes)], axis=-1).astype(np.int16)
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    affine[:3, 3] = (-96.0, -96.0, -60.0)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    path = folder / "bold.nii.gz"
    nib.save(img, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a folder of .nii.gz files (default: one generated CT)")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="medpipe's ingest.workers (default 1)")
    parser.add_argument("--fmri", type=int, metavar="VOLUMES",
                        help="time ingest.split_4d on a generated 64 x 64 x 36 x VOLUMES fMRI run instead")
    args = parser.parse_args(argv)
    baseline, split = (_NIBABEL_SPLIT, ["--set", "ingest.split_4d=true"]) if args.fmri else (_NIBABEL_COPY, [])
    medpipe = [sys.executable, "-m", "pipeline"]
    with tempfile.TemporaryDirectory(prefix="medpipe_bench_nifti_") as tmp:
        scratch = Path(tmp)
        folder = args.folder
        if folder is None:
            folder = scratch / "scans"
            folder.mkdir()
            make_fmri(folder, args.fmri) if args.fmri else make_ct(folder, tuple(args.shape))
        files = sorted(folder.glob("*.nii.gz"))
        if not files:
            raise SystemExit(f"{folder}: no .nii.gz files")
        reference = "nibabel split" if args.fmri else "nibabel copy"
        runs: dict[str, list[dict]] = {reference: [], "medpipe ingest": []}
        for r in range(args.repeats):
            copy_out = scratch / f"copy_{r}"
            copy_out.mkdir()
            runs[reference].append(timed([sys.executable, "-c", baseline, str(folder), str(copy_out)]))
            runs["medpipe ingest"].append(timed([*medpipe, "ingest", str(folder), "--out", str(scratch / f"in_{r}"),
                                                    "--workers", str(args.workers), *split]))
        size = sum(p.stat().st_size for p in files)
    medians = {name: statistics.median(x["wall"] for x in results) for name, results in runs.items()}
    print(f"{len(files)} file(s), {size / 1e6:.1f} MB compressed, {args.repeats} repetitions, medians:")
    for name, results in runs.items():
        print(f"  {name:<15} {medians[name]:.3f} s   peak RSS {max(x['rss_kb'] for x in results) / 1024:.0f} MB")
    print(f"  ratio medpipe (--workers {args.workers}) / {reference}: "
          f"{medians['medpipe ingest'] / medians[reference]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
