"""The report stage: per-study JSON and HTML pages (metrics, pictures); a cohort page (statistics, provenance)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.batch import run_batch
from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError, PipelineError
from pipeline.fileio import read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.inference.predictor import PREDICTIONS_JSON, prediction_paths
from pipeline.io.channels import load_channels
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.metrics.table import DECIMALS, read_per_study
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.reporting import pages
from pipeline.reporting.figures import box_plots, study_figure
from pipeline.reporting.naming import safe_name, scrub_source, study_problems, unconverted
from pipeline.reporting.provenance import provenance_section, stage_records
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

STUDIES_DIR = "studies"
STUDY_SCHEMA = 1
_STUDY_FIELDS = ("class", "class_name", "dice", "iou", "nsd", "nsd_tolerance_mm", "hd95", "assd", "volume_ref_ml",
                 "volume_pred_ml", "rel_volume_error")
_BOX_METRICS = (("dice", "Dice"), ("nsd", "NSD"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"))


def _json_number(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, DECIMALS) if math.isfinite(value) else None
    return value


def _load_optional(path: Path | None) -> Volume | None:
    return load_nifti(path) if path is not None and path.is_file() else None


def _first_channel(path: Path | None, channels: list[str] | None) -> tuple[Volume | None, list[str]]:
    """The image for a picture: of several channels (4D, channel last), the first, with a note naming it."""
    if not channels or len(channels) < 2 or path is None or not path.is_file():
        return _load_optional(path), []
    volume = load_channels(path, channels)
    return volume.with_array(volume.array[..., 0]), [f"image: channel {channels[0]} of {', '.join(channels)}"]


def _figure(image: Path | None, reference: Path | None, prediction: Path | None,
            study_id: str, *, channels: list[str] | None = None) -> tuple[bytes | None, list[str]]:
    ref = _load_optional(reference)
    pred = _load_optional(prediction)
    img, notes = _first_channel(image, channels)
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


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ManifestError(f"{path} is missing; run 'medpipe evaluate' first")
    summary = read_json(path)
    if not isinstance(summary, dict) or summary.get("task") != "segmentation" or "definitions" not in summary:
        raise ManifestError(f"{path}: not a segmentation summary of this medpipe version; run 'medpipe evaluate' "
                            "again")
    return summary


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
    from pipeline.classification.report_stage import classification_report, is_classification_evaluation

    if is_classification_evaluation(evaluation):
        return classification_report(Path(evaluation), Path(out), predictions=predictions, ingest=ingest,
                                     config=config, force=force, provenance=provenance)
    evaluation, out = Path(evaluation), Path(out)
    summary_path, per_study_path = evaluation / "summary.json", evaluation / "per_study.csv"
    _read_summary(summary_path)
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
    records, record_inputs = stage_records([Path(p) for p in provenance])
    inputs.update(record_inputs)
    title = config.report.title or f"{config.name}: segmentation report"

    def work(record: StageRecord) -> list[Path]:
        summary = _read_summary(summary_path)
        definitions = summary["definitions"]
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
                png, notes = _figure(image, reference, prediction, sid, channels=manifest.channels)
            except PipelineError as exc:
                png, notes = None, [f"no picture: {scrub_source(str(exc), study)}"]
            name = names[sid]
            written = []
            if png is not None:
                write_bytes_atomic(out / STUDIES_DIR / f"{name}.png", png)
                written.append(out / STUDIES_DIR / f"{name}.png")
            problems = study_problems(study)
            relative = prediction.relative_to(predictions).as_posix() if prediction and predictions else None
            paths = {"image": study.image if study else None,
                     "reference": study.label if study else None,
                     "prediction": relative,
                     "picture": f"{name}.png" if png is not None else None}
            metrics = [{k: _json_number(r.get(k)) for k in _STUDY_FIELDS} for r in by_study[sid]]
            document = {
                "schema_version": STUDY_SCHEMA, "id": sid,
                "segmentation": {
                    "mean_dice": _json_number(float(np.mean([r["dice"] for r in by_study[sid]]))),
                    "classes": metrics,
                    "definitions": {k: definitions.get(k) for k in ("empty_policy", "hd_percentile", "units")}},
                "problems": problems, "paths": paths, "notes": notes}
            write_json_atomic(out / STUDIES_DIR / f"{name}.json", document)
            sections = [*pages.segmentation_study_sections(study_id=sid, rows=by_study[sid], png=png,
                                                           definitions=definitions),
                        *pages.common_study_sections(problems=problems, notes=notes, paths=paths)]
            write_text_atomic(out / STUDIES_DIR / f"{name}.html",
                              pages.study_page(title=title, study_id=sid, sections=sections))
            return [*written, out / STUDIES_DIR / f"{name}.json", out / STUDIES_DIR / f"{name}.html"]

        outputs: list[Path] = []
        for outcome in run_batch(sorted(by_study), one, key=lambda s: s, desc="report",
                                  execution=config.execution):
            if outcome.ok and outcome.result is not None:
                outputs.extend(outcome.result)
                record.add(StudyStatus(id=outcome.key, status="ok"))
            else:
                record.add(StudyStatus(id=outcome.key, status="failed", code=outcome.code, message=outcome.message))
        keep = {p.name for p in outputs}
        for stale in sorted((out / STUDIES_DIR).glob("*")) if (out / STUDIES_DIR).is_dir() else []:
            if stale.is_file() and stale.name not in keep:
                stale.unlink()

        links = {sid: f"{STUDIES_DIR}/{names[sid]}.html" for sid in by_study if f"{names[sid]}.html" in keep}
        classes = summary.get("classes", {})
        class_keys = sorted(int(k) for k in classes)
        class_names = {c: str(classes[str(c)].get("name", c)) for c in class_keys}
        order = sorted(by_study, key=lambda s: (float(np.mean([r["dice"] for r in by_study[s]])), s))
        values = {class_names[c]: {m: [r[m] for r in rows if r["class"] == c] for m, _ in _BOX_METRICS}
                  for c in class_keys}
        failed = [{"id": f.get("id"), "code": f.get("code"),
                   "message": scrub_source(str(f.get("message")), studies.get(f.get("id")))}
                  for f in summary.get("failed", [])]
        not_converted = unconverted(manifest) if ingest is not None else None
        checksums = [(sid, (studies[sid].sha256.get("image") if sid in studies else None),
                      (studies[sid].sha256.get("label") if sid in studies else None),
                      record.inputs.get(f"prediction:{sid}")) for sid in sorted(by_study)]
        sections = [
            pages.segmentation_summary_section(summary),
            pages.box_plot_section(box_plots(values, metrics=_BOX_METRICS)),
            pages.worst_cases_section(summary, links),
            pages.study_table_section(by_study, order, links, class_keys, class_names),
            pages.failures_section(failed, summary.get("unpaired", {}), summary.get("unexpected_labels", [])),
            pages.ingest_section(not_converted),
            pages.definitions_section(definitions),
            provenance_section(records, config=config, checksums=checksums),
        ]
        counts = {"studies evaluated": len(by_study), "failed": len(failed),
                  **({"not converted at ingest": len(not_converted)} if not_converted is not None else {}),
                  "classes": len(class_keys)}
        write_text_atomic(out / "index.html", pages.cohort_page(title=title, sections=sections, counts=counts))
        return [out / "index.html", *outputs]

    return execute_stage("report", out, config=config, inputs=inputs, work=work, force=force)
