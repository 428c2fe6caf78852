"""DICOM SEG for every prediction of an infer folder, each on the DICOM series it was predicted from.

The ingest manifest keeps no path to a source file (privacy), so the scan folder is given again and
its series are found as ingest found them (:func:`pipeline.stages.ingest.discover`): the same listing, the
same grouping and the same keyed ids, so a prediction ``<id>.nii.gz`` meets its series by id. That needs the
ingest's ``pseudonym_key`` (from the config, as ingest took it). Each SEG is written atomically to
``OUT/<id>.dcm``; ``OUT/export.json`` lists what was written, what failed (code and message, paths scrubbed
as ingest scrubs them) and the predictions whose series is not in the scan folder.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError, StageError
from pipeline.export.dicom_seg import export_dicom_seg
from pipeline.fileio import write_json_atomic
from pipeline.inference.predictor import read_predictions
from pipeline.stages.ingest import discover
from pipeline.stages.ingest_listing import scan_listing

log = logging.getLogger(__name__)

EXPORT_JSON = "export.json"


def export_predictions_as_seg(scan: Path, predictions: Path, out: Path, *, config: PipelineConfig | None = None,
                              label_names: dict[str, str] | None = None,
                              series_description: str = "medpipe segmentation",
                              content_datetime: datetime | None = None) -> dict[str, Any]:
    """Write ``OUT/<id>.dcm`` for each prediction in the infer folder ``predictions`` whose DICOM series is in
    ``scan``; return (and write to ``OUT/export.json``) the exported, failed and unmatched ids."""
    config = config or PipelineConfig()
    scan, predictions, out = Path(scan), Path(predictions), Path(out)
    index = read_predictions(predictions)
    names = label_names or (index.get("model") or {}).get("labels")
    listing = scan_listing(scan, exclude=out.resolve())
    tasks, _, scrubber = discover(scan, listing.files, out_dir=out, config=config.ingest, previous={},
                                  unreadable=listing.unreadable, links=listing.links, outputs=listing.outputs)
    series = {t.id: t for t in tasks if t.series is not None and t.skip is None and t.error is None}
    wanted = [entry for entry in index["predictions"] if entry.get("prediction")]
    if wanted and not any(entry["id"] in series for entry in wanted):
        raise StageError(f"none of the {len(wanted)} predictions in {predictions} is of a DICOM series in {scan}: "
                         "is it the scan folder that was ingested, and is ingest.pseudonym_key the one ingest used "
                         "(pass its config with --config)?", code="seg_no_match")
    result: dict[str, Any] = {"exported": [], "failed": [], "not_in_scan": []}
    for entry in wanted:
        task = series.get(entry["id"])
        if task is None:
            result["not_in_scan"].append(entry["id"])
            continue
        try:
            written = export_dicom_seg(task.series, predictions / str(entry["prediction"]),  # type: ignore[arg-type]
                                       out / f"{task.id}.dcm", label_names=names,
                                       series_description=series_description, content_datetime=content_datetime)
        except PipelineError as exc:
            message = scrubber.text(str(exc))
            log.warning("export-seg: %s failed: [%s] %s", task.id, exc.code, message)
            result["failed"].append({"id": task.id, "code": exc.code, "message": message})
            continue
        result["exported"].append({"id": task.id, "source": task.source, "seg": f"{task.id}.dcm",
                                   "frames": written["frames"], "segments": written["segments"]})
    write_json_atomic(out / EXPORT_JSON, result)
    return result
