"""Benchmark: ingest plus inference over generated studies with 1 and 2 local workers and with local Ray.

    .venv/bin/python benchmarks/batch.py                 # 200 phantoms, 1 repeat
    .venv/bin/python benchmarks/batch.py --studies 200 --repeats 3

A tiny model is trained first (a few seconds; its quality does not matter). Every measured
command is a fresh ``medpipe ingest`` / ``medpipe infer`` process (no reuse of earlier
outputs), timed from start to exit (so Ray's start-up is included), under a wrapper that
reads the peak resident memory of its largest process (``RUSAGE_CHILDREN``: the main process
or one worker). Prints studies per second, the scaling efficiency (2 workers' throughput over
twice 1 worker's) and Ray's overhead over 2 local workers (Ray with 2 CPUs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t\n"
    "print(json.dumps({'rc': rc, 'seconds': dt, 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss"
    " / 1024}))\n"
)
TINY = ["--set", "preprocess.patch_size=[24,24,24]", "--set", "train.epochs=1", "--set", "train.batch_size=2",
        "--set", "train.samples_per_volume=1", "--set", "train.network.channels=[8,16,32]",
        "--set", "train.network.strides=[2,2]", "--set", "train.network.num_res_units=1",
        "--set", "infer.sw_batch_size=2", "--set", "preprocess.spacing=[1.0,1.0,1.0]"]


def _timed(args: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "pipeline", *args, "-q"],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"medpipe {' '.join(args)} exited with {result['rc']}:\n{done.stderr[-2000:]}")
    return result


def _model(work: Path) -> Path:
    from pipeline.demo_data import write_demo_dataset

    data = write_demo_dataset(work / "train_data", n=6, seed=1, shape=(32, 36, 28))
    config = work / "tiny.yaml"
    config.write_text("name: bench\n")
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--out", str(work / "train_run"),
                    "--data", str(data), "--stages", "ingest,preprocess,train", "-q", *TINY], check=True)
    return work / "train_run" / "03_train" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from pipeline.demo_data import write_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="medpipe-batch-"))
    try:
        model = _model(work)
        data = write_demo_dataset(work / "data", n=args.studies, seed=3, shape=(32, 36, 28))
        modes = {"local x1": ["--workers", "1"], "local x2": ["--workers", "2"], "ray (2 CPUs)": ["--backend", "ray"]}
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode, extra in modes.items():  # interleaved: the repeats share the machine's load alike
                out = work / f"run{r}-{mode.split()[0]}{extra[-1]}"
                ing = _timed(["ingest", str(data), "--out", str(out / "ingest"), *extra, *TINY])
                inf = _timed(["infer", str(out / "ingest"), "--model", str(model), "--out", str(out / "pred"),
                              *extra, *TINY])
                runs[mode].append({"ingest": ing["seconds"], "infer": inf["seconds"],
                                   "total": ing["seconds"] + inf["seconds"],
                                   "peak_mb": max(ing["peak_mb"], inf["peak_mb"])})
                shutil.rmtree(out)
        rate = {}
        print(f"{args.studies} studies, {args.repeats} repeat(s), medians")
        for mode, rows in runs.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            rate[mode] = args.studies / med["total"]
            print(f"  {mode:13s} ingest {med['ingest']:6.1f} s  infer {med['infer']:6.1f} s  "
                  f"{rate[mode]:5.2f} studies/s  (ingest {args.studies / med['ingest']:5.2f}/s, infer "
                  f"{args.studies / med['infer']:5.2f}/s)  peak memory of the largest process {med['peak_mb']:.0f} MB")
        print(f"scaling efficiency (2 workers over 1): {rate['local x2'] / (2 * rate['local x1']):.2f}")
        print(f"Ray overhead over 2 local workers: {rate['local x2'] / rate['ray (2 CPUs)'] - 1:+.1%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
