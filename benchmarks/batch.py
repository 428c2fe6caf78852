"""Benchmark: ingest plus inference over generated studies with 1 and 2 local workers and with Ray.

    .venv/bin/python benchmarks/batch.py                         # 200 phantoms, 1 repeat, 1 core per worker
    .venv/bin/python benchmarks/batch.py --studies 200 --repeats 3
    .venv/bin/python benchmarks/batch.py --threads-per-worker 0  # medpipe's own rule: floor(cpus / workers)

What is compared. A worker is one core: every worker (a local worker process, the in-process
loop of ``--workers 1``, a Ray task or actor) runs torch with ``--threads-per-worker`` intra-op
threads (default 1), so 1 worker vs 2 workers measures how throughput scales with workers of
equal resources (``--threads-per-worker 0`` instead lets medpipe share the CPUs out, which gives
a single worker every core). Modes:

- ``local x1``: ingest in one isolated worker process; infer in the main process (medpipe runs
  one worker in-process: no worker start-up).
- ``local x2``: ingest and infer in two local worker processes.
- ``ray x2 (cluster)``: ``--backend ray --address`` a Ray cluster of 2 CPUs started once by this
  benchmark (``ray.init(num_cpus=2)`` here, owned and stopped by this process), like a batch job
  on an existing cluster; 1 CPU per task, so 2 tasks or actors at a time.
- ``ray x2 (cold)``: ``--backend ray`` without an address: every command starts (and stops) its
  own local Ray first, the cold-start cost.

Every measured command is a fresh ``medpipe ingest`` / ``medpipe infer`` process (no reuse of
earlier outputs). Three levels are reported, each as studies per second over ingest+infer:

- command: wall time of each command, start to exit (interpreter start, imports, Ray
  connection, discovery, manifest and record writing, all included);
- batch: the time ``run_batch`` took, from its call to the last study's outcome (worker and
  actor start-up, model loading and every study; not the command's serial start and end);
- steady: the rate after the first result, ``(n - 1) / (last - first)``, i.e. per-study
  throughput once the workers run (a job over a large archive converges to it).

The timings come from ``MEDPIPE_BATCH_STATS`` (run_batch appends one JSON line per batch). Peak
memory is the largest resident set of any one process of the command: the main process and local
workers (``RUSAGE_CHILDREN`` of a wrapper), and every process that appeared while it ran, the
forkserver and the Ray workers included (``VmHWM``, sampled).
Scaling efficiency = 2 workers' throughput / (2 x 1 worker's); Ray overhead = local x2's
throughput / Ray's - 1. The machine's load average is printed: figures taken on a shared machine
are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from _timed import timed

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "preprocess.patch_size=[24,24,24]", "--set", "preprocess.spacing=[1.0,1.0,1.0]",
        "--set", "train.epochs=1", "--set", "train.batch_size=2", "--set", "train.samples_per_volume=1",
        "--set", "train.network.name=unet", "--set", "train.network.channels=[8,16,32]",
        "--set", "train.network.strides=[2,2]", "--set", "train.network.num_res_units=1",
        "--set", "train.num_workers=0", "--set", "train.optimizer=adamw", "--set", "train.learning_rate=0.001",
        "--set", "infer.sw_batch_size=2"]
LEVELS = ("command", "batch", "steady")
SHAPE = (32, 36, 28)


class ProcessMemory:
    """Peak resident memory (VmHWM) of the processes that appear while it runs, sampled every 0.1 s.

    Every new medpipe process counts: the command itself, its local workers and the forkserver
    they fork from (which outlives the command by a moment and is not its waited-for child, so
    ``RUSAGE_CHILDREN`` misses it), and Ray's worker processes ("ray::..."). New processes are
    those absent when sampling started, whose command line names python or ray.
    """

    def __init__(self) -> None:
        self.before = set(self._candidates())
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _candidates() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if cmdline.startswith(b"ray::") or b"python" in cmdline.split(b"\0")[0]:
                    pids.append(int(entry.name))
        return pids

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for pid in set(self._candidates()) - self.before:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except (OSError, ValueError, IndexError):
                    continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def _timed(args: list[str], *, work: Path, env: dict[str, str]) -> dict[str, Any]:
    stats = work / "stats.jsonl"
    stats.unlink(missing_ok=True)
    memory = ProcessMemory()
    result = timed([sys.executable, "-m", "pipeline", *args, "-q"], env={**env, "MEDPIPE_BATCH_STATS": str(stats)})
    sampled_mb = memory.stop()
    lines = [json.loads(line) for line in stats.read_text().splitlines()] if stats.is_file() else []
    if len(lines) != 1:
        raise SystemExit(f"medpipe {' '.join(args)}: expected one batch in {stats}, found {len(lines)}")
    batch = lines[0]
    return {"command": result["wall"], "batch": batch["seconds"], "first": batch["first_s"],
            "steady": batch["steady_per_s"], "threads": batch.get("threads"),
            "peak_mb": max(result["rss_kb"] / 1024, sampled_mb)}


def _model(work: Path) -> Path:
    from pipeline.demo_data import write_demo_dataset

    data = write_demo_dataset(work / "train_data", n=6, seed=1, shape=(32, 36, 28))
    config = work / "tiny.yaml"
    config.write_text("name: bench\n")
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--out", str(work / "train_run"),
                    "--data", str(data), "--stages", "ingest,preprocess,train", "-q", *TINY], check=True)
    return work / "train_run" / "03_train" / "model"


def _threading(threads: int) -> tuple[list[str], dict[str, str], str]:
    """How every command gets ``threads`` torch threads per worker: the config field where it exists,
    and OMP_NUM_THREADS (read by torch at import, in the main process, local workers and Ray workers)."""
    if threads <= 0:
        return [], {}, "medpipe's rule, floor(cpus / workers) threads per worker"
    from pipeline.config import ExecutionConfig

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if "threads_per_worker" in ExecutionConfig.model_fields:
        return (["--set", f"execution.threads_per_worker={threads}"], env,
                f"{threads} per worker (execution.threads_per_worker and OMP_NUM_THREADS)")
    return [], env, f"{threads} per worker (OMP_NUM_THREADS; this config has no execution.threads_per_worker)"


def _rates(n: int, runs: list[dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Median studies/s over ingest+infer at each level."""
    out = {}
    for level in ("command", "batch"):
        out[level] = n / statistics.median(r["ingest"][level] + r["infer"][level] for r in runs)
    per_study = [1 / r["ingest"]["steady"] + 1 / r["infer"]["steady"] for r in runs
                 if r["ingest"]["steady"] and r["infer"]["steady"]]  # None: too few studies to tell
    out["steady"] = 1 / statistics.median(per_study) if per_study else float("nan")
    return out


