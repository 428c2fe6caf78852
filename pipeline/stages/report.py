"""The report stage: per-study pages with metrics and pictures, and a cohort page with summary and provenance."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batch import run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError, PipelineError
from pipeline.fileio import read_json, sha256_bytes, write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.inference.predictor import PREDICTIONS_JSON, prediction_paths
from pipeline.io.nifti import load_nifti, nifti_stem
from pipeline.io.volume import Volume
from pipeline.manifest import MANIFEST_NAME, Manifest, Study, load_manifest
from pipeline.metrics.segmentation import DECIMALS, read_per_study
from pipeline.provenance import RECORD_NAME, StageRecord, StudyStatus, load_record
from pipeline.reporting import html
from pipeline.reporting.figures import study_figure
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

STUDIES_DIR = "studies"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_PROVENANCE_KEYS = ("stage", "status", "config_hash", "code_version", "packages", "seed", "started", "finished",
                    "duration_s", "timings", "counts")


def safe_name(study_id: str) -> str:
    """A file name for a study: its id when that is plain ASCII, else a hash of it."""
    if _SAFE_NAME.fullmatch(study_id) and ".." not in study_id:
        return study_id
    return f"study_{sha256_bytes(study_id.encode())[:12]}"


def _scrub(message: str, study: Study) -> str:
    """Remove the study's source path and file name from a message: pages name studies only by id."""
    source = study.source
    for piece in sorted({source, Path(source).name, nifti_stem(Path(source)), *Path(source).parts},
                        key=len, reverse=True):
        if len(piece) >= 3:
            message = message.replace(piece, "<source>")
    return message


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, DECIMALS)


