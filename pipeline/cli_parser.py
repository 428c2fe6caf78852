"""The ``medpipe`` command line's arguments: every subcommand, its options and help texts."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import __version__
from pipeline.layout import STAGES

__all__ = ["build_parser", "execution_overrides"]

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


def execution_overrides(args: argparse.Namespace) -> list[str]:
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
    p.add_argument("--out", "-o", type=Path, help="output folder (required unless --dry-run)")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: config ingest.workers)")
    p.add_argument("--dry-run", action="store_true",
                   help="list each study found and what ingest would do with it (convert, skip or fail, and why); "
                        "decode nothing, write nothing")
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

    p = sub.add_parser("export-seg", help="write label NIfTIs as DICOM SEG on their source DICOM series",
                       description="One: LABELS must lie on the grid of the series in SERIES_DIR (the image "
                       "ingested from it). All of an infer folder: --scan SCAN_DIR --predictions PRED --out "
                       "OUT_DIR finds each prediction's series in the scan folder as ingest found it (same ids: "
                       "give ingest's config for its pseudonym_key) and writes OUT_DIR/<id>.dcm and export.json. "
                       "Every frame references and lies on a source slice. Patient and study attributes are "
                       "copied from the source, as DICOM requires.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom", type=Path, metavar="SERIES_DIR", help="folder of one source series")
    source.add_argument("--scan", type=Path, metavar="SCAN_DIR", help="the scan folder that was ingested")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", type=Path, metavar="LABELS", help="label NIfTI on the series' grid (--dicom)")
    labels.add_argument("--predictions", type=Path, metavar="PRED", help="an infer output folder (--scan)")
    p.add_argument("--out", "-o", dest="output", type=Path, required=True, metavar="OUT",
                   help="the .dcm to write (--dicom), or the folder to write them in (--scan)")
    p.add_argument("--config", "-c", type=Path, help="the config ingest ran with (its ingest.pseudonym_key; --scan)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set ingest.pseudonym_key=... (--scan)")
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
