"""Benchmark: `medpipe ingest` against dcm2niix on the same DICOM folders (median wall times, peak memory).

    .venv/bin/python benchmarks/ingest.py                      # ../shared/data/dicom_qa/dcm_qa_nih/In
    .venv/bin/python benchmarks/ingest.py FOLDER ... --repeats 7 --workers 2
    .venv/bin/python benchmarks/ingest.py --synthetic-ct 300 --repeats 3   # a generated 512 x 512 x 300 CT
    .venv/bin/python benchmarks/ingest.py --synthetic-patients 300 --repeats 3   # 24,000 small files, 600 series
    .venv/bin/python benchmarks/ingest.py --synthetic-enhanced 100 --repeats 3 [--split-4d]
        # one enhanced MR file of 64 x 64 x 36 x 100 frames (with --split-4d, medpipe writes 100 studies)

Each repetition runs, interleaved so that they share the machine's load: dcm2niix writing
uncompressed .nii (``-z n``, its default), dcm2niix writing .nii.gz (``-z y``, like medpipe,
which always writes .nii.gz) and ``medpipe ingest --workers N`` into a fresh output folder (no
reuse). Every command runs under a small wrapper that times only the command and reads the
peak resident memory of its largest process (``RUSAGE_CHILDREN``: medpipe's main process or
one of its workers). The memory check ingests the folder's largest study alone and the whole
folder: equal peaks mean memory is bounded by one study, not by the folder.

Bytecode: before timing, medpipe's own modules are compiled to ``__pycache__`` (``compileall``),
which is what a wheel install (``pip install .``) leaves and what an editable install writes on
its first run. Where ``PYTHONDONTWRITEBYTECODE`` is set (as on this project's VMs), an editable
install never caches them and every command compiles about 100 modules again (0.04-0.06 s here);
``--cold-bytecode`` leaves the cache as it is, to measure that case.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timed import timed

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / "shared" / "data" / "dicom_qa" / "dcm_qa_nih" / "In"


def _measure(command: list[str]) -> dict:
    """``command`` timed (see _timed.py): {'rc', 'wall' (s), 'rss_kb' (largest process peak), 'stderr'}."""
    return timed(command, ok=(0, 3))  # 3: partial (some studies failed), still a full run


def _medpipe() -> list[str]:
    script = Path(sys.executable).parent / "medpipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline"]


def _dcm2niix(explicit: str | None) -> str:
    found = explicit or (str(Path(sys.executable).parent / "dcm2niix") if (Path(sys.executable).parent /
                                                                            "dcm2niix").is_file() else None)
    found = found or shutil.which("dcm2niix")
    if not found:
        raise SystemExit("dcm2niix not found: pip install dcm2niix (or apt-get install dcm2niix), or pass --dcm2niix")
    return found


def _bytecode(*, precompile: bool) -> str:
    """Compile medpipe's modules to bytecode (unless told not to); a line saying which case is timed."""
    spec = importlib.util.find_spec("pipeline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("medpipe is not installed in this Python: pip install -e . first")
    package = Path(next(iter(spec.submodule_search_locations)))
    env = "PYTHONDONTWRITEBYTECODE is set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "bytecode writes allowed"
    if not precompile:
        cached = sum(1 for _ in package.rglob("__pycache__/*.pyc"))
        return f"bytecode: left as found ({cached} cached .pyc files; {env})"
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"compiling {package} failed")
    return f"bytecode: medpipe's modules precompiled, as a wheel install leaves them ({env})"


