"""The ``medpipe`` command line: thin subcommands over the stage API functions; the only place that prints."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import logging
import os
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli_parser import build_parser, execution_overrides
from pipeline.collector import long_lived
from pipeline.errors import ConfigError, PipelineError
from pipeline.layout import STAGES
from pipeline.logs import configure_logging

if TYPE_CHECKING:  # the config (pydantic, numpy) is imported by each command, after ingest's prefetch started
    from pipeline.config import PipelineConfig

log = logging.getLogger("medpipe")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

def _config(args: argparse.Namespace, path: Path | None = None, extra: Sequence[str] = ()) -> PipelineConfig:
    from pipeline.config import load_config

    return load_config(path if path is not None else getattr(args, "config", None),
                       overrides=[*extra, *execution_overrides(args), *args.overrides])


def _exit_code(record: dict[str, Any]) -> int:
    return {"complete": EXIT_OK, "partial": EXIT_PARTIAL}.get(str(record.get("status")), EXIT_FAILED)


def _summarise(stage: str, record: dict[str, Any], out: Path) -> None:
    counts = record.get("counts", {})
    state = "up to date, skipped" if record.get("skipped") else record.get("status")
    print(f"{stage}: {state} ({counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, "
          f"{counts.get('skipped', 0)} skipped) -> {out}")
    failures: dict[tuple[Any, Any], list[str]] = {}  # one line per reason: a 4D file's 300 volumes fail alike
    for study in record.get("studies", []):
        if study.get("status") == "failed":
            failures.setdefault((study.get("code"), study.get("message")), []).append(study["id"])
    for (code, message), ids in failures.items():
        names = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        who = ids[0] if len(ids) == 1 else f"{len(ids)} studies ({names})"
        print(f"  failed {who}: [{code}] {message}")
    skipped = Counter(s.get("code") or "no_code" for s in record.get("studies", []) if s.get("status") == "skipped")
    if skipped:  # by reason: an archive or a link left out is easy to miss among localizers
        print("  skipped: " + ", ".join(f"{n} {code}" for code, n in sorted(skipped.items())))


def _prestart(config: PipelineConfig, modules: Sequence[str], *, actors: bool) -> None:
    """Start the batch's workers (local with torch, or Ray) now, importing ``modules``, while this process
    does its own imports and discovery (see batch.prestart_workers and ray_backend.prestart)."""
    execution = config.execution
    if execution.backend == "ray":
        from pipeline.ray_backend import prestart

        prestart(execution, modules=modules, actors=actors)
    elif actors and execution.workers > 1:  # local workers fork from a server once torch is imported
        from pipeline.batch import prestart_workers

        prestart_workers(modules)


def _load_ingest(args: argparse.Namespace) -> tuple[PipelineConfig, Callable[..., Any]]:
    """The command's config and the function it runs (the survey for --dry-run), importing what they need."""
    config = _config(args, extra=[f"ingest.workers={args.workers}"] if args.workers else [])
    if args.dry_run:
        from pipeline.stages.ingest_survey import survey

        return config, survey
    _prestart(config, ["pipeline.stages.ingest_study"], actors=False)
    from pipeline.stages.ingest import ingest

    return config, ingest


