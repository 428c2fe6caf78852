"""The classification report stage: a cohort page (metrics, confusion, calibration), per-study pages with Grad-CAM."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classification.evaluate_stage import CONFUSION_PNG, PER_STUDY_CSV, RELIABILITY_PNG, SUMMARY_JSON
from pipeline.classification.inference import CLASSIFICATION_JSON, EXPLANATIONS, PREDICTIONS_CSV
from pipeline.config import PipelineConfig
from pipeline.errors import ManifestError
from pipeline.fileio import read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.reporting import classification_pages as cp
from pipeline.reporting import pages
from pipeline.reporting.naming import safe_name, scrub_source, study_problems, unconverted
from pipeline.reporting.provenance import provenance_section, stage_records
from pipeline.stages.common import execute_stage

log = logging.getLogger(__name__)

STUDIES_DIR = "studies"
STUDY_SCHEMA = 1


def is_classification_evaluation(evaluation: str | Path) -> bool:
    """True when ``evaluation`` holds a summary.json written by the classification evaluate stage."""
    path = Path(evaluation) / SUMMARY_JSON
    if not path.is_file():
        return False
    try:
        summary = read_json(path)
    except ValueError:
        return False
    return isinstance(summary, dict) and summary.get("task") == "classification"


def _read_rows(path: Path, classes: dict[str, str]) -> list[dict[str, Any]]:
    """per_study.csv rows as {study, label, predicted, probs}."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = [f"prob_{classes[str(i)]}" for i in range(len(classes))]
    return [{"study": r["study"], "label": int(r["label"]) if r["label"] != "" else None,
             "predicted": int(r["predicted"]), "probs": [float(r[c]) for c in columns]} for r in rows]