def _largest_study(folder: Path) -> Path:
    """The sub-folder holding the most bytes directly (a proxy for the largest series)."""
    sizes: dict[Path, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            sizes[path.parent] = sizes.get(path.parent, 0) + path.stat().st_size
    return max(sizes, key=lambda p: (sizes[p], str(p)))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_folder(folder: Path, *, repeats: int, workers: int, dcm2niix: str, scratch: Path,
                 settings: tuple[str, ...] = ()) -> dict:
    runs: dict[str, list[dict]] = {"dcm2niix -z n": [], "dcm2niix -z y": [], "medpipe": []}
    for r in range(repeats):
        for name, compress in (("dcm2niix -z n", "n"), ("dcm2niix -z y", "y")):
            out = scratch / f"d2n_{compress}_{r}"
            out.mkdir()
            runs[name].append(_measure([dcm2niix, "-z", compress, "-o", str(out), str(folder)]))
        out = scratch / f"medpipe_{r}"
        runs["medpipe"].append(_measure([*_medpipe(), "ingest", str(folder), "--out", str(out),
                                         "--workers", str(workers), *settings]))
    # os._exit, as medpipe's entry point ends: a normal exit tears down every module (0.05-0.2 s here)
    imports = [_measure([sys.executable, "-c", "import os, pipeline.cli, pipeline.stages.ingest; os._exit(0)"])["wall"]
               for _ in range(repeats)]
    medians = {name: statistics.median(x["wall"] for x in results) for name, results in runs.items()}
    return {
        "folder": str(folder), "bytes": _folder_bytes(folder), "repeats": repeats, "workers": workers,
        "median_s": medians, "import_floor_s": statistics.median(imports),
        "ratio_vs_gz": medians["medpipe"] / medians["dcm2niix -z y"],
        "ratio_vs_nii": medians["medpipe"] / medians["dcm2niix -z n"],
        "medpipe_peak_rss_mb": max(x["rss_kb"] for x in runs["medpipe"]) / 1024,
        "dcm2niix_peak_rss_mb": max(x["rss_kb"] for x in runs["dcm2niix -z y"]) / 1024,
    }


def memory_check(folder: Path, *, workers: int, scratch: Path) -> dict:
    one = _largest_study(folder)
    alone = _measure([*_medpipe(), "ingest", str(one), "--out", str(scratch / "mem_one"), "--workers", str(workers)])
    whole = _measure([*_medpipe(), "ingest", str(folder), "--out", str(scratch / "mem_all"), "--workers",
                      str(workers)])
    return {"largest_study": str(one.relative_to(folder)), "study_bytes": _folder_bytes(one),
            "folder_bytes": _folder_bytes(folder), "peak_rss_study_mb": alone["rss_kb"] / 1024,
            "peak_rss_folder_mb": whole["rss_kb"] / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help=f"DICOM folders (default: {DEFAULT})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dcm2niix", help="path of the dcm2niix binary (default: next to python, then PATH)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--synthetic-ct", type=int, metavar="SLICES",
                        help="also time a generated 512 x 512 x SLICES CT series (int16, one file per slice)")
    parser.add_argument("--synthetic-patients", type=int, metavar="N",
                        help="also time a generated folder of N patients, each with two 32 x 32 x 40 MR series in a "
                             "folder named after the patient (a PACS export: many small files, thousands of PHI "
                             "values; 300 patients are 24,000 files)")
    parser.add_argument("--synthetic-enhanced", type=int, metavar="VOLUMES",
                        help="also time a generated enhanced MR file of 64 x 64 x 36 x VOLUMES frames (one file, "
                             "per-frame functional groups, as Philips and Siemens XA export fMRI)")
    parser.add_argument("--split-4d", action="store_true",
                        help="run medpipe with ingest.split_4d=true (a study per volume; dcm2niix writes one 4D file)")
    parser.add_argument("--cold-bytecode", action="store_true",
                        help="do not precompile medpipe's modules (with PYTHONDONTWRITEBYTECODE set, every command "
                             "then compiles them again)")
    args = parser.parse_args(argv)
    exe = _dcm2niix(args.dcm2niix)
    bytecode = _bytecode(precompile=not args.cold_bytecode)
    version = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False).stdout.strip().splitlines()
    print(f"dcm2niix: {exe} ({version[-1] if version else '?'}); medpipe: {' '.join(_medpipe())}; "
          f"cpus: {os.cpu_count()}")
    print(bytecode)
    results = []
    with tempfile.TemporaryDirectory(prefix="medpipe_bench_ct_") as generated:
        generate = args.synthetic_ct or args.synthetic_patients or args.synthetic_enhanced
        folders = list(args.folders) or ([] if generate else [DEFAULT])
        if args.synthetic_ct:
            folders.append(_synthetic_ct(Path(generated) / "ct", args.synthetic_ct))
        if args.synthetic_patients:
            folders.append(_synthetic_patients(Path(generated) / "patients", args.synthetic_patients))
        if args.synthetic_enhanced:
            folders.append(_synthetic_enhanced(Path(generated) / "enhanced", args.synthetic_enhanced))
        results = _run(folders, args=args, exe=exe, bytecode=bytecode)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _synthetic_ct(root: Path, slices: int) -> Path:
    """A 512 x 512 x ``slices`` CT series written with pydicom (the tests' series writer)."""
    sys.path.insert(0, str(REPO))
    from ingest_nifti import ct_like

    from tests.fixtures.dicom_writer import write_series

    write_series(root, ct_like((512, 512, slices)), modality="CT", pixel_spacing=(0.8, 0.8), step=1.5,
                 intercept=-1024.0)
    return root