def _report(n: int, runs: dict[str, list[dict[str, dict[str, Any]]]], threading_note: str) -> None:
    def med(rows: list[dict[str, dict[str, Any]]], stage: str, field: str) -> float:
        values = [r[stage][field] for r in rows if r[stage][field] is not None]
        return statistics.median(values) if values else float("nan")

    print(f"\n{n} studies, {len(next(iter(runs.values())))} repeat(s), medians; torch threads: {threading_note}")
    print(f"cpus {os.cpu_count()}, load average now {os.getloadavg()[0]:.2f}")
    header = (f"{'mode':18s} {'ingest cmd/batch s':>18s} {'infer cmd/batch s':>18s} {'ingest/s steady':>15s} "
              f"{'infer/s steady':>14s} {'first result s':>15s} {'threads':>8s} {'peak MB':>8s}")
    note = "threads: torch threads of each inference worker (ingest does not use torch)"
    print(header)
    rates = {}
    for mode, rows in runs.items():
        rates[mode] = _rates(n, rows)
        threads = str(rows[0]["infer"]["threads"])
        print(f"{mode:18s} {med(rows, 'ingest', 'command'):8.2f} /{med(rows, 'ingest', 'batch'):7.2f}  "
              f"{med(rows, 'infer', 'command'):8.2f} /{med(rows, 'infer', 'batch'):7.2f}  "
              f"{med(rows, 'ingest', 'steady'):15.1f} {med(rows, 'infer', 'steady'):14.1f} "
              f"{med(rows, 'ingest', 'first'):6.2f} /{med(rows, 'infer', 'first'):6.2f} {threads:>8s} "
              f"{max(max(r['ingest']['peak_mb'], r['infer']['peak_mb']) for r in rows):8.0f}")
    print(note)
    print("\nstudies/s over ingest+infer   " + "  ".join(f"{level:>8s}" for level in LEVELS))
    for mode, rate in rates.items():
        print(f"  {mode:28s}" + "  ".join(f"{rate[level]:8.2f}" for level in LEVELS))
    one, two = rates["local x1"], rates["local x2"]
    print("scaling efficiency 2 over 1  " + "  ".join(f"{two[lv] / (2 * one[lv]):8.2f}" for lv in LEVELS))
    for mode in (m for m in rates if m.startswith("ray")):
        print(f"{mode + ' overhead':29s}" + "  ".join(f"{two[lv] / rates[mode][lv] - 1:+8.1%}" for lv in LEVELS))
    if "ray x2 (cold)" in runs and "ray x2 (cluster)" in runs:
        extra = [med(runs["ray x2 (cold)"], s, "command") - med(runs["ray x2 (cluster)"], s, "command")
                 for s in ("ingest", "infer")]
        print(f"Ray cold start (a local Ray started per command), over the cluster's: ingest +{extra[0]:.1f} s, "
              f"infer +{extra[1]:.1f} s per command")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), metavar=("X", "Y", "Z"),
                        help=f"voxels of each generated study (default {' '.join(map(str, SHAPE))})")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="torch threads of every worker (0: medpipe's rule, floor(cpus / workers))")
    parser.add_argument("--no-ray", action="store_true", help="local workers only")
    args = parser.parse_args()
    from pipeline.demo_data import write_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="medpipe-batch-"))
    ray = None
    try:
        model = _model(work)
        data = write_demo_dataset(work / "data", n=args.studies, seed=3, shape=tuple(args.shape))
        overrides, thread_env, threading_note = _threading(args.threads_per_worker)
        os.environ.update(thread_env)  # before the Ray cluster starts: its workers inherit it
        modes: dict[str, list[str]] = {"local x1": ["--workers", "1"], "local x2": ["--workers", "2"]}
        if not args.no_ray:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
            address = ray.get_runtime_context().gcs_address
            modes["ray x2 (cluster)"] = ["--backend", "ray", "--address", address]
            modes["ray x2 (cold)"] = ["--backend", "ray"]
        env = dict(os.environ)  # after ray.init, which sets what its clients need (RAY_AUTH_MODE)
        runs: dict[str, list[dict[str, dict[str, Any]]]] = {m: [] for m in modes}
        print(f"load average at the start {os.getloadavg()[0]:.2f}", flush=True)
        for r in range(args.repeats):
            for mode, extra in modes.items():  # interleaved: the repeats share the machine's load alike
                out = work / f"run{r}-{''.join(c for c in mode if c.isalnum())}"
                ingest = _timed(["ingest", str(data), "--out", str(out / "ingest"), *extra, *overrides, *TINY],
                                work=work, env=env)
                infer = _timed(["infer", str(out / "ingest"), "--model", str(model), "--out", str(out / "pred"),
                                *extra, *overrides, *TINY], work=work, env=env)
                runs[mode].append({"ingest": ingest, "infer": infer})
                print(f"  repeat {r + 1} {mode}: ingest {ingest['command']:.1f} s, infer {infer['command']:.1f} s",
                      flush=True)
                shutil.rmtree(out)
        _report(args.studies, runs, threading_note)
    finally:
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