def _cmd_ingest(args: argparse.Namespace) -> int:
    if args.out is None and not args.dry_run:
        raise ConfigError("medpipe ingest needs --out OUT (the output folder), or --dry-run to only list the studies")
    from pipeline.stages.ingest_prefetch import start_prefetch

    if "numpy" not in sys.modules:  # numpy's idle BLAS threads would spin beside the helper (read at its import)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # before the imports below: their time is the helper's time
    prefetch = start_prefetch(args.scan_dir, out=None if args.dry_run else args.out)
    try:
        # the config and the imports with no collection walking what they create (a hundred young ones and a
        # full one: 0.02-0.03 s); what they leave alive then stays out of the run's collections
        with long_lived(partial(_load_ingest, args)) as (config, run):
            if args.dry_run:
                from pipeline.stages.ingest_survey import survey_lines

                studies = run(args.scan_dir, config=config, prefetch=prefetch)
                print("\n".join(survey_lines(studies, args.scan_dir)))
                return EXIT_OK
            record = run(args.scan_dir, args.out, config=config, force=args.force, prefetch=prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    _summarise("ingest", record, args.out / "manifest.json")
    return _exit_code(record)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.stages.preprocess import preprocess

    record = preprocess(args.ingest_dir, args.out, config=_config(args), force=args.force)
    _summarise("preprocess", record, args.out)
    return _exit_code(record)


def _with_fold(args: argparse.Namespace, config: PipelineConfig, *, path: Path | None = None,
               extra: Sequence[str] = ()) -> PipelineConfig:
    """``config`` with ``--fold`` applied (classification folds live in the classify section)."""
    if args.fold is None:
        return config
    section = "classify" if config.task == "classification" else "train"
    return _config(args, path=path, extra=[*extra, f"{section}.fold={args.fold}"])


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.stages.train import train

    config = _with_fold(args, _config(args))
    record = train(args.preprocess_dir, args.out, config=config, force=args.force)
    fold = config.classify.fold if config.task == "classification" else config.train.fold
    where = {None: args.out / "model", "all": args.out / "cv.json"}.get(fold, args.out / f"fold_{fold}" / "model")
    _summarise("train", record, where)
    return _exit_code(record)


def _cmd_infer(args: argparse.Namespace) -> int:
    config = _config(args)
    from pipeline.inference import PREDICTOR_IMPORTS  # light: the workers import torch from now on

    _prestart(config, ["pipeline.stages.infer", *PREDICTOR_IMPORTS], actors=True)
    from pipeline.stages.infer import infer

    record = infer(args.model, args.input, args.out, config=config, force=args.force)
    _summarise("infer", record, args.out / "predictions")
    return _exit_code(record)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.stages.evaluate import evaluate

    record = evaluate(args.pred, args.ref, args.out, config=_config(args), force=args.force)
    _summarise("evaluate", record, args.out / "summary.json")
    return _exit_code(record)


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.stages.report import report

    record = report(args.evaluation, args.out, predictions=args.predictions, ingest=args.ingest,
                    config=_config(args), force=args.force)
    _summarise("report", record, args.out / "index.html")
    return _exit_code(record)


def _run_and_summarise(config: PipelineConfig, out: Path, *, force: bool, stages: tuple[str, ...]) -> int:
    from pipeline.layout import RunLayout
    from pipeline.runner import run_pipeline

    layout = RunLayout(out)
    records = run_pipeline(config, out, force=force, stages=stages)
    for stage, record in records.items():
        _summarise(stage, record, layout.stage_dir(stage))
    codes = [_exit_code(r) for r in records.values()]
    if "report" in records:
        print(f"\nReport: {(layout.report / 'index.html').resolve()}")
    return max(codes) if EXIT_FAILED not in codes else EXIT_FAILED


def _cmd_run(args: argparse.Namespace) -> int:
    extra = [f"data.root={args.data}"] if args.data else []
    config = _with_fold(args, _config(args, path=args.config, extra=extra), path=args.config, extra=extra)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"medpipe: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return EXIT_USAGE
    return _run_and_summarise(config, args.out, force=args.force, stages=stages)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import demo_config, prepare_demo

    data_dir = prepare_demo(args.out, cases=args.cases)
    config = demo_config(data_dir, overrides=args.overrides)
    return _run_and_summarise(config, args.out / "run", force=args.force, stages=STAGES)


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.stages.compare import compare

    record = compare(args.eval_a, args.eval_b, args.out, names=tuple(args.names), config=_config(args),
                     force=args.force)
    _summarise("compare", record, args.out / "comparison.html")
    return _exit_code(record)


def _label_names(path: Path | None) -> dict[str, str] | None:
    from pipeline.errors import ConfigError
    from pipeline.fileio import read_json

    if path is None:
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file of label names ({exc})") from None
    if isinstance(data, dict):
        data = data.get("labels") or (data.get("model") or {}).get("labels") or data
    if not isinstance(data, dict) or not all(str(k).isdigit() for k in data):
        raise ConfigError(f"{path}: expected label names as {{\"1\": \"name\", ...}} or a file with 'labels'")
    return {str(k): str(v) for k, v in data.items()}


def _cmd_export_seg(args: argparse.Namespace) -> int:
    from pipeline.export.dicom_seg import export_dicom_seg

    if (args.scan is None) != (args.predictions is None):
        raise ConfigError("export-seg takes --dicom SERIES_DIR with --labels LABELS, or --scan SCAN_DIR with "
                          "--predictions PRED (and --out a folder)")
    if args.scan is not None:
        return _export_segs(args)
    result = export_dicom_seg(args.dicom, args.labels, args.output, label_names=_label_names(args.label_names),
                              series_description=args.series_description,
                              missing_uids="generate" if args.generate_missing_uids else "refuse")
    segments = ", ".join(f"{n} <- label {v}" for n, v in result["segments"].items())
    print(f"export-seg: {result['frames']} frames over {result['slices']} slices, segments {segments} -> "
          f"{args.output}")
    if result["source_repairs"]:
        print(f"  source attributes filled in: {', '.join(result['source_repairs'])}")
    return EXIT_OK


def _export_segs(args: argparse.Namespace) -> int:
    from pipeline.export.dicom_seg_batch import EXPORT_JSON, export_predictions_as_seg

    result = export_predictions_as_seg(args.scan, args.predictions, args.output, config=_config(args),
                                       label_names=_label_names(args.label_names),
                                       series_description=args.series_description)
    print(f"export-seg: {len(result['exported'])} SEG(s) written, {len(result['failed'])} failed, "
          f"{len(result['not_in_scan'])} prediction(s) of no series in the scan folder -> {args.output / EXPORT_JSON}")
    for failure in result["failed"]:
        print(f"  {failure['id']}: [{failure['code']}] {failure['message']}")
    return EXIT_PARTIAL if result["failed"] and result["exported"] else EXIT_FAILED if result["failed"] else EXIT_OK


def _cmd_export_model(args: argparse.Namespace) -> int:
    from pipeline.export.model_export import export_model

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    record = export_model(args.model, args.out, formats=formats, opset=args.opset)
    for name, info in record["files"].items():
        worst = max(c["max_abs_diff"] for c in record["parity"]["checks"][name])
        print(f"export-model: {name} -> {args.out / info['file']} (max |difference| {worst:.2e})")
    return EXIT_OK


def _cmd_import_medmnist(args: argparse.Namespace) -> int:
    from pipeline.classification.medmnist import import_medmnist

    manifest = import_medmnist(args.npz, args.out, limit=args.limit)
    counts: dict[int, int] = {}
    for study in manifest.studies:
        counts[int(study.class_label or 0)] = counts.get(int(study.class_label or 0), 0) + 1
    print(f"import-medmnist: {len(manifest.studies)} studies, classes {dict(sorted(counts.items()))} -> "
          f"{args.out / 'manifest.json'}")
    return EXIT_OK


def _cmd_export_pdf(args: argparse.Namespace) -> int:
    from pipeline.reporting.pdf import export_pdf

    print(f"export-pdf: {export_pdf(args.page, args.output)}")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ingest": _cmd_ingest, "preprocess": _cmd_preprocess, "train": _cmd_train, "infer": _cmd_infer,
    "evaluate": _cmd_evaluate, "report": _cmd_report, "run": _cmd_run, "demo": _cmd_demo,
}
def _cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.sharding import merge_shards

    record = merge_shards(args.stage_dir)
    _summarise(f"merge {record['stage']}", record, args.stage_dir)
    return _exit_code(record)