def _synthetic_enhanced(root: Path, volumes: int) -> Path:
    """One enhanced MR file of 64 x 64 x 36 x ``volumes`` int16 frames (the tests' writer), frames in order."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from tests.fixtures.dicom_kinds import write_enhanced

    stored = np.random.default_rng(0).integers(0, 1000, size=(64, 64, 36, volumes)).astype(np.int16)
    write_enhanced(root / "bold.dcm", stored, shuffle_seed=None)
    return root


def _synthetic_patients(root: Path, patients: int) -> Path:
    """``patients`` folders ``LAST_FIRST_ID``, each with two 32 x 32 x 40 MR series whose headers carry that
    patient's (made-up) name, ID, birth date and accession number; the same every time."""
    import random
    import string

    import numpy as np

    sys.path.insert(0, str(REPO))
    from tests.fixtures.dicom_writer import write_series

    rng = random.Random(0)

    def word(low: int, high: int) -> str:
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(low, high)))

    stored = (np.arange(32 * 32 * 40) % 1000).astype(np.int16).reshape(32, 32, 40)
    for index in range(patients):
        last, first, pid = word(4, 9), word(3, 7), str(rng.randint(10 ** 6, 10 ** 7))
        birth = f"19{rng.randint(30, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        physician = f"{word(6, 6)}^{word(4, 4)}"

        def edit(ds: object, _: int, last: str = last, first: str = first, pid: str = pid, birth: str = birth,
                 physician: str = physician, index: int = index) -> None:
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{last}^{first}", pid, birth  # type: ignore[attr-defined]
            ds.AccessionNumber, ds.ReferringPhysicianName = f"ACC{index:05d}{pid[-3:]}", physician  # type: ignore[attr-defined]

        for series in range(2):
            write_series(root / f"{last}_{first}_{pid}" / f"series{series}", stored, series_tag=f"p{index}s{series}",
                         name_pattern="IM{index:05d}.dcm", edit=edit)
    return root


def _run(folders: list[Path], *, args: argparse.Namespace, exe: str, bytecode: str) -> list[dict]:
    results = []
    for folder in folders:
        with tempfile.TemporaryDirectory(prefix="medpipe_bench_") as tmp:
            settings = ("--set", "ingest.split_4d=true") if args.split_4d else ()
            result = bench_folder(folder, repeats=args.repeats, workers=args.workers, dcm2niix=exe,
                                  scratch=Path(tmp), settings=settings)
            result["memory"] = memory_check(folder, workers=args.workers, scratch=Path(tmp))
        result["bytecode"] = bytecode
        results.append(result)
        m, mem = result["median_s"], result["memory"]
        print(f"\n{folder} ({result['bytes'] / 1e6:.1f} MB, {args.repeats} repetitions, medians)")
        print(f"  dcm2niix -z n (.nii)     {m['dcm2niix -z n']:.3f} s")
        print(f"  dcm2niix -z y (.nii.gz)  {m['dcm2niix -z y']:.3f} s   peak RSS "
              f"{result['dcm2niix_peak_rss_mb']:.0f} MB")
        split = " split_4d" if args.split_4d else ""
        print(f"  medpipe ingest -w {args.workers}{split}     {m['medpipe']:.3f} s   peak RSS "
              f"{result['medpipe_peak_rss_mb']:.0f} MB (largest process)")
        print(f"  python + imports alone   {result['import_floor_s']:.3f} s")
        print(f"  ratio medpipe / dcm2niix: {result['ratio_vs_gz']:.2f}x (both .nii.gz), "
              f"{result['ratio_vs_nii']:.2f}x (dcm2niix .nii)")
        print(f"  memory: largest study {mem['largest_study']} ({mem['study_bytes'] / 1e6:.1f} MB) alone "
              f"{mem['peak_rss_study_mb']:.0f} MB, whole folder ({mem['folder_bytes'] / 1e6:.1f} MB) "
              f"{mem['peak_rss_folder_mb']:.0f} MB")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
