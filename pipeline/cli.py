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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.layout import STAGES
from pipeline.logs import configure_logging

log = logging.getLogger("medpipe")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

_DESCRIPTION = """\
medpipe: scans in, trained models, predictions and reproducible reports out.

Stages (each usable alone, talking only through files on disk):
  ingest      DICOM series / NIfTI / MSD folders -> NIfTI + manifest.json
  preprocess  fingerprint, plans (spacing, normalisation, patch size), preprocessed volumes
  train       3D U-Net (MONAI), CUDA + AMP when present, CPU otherwise; resumable
  infer       sliding-window prediction on each image's own grid
  evaluate    Dice, IoU, HD95, ASSD, surface Dice, volumes per study and class; cohort CIs
  report      per-study JSON + HTML pages with pictures, one cohort page
  run         all of the above from one config; up-to-date stages are skipped
  demo        the whole chain on generated phantoms (about a minute on 2 CPU cores)

Tools: compare (paired test of two evaluations), export-seg (DICOM SEG),
export-model (TorchScript/ONNX), export-pdf (a report page to PDF).

Exit status: 0 all studies done, 3 partially done (some studies failed; see the
stage's record.json), 1 failed, 2 bad command line or config.
"""

_EPILOG = """\
examples:
  medpipe demo --out runs/demo
  medpipe run configs/hippocampus.yaml --out runs/hippo --set data.root=../shared/data/Task04_Hippocampus
  medpipe ingest ../shared/data/hippocampus_dicom --out out/ingest
  medpipe infer --model runs/hippo/03_train/model new_scans/ --out out/pred
  medpipe evaluate --pred out/pred --ref labels/ --out out/eval
"""


def _common(parser: argparse.ArgumentParser, *, config_optional: bool = True) -> None:
    if config_optional:
        parser.add_argument("--config", "-c", type=Path, help="YAML config (see configs/); defaults apply without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.epochs=5")
    parser.add_argument("--force", action="store_true", help="redo the work even if the outputs are up to date")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _batch_options(parser: argparse.ArgumentParser, *, workers: bool = False) -> None:
    """--shard, --backend and --address (issue 7): where and which part of the batch runs."""
    parser.add_argument("--shard", metavar="I/N", help="process only shard I of N (0-based; studies split by a hash "
                        "of their id) into OUT/shard-I-of-N; 'medpipe merge' assembles the shards")
    parser.add_argument("--backend", choices=("local", "ray"), help="local worker processes (default) or Ray tasks")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    if workers:
        parser.add_argument("--workers", type=int, help="worker processes, each loading the model once")