_COMMANDS["merge"] = _cmd_merge
_COMMANDS.update({"compare": _cmd_compare, "export-seg": _cmd_export_seg, "export-model": _cmd_export_model,
                  "export-pdf": _cmd_export_pdf, "import-medmnist": _cmd_import_medmnist})


def _log_file(args: argparse.Namespace) -> Path | None:
    out = getattr(args, "out", None)
    if out is None or getattr(args, "dry_run", False):  # a dry run writes nothing, its log included
        return None
    return Path(out) / ("medpipe.log" if args.command not in ("demo",) else "run/medpipe.log")


def _torchrun_follower() -> bool:
    """True in a torchrun process of rank > 0 (a malformed environment is reported when training starts)."""
    from pipeline.training.launch import torchrun_env

    try:
        env = torchrun_env()
    except ConfigError:
        return False
    return env is not None and env[0] > 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    follower = _torchrun_follower()
    configure_logging(verbosity=-1 if args.quiet or follower else args.verbose,
                      log_file=None if follower else _log_file(args))
    command_line = "medpipe " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        if follower:  # a torchrun rank other than 0 trains alongside rank 0, which writes and prints
            with contextlib.redirect_stdout(io.StringIO()):
                return _COMMANDS[args.command](args)
        return _COMMANDS[args.command](args)
    except PipelineError as exc:
        print(f"medpipe {args.command}: error [{exc.code}]: {exc}", file=sys.stderr)
        if exc.code == "config_error":
            return EXIT_USAGE
        print(f"Finished outputs are kept. To resume after fixing this, run: {command_line}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nInterrupted. Finished outputs are kept; to resume, run: {command_line}", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``medpipe`` console script and ``python -m pipeline``: :func:`main`, then a quick exit.

    A command that loaded torch and MONAI spends 1-1.5 s (on this 2-core CPU) after its work
    tearing down their modules, a cost every command would pay. So once the interpreter has
    joined its threads and run the exit handlers registered after this one (Ray's shutdown,
    multiprocessing's clean-up of its workers and temporary folders), the process ends with
    ``os._exit``, leaving the module teardown out. All outputs were closed (and written
    atomically) before; logging and the standard streams are flushed here.
    """
    code = [EXIT_FAILED]  # an exception escaping main() (a bug) still exits non-zero
    atexit.register(_quick_exit, code)  # registered before Ray's or multiprocessing's: runs after them
    try:
        code[0] = main()
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
        raise
    sys.exit(code[0])


def _quick_exit(code: list[int]) -> None:
    logging.shutdown()  # registered before this handler, so it would run after it: flush the log files now
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe
            stream.flush()
    os._exit(code[0])