def _provenance(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Selected record.json fields (no configs, inputs or host paths) and the record files as inputs."""
    records, inputs = [], {}
    for i, path in enumerate(paths):
        folder = Path(path).parent if Path(path).name == RECORD_NAME else Path(path)
        record = load_record(folder)
        if record is None:
            raise ManifestError(f"{folder / RECORD_NAME}: no readable stage record for the provenance block")
        picked = {k: record.get(k) for k in _PROVENANCE_KEYS}
        device = record.get("device") or {}
        picked["device"] = " / ".join(str(device[k]) for k in ("type", "gpu", "cpu") if device.get(k)) or "\u2014"
        records.append(picked)
        inputs[f"provenance:{i}:{record.get('stage')}"] = folder / RECORD_NAME
    return records, inputs


def _load_optional(path: Path | None) -> Volume | None:
    return load_nifti(path) if path is not None and path.is_file() else None


def _figure(image: Path | None, reference: Path | None, prediction: Path | None,
            study_id: str) -> tuple[bytes | None, list[str]]:
    notes = []
    ref = _load_optional(reference)
    pred = _load_optional(prediction)
    img = _load_optional(image)
    grid = ref or pred or img
    if grid is None:
        return None, ["no image or labels available for a picture"]
    layers = {"image": img, "reference": ref, "prediction": pred}
    for name, vol in layers.items():
        if vol is not None and not vol.same_grid(grid):
            notes.append(f"{name} is on another grid than the reference; left out of the picture")
            layers[name] = None
    return study_figure(image=layers["image"], reference=layers["reference"], prediction=layers["prediction"],
                        title=study_id), notes


def report(
    evaluation: Path,
    out: Path,
    *,
    predictions: Path | None = None,
    ingest: Path | None = None,
    config: PipelineConfig | None = None,
    force: bool = False,
    provenance: list[Path] | tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Write ``index.html`` and ``studies/<id>.{json,html,png}`` from an evaluate folder.

    ``predictions`` (an infer folder or a folder of label NIfTIs) and ``ingest`` (for the image,
    the reference and ingest problems) feed the pictures; ``provenance`` lists stage folders
    whose record.json fill the provenance block. Studies appear only by their id.
    """
    config = config or PipelineConfig()
    evaluation, out = Path(evaluation), Path(out)
    summary_path, per_study_path = evaluation / "summary.json", evaluation / "per_study.csv"
    if not summary_path.is_file():
        raise ManifestError(f"{summary_path} is missing; run 'medpipe evaluate' first")
    inputs: dict[str, Path] = {"summary": summary_path, "per_study": per_study_path}
    pred_paths: dict[str, Path] = {}
    if predictions is not None:
        predictions = Path(predictions)
        pred_paths = prediction_paths(predictions)
        if (predictions / PREDICTIONS_JSON).is_file():
            inputs["predictions"] = predictions / PREDICTIONS_JSON
        inputs.update({f"prediction:{sid}": p for sid, p in pred_paths.items()})
    manifest = Manifest()
    if ingest is not None:
        ingest = Path(ingest)
        manifest = load_manifest(ingest)
        inputs["manifest"] = ingest / MANIFEST_NAME
    records, record_inputs = _provenance([Path(p) for p in provenance])
    inputs.update(record_inputs)
    title = config.report.title or f"{config.name}: segmentation report"

    def work(record: StageRecord) -> list[Path]:
        summary = read_json(summary_path)
        rows = read_per_study(per_study_path)
        by_study: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_study.setdefault(row["study"], []).append(row)
        studies = manifest.by_id()
        names = {sid: safe_name(sid) for sid in by_study}
        if len(set(names.values())) != len(names):
            raise ManifestError("two study ids map to one report file name; ids must be unique")

        def one(sid: str) -> list[Path]:
            study = studies.get(sid)
            image = ingest / study.image if ingest is not None and study and study.image else None
            reference = ingest / study.label if ingest is not None and study and study.label else None
            prediction = pred_paths.get(sid)
            try:
                png, notes = _figure(image, reference, prediction, sid)
            except PipelineError as exc:
                png, notes = None, [f"no picture: {_scrub(str(exc), study) if study else exc}"]
            name = names[sid]
            written = []
            if png is not None:
                write_bytes_atomic(out / STUDIES_DIR / f"{name}.png", png)
                written.append(out / STUDIES_DIR / f"{name}.png")
            problems = [{"code": p.code, "message": _scrub(p.message, study)} for p in study.problems] if study else []
            paths = {"image": study.image if study else None,
                     "reference": study.label if study else None,
                     "prediction": prediction.relative_to(predictions).as_posix() if prediction and predictions else None,
                     "picture": f"{name}.png" if png is not None else None}
            metrics = [{**{k: r[k] for k in ("class", "class_name")},
                        **{k: _json_number(r[k]) for k in ("dice", "iou", "hd95", "volume_ref_ml", "volume_pred_ml")}}
                       for r in by_study[sid]]
            write_json_atomic(out / STUDIES_DIR / f"{name}.json", {
                "id": sid, "mean_dice": _json_number(float(np.mean([r["dice"] for r in by_study[sid]]))),
                "metrics": metrics, "problems": problems, "paths": paths, "notes": notes})
            write_text_atomic(out / STUDIES_DIR / f"{name}.html", html.study_page(
                study_id=sid, title=title, rows=by_study[sid], problems=problems, png=png, paths=paths))
            return [*written, out / STUDIES_DIR / f"{name}.json", out / STUDIES_DIR / f"{name}.html"]

        outputs: list[Path] = []
        for outcome in run_batch(sorted(by_study), one, key=lambda s: s, desc="report"):
            if outcome.ok and outcome.result is not None:
                outputs.extend(outcome.result)
                record.add(StudyStatus(id=outcome.key, status="ok"))
            else:
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        keep = {p.name for p in outputs}
        for stale in sorted((out / STUDIES_DIR).glob("*")) if (out / STUDIES_DIR).is_dir() else []:
            if stale.is_file() and stale.name not in keep:
                stale.unlink()

        classes = summary.get("classes", {})
        class_keys = sorted(classes, key=int)
        class_rows = [[k, c.get("name"), c.get("n"), html.mean_std(c.get("dice")),
                       html.num((c.get("dice") or {}).get("median"), digits=3),
                       html.mean_std(c.get("hd95"), digits=2), (c.get("hd95") or {}).get("n_nan", 0)]
                      for k, c in ((k, classes[k]) for k in class_keys)]
        order = sorted(by_study, key=lambda s: (float(np.mean([r["dice"] for r in by_study[s]])), s))
        study_rows = []
        for sid in order:
            per_class = {str(r["class"]): r for r in by_study[sid]}
            study_rows.append([
                html.link(f"{STUDIES_DIR}/{names[sid]}.html", sid),
                html.num(float(np.mean([r["dice"] for r in by_study[sid]]))),
                *[html.num(per_class[k]["dice"] if k in per_class else None) for k in class_keys],
                *[html.num(per_class[k]["hd95"] if k in per_class else None, digits=2) for k in class_keys],
            ])
        notes = [f"Empty-set policy: {summary.get('empty_policy', 'not stated')}",
                 f"HD percentile: {summary.get('hd_percentile')}; distances in mm from the voxel spacing",
                 f"std: {summary.get('std', 'population')}"]
        failed = [{"id": f.get("id"), "code": f.get("code"),
                   "message": _scrub(str(f.get("message")), studies[f["id"]]) if f.get("id") in studies
                   else f.get("message")} for f in summary.get("failed", [])]
        index = html.index_page(title=title, class_rows=class_rows, study_rows=study_rows,
                                class_names=[classes[k].get("name", k) for k in class_keys], failed=failed,
                                unpaired=summary.get("unpaired", {}), provenance=records, notes=notes)
        write_text_atomic(out / "index.html", index)
        return [out / "index.html", *outputs]

    return execute_stage("report", out, config=config, inputs=inputs, work=work, force=force)