def _execution_overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"execution.shard={args.shard}"] if getattr(args, "shard", None) else []
    extra += [f"execution.backend={args.backend}"] if getattr(args, "backend", None) else []
    extra += [f"execution.address={args.address}"] if getattr(args, "address", None) else []
    if getattr(args, "workers", None) and args.command == "infer":
        extra.append(f"execution.workers={args.workers}")
    return extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medpipe", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="convert a scan folder to NIfTI plus manifest.json",
                       description="Find NIfTI files, an MSD dataset (dataset.json, imagesTr, labelsTr) or DICOM "
                       "series under SCAN_DIR; write OUT/images, OUT/labels and OUT/manifest.json. A study that "
                       "fails is recorded with its reason and the others go on.")
    p.add_argument("scan_dir", type=Path, metavar="SCAN_DIR")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: config ingest.workers)")
    _common(p)
    _batch_options(p)

    p = sub.add_parser("preprocess", help="fingerprint, plans and preprocessed volumes from an ingest folder",
                       description="Read INGEST_DIR/manifest.json; write plans.json, dataset.json and data/.")
    p.add_argument("ingest_dir", type=Path, metavar="INGEST_DIR")
    p.add_argument("--out", "-o", type=Path, required=True)
    _common(p)
    _batch_options(p)

    p = sub.add_parser("train", help="train a 3D U-Net on a preprocess folder (resumes if stopped)",
                       description="Train on PREPROCESS_DIR; write split.json, checkpoints/, history.csv and "
                       "model/ (what 'medpipe infer --model' takes). Rerunning a stopped run resumes it.")
    p.add_argument("preprocess_dir", type=Path, metavar="PREPROCESS_DIR")
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--fold", help="cross-validation fold 0..N-1 (into OUT/fold_K) or 'all' (default: config "
                   "train.fold); folds come from data.split_file or a seeded split")
    _common(p)

    p = sub.add_parser("infer", help="predict label maps on the images' own grids",
                       description="INPUT is a folder of NIfTI images (outputs named after them) or an ingest "
                       "folder (outputs named by study id). The model is loaded once for the batch.")
    p.add_argument("input", type=Path, metavar="INPUT")
    p.add_argument("--model", "-m", type=Path, required=True, help="model folder (RUN/03_train/model)")
    p.add_argument("--out", "-o", type=Path, required=True)
    _common(p)
    _batch_options(p, workers=True)

    p = sub.add_parser("evaluate", help="segmentation metrics of predictions against reference labels",
                       description="Pair PRED and REF by study id or file name; write per_study.csv and "
                       "summary.json. Each may be a plain folder of label NIfTI files or a stage folder.")
    p.add_argument("--pred", type=Path, required=True, help="infer output or folder of label NIfTI files")
    p.add_argument("--ref", type=Path, required=True, help="ingest output or folder of label NIfTI files")
    p.add_argument("--out", "-o", type=Path, required=True)
    _common(p)

    p = sub.add_parser("report", help="per-study and cohort HTML/JSON reports from an evaluate folder")
    p.add_argument("evaluation", type=Path, metavar="EVAL_DIR")
    p.add_argument("--predictions", type=Path, help="infer output folder (for the pictures)")
    p.add_argument("--ingest", type=Path, help="ingest output folder (images and reference labels)")
    p.add_argument("--out", "-o", type=Path, required=True)
    _common(p)

    p = sub.add_parser("run", help="run every stage from one config into one run folder",
                       description="Run ingest -> preprocess -> train -> infer -> evaluate -> report into OUT "
                       "(one numbered folder per stage). A stage whose outputs are complete and up to date "
                       "is skipped, so rerunning after an interruption resumes.")
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--out", "-o", type=Path, required=True, help="run folder")
    p.add_argument("--data", type=Path, help="scan folder (overrides data.root)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of stages to run, in order")
    p.add_argument("--fold", help="train and evaluate cross-validation fold K (or 'all': every fold, cv.json)")
    _common(p, config_optional=False)
    _batch_options(p)
    p = sub.add_parser("merge", help="assemble the shard-I-of-N folders of a sharded stage into the stage folder",
                       description="STAGE_DIR holds shard-0-of-N .. shard-(N-1)-of-N from 'STAGE --shard I/N' "
                       "(ingest, preprocess or infer); write the merged manifest / dataset / predictions and "
                       "record.json into STAGE_DIR, as an unsharded run would. Refuses missing or overlapping "
                       "shards and shards made with different configs.")
    p.add_argument("stage_dir", type=Path, metavar="STAGE_DIR")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("demo", help="generate phantoms and run the whole chain on them",
                       description="Write a small synthetic dataset under OUT/data and run every stage on it "
                       "into OUT/run (about a minute on 2 CPU cores); prints where the report is.")
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--cases", type=int, default=None, help="number of phantom cases (default 16)")
    _common(p, config_optional=False)
    _add_evaluation_commands(sub)
    return parser


