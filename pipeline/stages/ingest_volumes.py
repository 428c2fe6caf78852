"""``ingest.split_4d``: a study per volume of a 4D source (fMRI, dynamic or repeated acquisitions), each recorded
as volume N of M in the manifest. DICOM series are split by ``pipeline.io.dicom_split`` (parts ``tNNNN``, in
acquisition order); a 4D NIfTI image by the 4th axis of its data, whose header is read at discovery. The volumes
of one 4D NIfTI image (or of one enhanced multi-frame DICOM file) are converted by one worker job
(:func:`volume_jobs`), which reads the file once for all of them; its outcome is each volume's (:func:`per_study`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.batch import Outcome
from pipeline.io.dicom import DicomScan
from pipeline.io.dicom_split import split_volume
from pipeline.io.nifti import declared_shape
from pipeline.manifest import Study
from pipeline.stages.ingest_study import IngestTask, shared_source


def volume_specs(spec: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """``ingest.split_4d``: a study per volume of a 4D NIfTI image (its header read here), else ``spec`` alone."""
    shape = declared_shape(path) or ()
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton axes, as load_nifti squeezes them
        shape = shape[:-1]
    if len(shape) != 4 or shape[3] < 2:
        return [spec]
    return [{**spec, "id_key": f"{spec['id_key']}/t{t:04d}", "volume": t, "volumes": shape[3]}
            for t in range(1, shape[3] + 1)]


def split_parts(scan: DicomScan) -> dict[str, dict[str, int]]:
    """``{"volume", "volumes"}`` by series key, for each volume that ``ingest.split_4d`` made a series of."""
    parts: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for series in scan.series:
        volume = split_volume(series.part)
        if volume is not None:
            parts.setdefault((series.uid, series.part.rpartition("/")[0]), []).append((series.key, volume))
    return {key: {"volume": volume, "volumes": len(members)}
            for members in parts.values() for key, volume in members}


MIN_VOLUMES_PER_JOB = 8  # a 4D image is split over idle workers in parts of at least this many volumes


def volume_jobs(tasks: Sequence[IngestTask], *, workers: int = 1) -> list[tuple[IngestTask, ...]]:
    """``tasks`` as worker jobs (``ingest_study.process_job``), in order: the volumes of one source (a 4D NIfTI
    image, an enhanced multi-frame DICOM file: ``shared_source``) together, at the place of the first; every
    other study alone. A job's time limit covers all its volumes.

    With fewer jobs than ``workers``, the largest volume job is halved (parts of consecutive volumes, each
    of at least MIN_VOLUMES_PER_JOB) until every worker has a job: each part reads the file again, but a
    single long fMRI run is then written by all the workers, not one."""
    jobs: list[list[IngestTask]] = []
    by_source: dict[tuple[str, ...], list[IngestTask]] = {}
    for task in tasks:
        source = shared_source(task)
        if source is None:
            jobs.append([task])
            continue
        if source not in by_source:
            by_source[source] = []
            jobs.append(by_source[source])
        by_source[source].append(task)
    while len(jobs) < workers:
        largest = max(range(len(jobs)), key=lambda i: (len(jobs[i]), -i), default=None)
        if largest is None or len(jobs[largest]) < 2 * MIN_VOLUMES_PER_JOB:
            break
        job = jobs[largest]
        jobs[largest:largest + 1] = [job[:len(job) // 2], job[len(job) // 2:]]
    return [tuple(job) for job in jobs]


def per_study(outcomes: Iterable[Outcome[tuple[IngestTask, ...], list[tuple[Study, bool]]]]
              ) -> dict[str, Outcome[IngestTask, tuple[Study, bool]]]:
    """The outcome of each study of the jobs' ``outcomes``, by study id: its own result, or its job's failure
    (a crash, a time-out or an unreadable file fails every volume of that file, with the same code)."""
    studies: dict[str, Outcome[IngestTask, tuple[Study, bool]]] = {}
    for outcome in outcomes:
        job, message = outcome.item, outcome.message
        if not outcome.ok and len(job) > 1:  # a time-out, say, is the whole job's: say which volumes shared it
            message = (f"{message or ''} (volumes {job[0].volume}-{job[-1].volume} of {job[0].volumes} of this "
                       "source were converted together, reading it once)")
        results = outcome.result if outcome.ok else [None] * len(job)
        for task, result in zip(job, results, strict=True):  # type: ignore[arg-type]
            studies[task.id] = Outcome(item=task, key=task.id, result=result, code=outcome.code, message=message)
    return studies