def classification_report(evaluation: Path, out: Path, *, predictions: Path | None = None, ingest: Path | None = None,
                          config: PipelineConfig | None = None, force: bool = False,
                          provenance: list[Path] | tuple[Path, ...] = ()) -> dict[str, Any]:
    """Write ``index.html`` and ``studies/<id>.{json,html,png}`` from a classification evaluate folder.

    ``predictions`` (the infer folder) gives the Grad-CAM pictures; ``ingest`` the ingest
    problems; ``provenance`` the stage folders of the provenance block. Studies appear only by id.
    """
    config = config or PipelineConfig()
    evaluation, out = Path(evaluation), Path(out)
    if not is_classification_evaluation(evaluation):
        raise ManifestError(f"{evaluation / SUMMARY_JSON} is missing or not a classification summary; run "
                            "'medpipe evaluate' first")
    inputs: dict[str, Path] = {"summary": evaluation / SUMMARY_JSON, "per_study": evaluation / PER_STUDY_CSV}
    for name in (RELIABILITY_PNG, CONFUSION_PNG):
        if (evaluation / name).is_file():
            inputs[name] = evaluation / name
    pictures: dict[str, Path] = {}
    if predictions is not None:
        predictions = Path(predictions)
        for name in (PREDICTIONS_CSV, CLASSIFICATION_JSON):
            if (predictions / name).is_file():
                inputs[f"predictions:{name}"] = predictions / name
        pictures = {p.name[:-len(".png")]: p for p in sorted((predictions / EXPLANATIONS).glob("*.png"))}
        inputs.update({f"explanation:{sid}": p for sid, p in pictures.items()})
    manifest = Manifest()
    if ingest is not None:
        manifest = load_manifest(Path(ingest))
        inputs["manifest"] = Path(ingest) / MANIFEST_NAME
    records, record_inputs = stage_records([Path(p) for p in provenance])
    inputs.update(record_inputs)
    title = config.report.title or f"{config.name}: classification report"

    def work(record: StageRecord) -> list[Path]:
        summary = read_json(evaluation / SUMMARY_JSON)
        classes = summary.get("classes", {})
        rows = _read_rows(evaluation / PER_STUDY_CSV, classes)
        studies = manifest.by_id()
        names = {r["study"]: safe_name(r["study"]) for r in rows}
        if len(set(names.values())) != len(names):
            raise ManifestError("two study ids map to one report file name; ids must be unique")

        def one(row: dict[str, Any]) -> list[Path]:
            sid, name = row["study"], names[row["study"]]
            study = studies.get(sid)
            png = pictures[sid].read_bytes() if sid in pictures else None
            written = []
            if png is not None:
                write_bytes_atomic(out / STUDIES_DIR / f"{name}.png", png)
                written.append(out / STUDIES_DIR / f"{name}.png")
            problems = study_problems(study)
            notes = [] if png is not None else ["no Grad-CAM picture: inference ran without explanations"]
            paths = {"image": study.image if study else None, "picture": f"{name}.png" if png is not None else None}
            label, predicted = row["label"], row["predicted"]
            document = {
                "schema_version": STUDY_SCHEMA, "id": sid,
                "classification": {
                    "label": label, "label_name": None if label is None else classes.get(str(label)),
                    "predicted": predicted, "predicted_name": classes.get(str(predicted)),
                    "correct": None if label is None else label == predicted,
                    "probabilities": {classes.get(str(i), str(i)): p for i, p in enumerate(row["probs"])},
                    "operating_point": summary.get("operating_point")},
                "problems": problems, "paths": paths, "notes": notes}
            write_json_atomic(out / STUDIES_DIR / f"{name}.json", document)
            sections = [*cp.study_sections(study_id=sid, classes=classes, probabilities=row["probs"],
                                           predicted=predicted, label=label, gradcam_png=png),
                        *pages.common_study_sections(problems=problems, notes=notes, paths=paths)]
            write_text_atomic(out / STUDIES_DIR / f"{name}.html",
                              pages.study_page(title=title, study_id=sid, sections=sections))
            return [*written, out / STUDIES_DIR / f"{name}.json", out / STUDIES_DIR / f"{name}.html"]

        outputs: list[Path] = []
        for row in rows:  # light work (a PNG copy and two small files per study): no worker processes
            outputs.extend(one(row))
            record.add(StudyStatus(id=row["study"], status="ok"))
        keep = {p.name for p in outputs}
        for stale in sorted((out / STUDIES_DIR).glob("*")) if (out / STUDIES_DIR).is_dir() else []:
            if stale.is_file() and stale.name not in keep:
                stale.unlink()
        links = {r["study"]: f"{STUDIES_DIR}/{names[r['study']]}.html" for r in rows}
        order = sorted(rows, key=lambda r: (r["label"] is None, r["label"] == r["predicted"],
                                            -float(np.max(r["probs"])), r["study"]))
        figure = {n: (evaluation / n).read_bytes() if (evaluation / n).is_file() else None
                  for n in (RELIABILITY_PNG, CONFUSION_PNG)}
        failed = [{"id": f.get("id"), "code": f.get("code"),
                   "message": scrub_source(str(f.get("message")), studies.get(str(f.get("id"))))}
                  for f in summary.get("failed", [])]
        not_converted = unconverted(manifest) if ingest is not None else None
        checksums = [(r["study"], studies[r["study"]].sha256.get("image") if r["study"] in studies else None, None,
                      record.inputs.get(f"explanation:{r['study']}")) for r in rows]
        sections = [cp.metrics_section(summary), cp.confusion_section(summary, figure[CONFUSION_PNG]),
                    cp.calibration_section(summary, figure[RELIABILITY_PNG]),
                    cp.studies_section(order, links, classes), cp.failures_section(summary, failed),
                    pages.ingest_section(not_converted),
                    cp.definitions_section(summary), provenance_section(records, config=config, checksums=checksums)]
        counts = {"studies scored": len(summary.get("studies", [])), "unlabelled": len(summary.get("unlabelled", [])),
                  "failed": len(failed),
                  **({"not converted at ingest": len(not_converted)} if not_converted is not None else {}),
                  "classes": len(classes)}
        write_text_atomic(out / "index.html", pages.cohort_page(title=title, sections=sections, counts=counts))
        return [out / "index.html", *outputs]

    return execute_stage("report", out, config=config, inputs=inputs, work=work, force=force,
                         extra_hash={"task": "classification"})