def _add_evaluation_commands(sub: argparse._SubParsersAction) -> None:
    """compare, export-seg, export-model, export-pdf (issue 6)."""
    p = sub.add_parser("compare", help="paired comparison of two evaluations on the same studies",
                       description="Pair the per_study.csv rows of EVAL_A and EVAL_B by study and class; per class "
                       "and metric write the mean difference (B - A) with a bootstrap interval and the Wilcoxon "
                       "signed-rank test to OUT/comparison.{json,csv,html}.")
    p.add_argument("eval_a", type=Path, metavar="EVAL_A", help="evaluate folder of model A")
    p.add_argument("eval_b", type=Path, metavar="EVAL_B", help="evaluate folder of model B")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"), help="names of the models")
    p.add_argument("--out", "-o", type=Path, required=True)
    _common(p)

    p = sub.add_parser("export-seg", help="write a label NIfTI as DICOM SEG on its source DICOM series",
                       description="LABELS must lie on the grid of the series in SERIES_DIR (the image ingested "
                       "from it); every frame references and lies on a source slice. Patient and study "
                       "attributes are copied from the source, as DICOM requires.")
    p.add_argument("--dicom", type=Path, required=True, metavar="SERIES_DIR", help="folder of one source series")
    p.add_argument("--labels", type=Path, required=True, metavar="LABELS", help="label NIfTI on the series' grid")
    p.add_argument("--out", "-o", dest="output", type=Path, required=True, metavar="SEG", help="the .dcm to write")
    p.add_argument("--label-names", type=Path, metavar="JSON",
                   help="segment names: a manifest.json, model.json, predictions.json or {\"1\": \"name\"} file")
    p.add_argument("--series-description", default="medpipe segmentation")
    p.add_argument("--generate-missing-uids", action="store_true",
                   help="export even when the source's Study/Series Instance UIDs are blank (generated ones)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("export-model", help="export a trained model to TorchScript and ONNX with a parity check",
                       description="Write OUT/model.torchscript.pt, OUT/model.onnx and OUT/export.json; each "
                       "export is loaded back and must give the PyTorch network's outputs.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="RUN/03_train/model (or RUN/03_train)")
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--formats", default="torchscript,onnx", help="comma-separated: torchscript, onnx")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("import-medmnist", help="MedMNIST .npz -> NIfTI volumes + manifest with class labels",
                       description="Write OUT/images/<split>_<index>.nii.gz, manifest.json (class_label per "
                       "study) and split.json (official train/val) for 'medpipe train --set task=classification'.")
    p.add_argument("npz", type=Path, metavar="NPZ")
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="import only the first N studies of each split")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("export-pdf", help="print a report page to PDF with headless Chromium")
    p.add_argument("page", type=Path, metavar="PAGE", help="an index.html or studies/<id>.html")
    p.add_argument("--out", "-o", dest="output", type=Path, required=True, metavar="PDF")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")


def _config(args: argparse.Namespace, path: Path | None = None, extra: Sequence[str] = ()) -> PipelineConfig:
    return load_config(path if path is not None else getattr(args, "config", None),
                       overrides=[*extra, *_execution_overrides(args), *args.overrides])


def _exit_code(record: dict[str, Any]) -> int:
    return {"complete": EXIT_OK, "partial": EXIT_PARTIAL}.get(str(record.get("status")), EXIT_FAILED)


def _summarise(stage: str, record: dict[str, Any], out: Path) -> None:
    counts = record.get("counts", {})
    state = "up to date, skipped" if record.get("skipped") else record.get("status")
    print(f"{stage}: {state} ({counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, "
          f"{counts.get('skipped', 0)} skipped) -> {out}")
    for study in record.get("studies", []):
        if study.get("status") == "failed":
            print(f"  failed {study['id']}: [{study.get('code')}] {study.get('message')}")


def _prestart(config: PipelineConfig, module: str, *, actors: bool) -> None:
    """Start the batch's workers (local with torch, or Ray) now, importing ``module``, while this process
    does its own imports and discovery (see batch.prestart_workers and ray_backend.prestart)."""
    execution = config.execution
    if execution.backend == "ray":
        from pipeline.ray_backend import prestart

        prestart(execution, modules=[module], actors=actors)
    elif actors and execution.workers > 1:  # local workers fork from a server once torch is imported
        from pipeline.batch import prestart_workers

        prestart_workers([module])


def _cmd_ingest(args: argparse.Namespace) -> int:
    extra = [f"ingest.workers={args.workers}"] if args.workers else []
    config = _config(args, extra=extra)
    _prestart(config, "pipeline.stages.ingest_study", actors=False)
    from pipeline.stages.ingest import ingest

    record = ingest(args.scan_dir, args.out, config=config, force=args.force)
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
    _prestart(config, "pipeline.stages.infer", actors=True)  # workers import torch while this process does
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

    result = export_dicom_seg(args.dicom, args.labels, args.output, label_names=_label_names(args.label_names),
                              series_description=args.series_description,
                              missing_uids="generate" if args.generate_missing_uids else "refuse")
    segments = ", ".join(f"{n} <- label {v}" for n, v in result["segments"].items())
    print(f"export-seg: {result['frames']} frames over {result['slices']} slices, segments {segments} -> "
          f"{args.output}")
    if result["source_repairs"]:
        print(f"  source attributes filled in: {', '.join(result['source_repairs'])}")
    return EXIT_OK


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
    if out is None:
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
