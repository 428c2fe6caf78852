"""The ingest stage: find NIfTI, MSD and DICOM studies under a scan folder; write images, labels, manifest."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pipeline.batch import run_batch
from pipeline.classification.labels_csv import apply_class_labels
from pipeline.collector import long_lived
from pipeline.config import DEFAULT_PSEUDONYM_KEY, IngestConfig, PipelineConfig
from pipeline.errors import FileUnreadable, PackedFile, PipelineError
from pipeline.io.dicom import DicomOptions, DicomScan, DicomSeries, group_series, skip_reason
from pipeline.io.nifti import is_nifti
from pipeline.isolation import Isolation
from pipeline.limits import inflate_limit
from pipeline.manifest import Manifest, Problem, Study, load_manifest, manifest_order, pseudonym, save_manifest
from pipeline.privacy import SCRUBBED, Scrubber, scan_scrubber, scrubbed_logs
from pipeline.provenance import StageRecord, StudyStatus
from pipeline.sharding import shard_out, study_selector
from pipeline.stages.common import execute_stage
from pipeline.stages.ingest_channels import combine_channels
from pipeline.stages.ingest_headers import read_headers
from pipeline.stages.ingest_listing import (
    LeftOut,
    StageFolder,
    Unreadable,
    checked_listing,
    list_scan_files,
    listing_digest,
    no_studies,
    relative,
)
from pipeline.stages.ingest_msd import msd_tasks
from pipeline.stages.ingest_prefetch import HeaderPrefetch
from pipeline.stages.ingest_rtstruct import pair_structure_sets
from pipeline.stages.ingest_seg import pair_segmentations
from pipeline.stages.ingest_study import IngestTask, process_job, process_study
from pipeline.stages.ingest_volumes import per_study, split_parts, volume_jobs, volume_specs

__all__ = ["IngestTask", "discover", "ingest", "list_scan_files", "process_study"]

log = logging.getLogger(__name__)

# ---- discovery -----------------------------------------------------------------------------


def _too_large(series: DicomSeries, max_voxels: int) -> tuple[str, str] | None:
    """Refuse a series whose declared size (rows x columns x frames of every file) is past the maximum."""
    voxels = sum(h.rows * h.columns * h.n_frames for h in series.headers if h.pixels)
    if voxels <= max_voxels:
        return None
    first = series.headers[0]
    return "too_large", (f"{series.folder}: declares {voxels:,} voxels ({len(series.headers)} file(s), the first "
                         f"{first.rows} x {first.columns} x {first.n_frames} frame(s)), more than ingest.max_voxels = "
                         f"{max_voxels:,}; if the series is real, raise ingest.max_voxels and ingest.memory_limit_mb")


def _discover_series(root: Path, files: list[Path], *, config: IngestConfig,
                     prefetch: HeaderPrefetch | None = None) -> tuple[DicomScan, dict[Path, tuple[str, str]]]:
    """The series of ``files``, and the files set apart because reading their header failed."""
    limits = _isolation(config)
    prefetched = None if prefetch is None else prefetch.take(root, memory_limit_mb=limits.memory_limit_mb)
    headers, broken = read_headers(root, files, workers=config.workers, limits=limits,
                                   inflate_limit=inflate_limit(config.memory_limit_mb), prefetched=prefetched)
    if broken:  # (hashing every Path costs more than reading a header's worth of bytes)
        headers = [h for path, h in zip(files, headers, strict=True) if path not in broken]
    scan = group_series(headers, split_4d=config.split_4d)
    return scan, broken


def _listing_error(unreadable: Unreadable) -> tuple[str, str]:
    if unreadable.folder:
        return "folder_unreadable", (f"the folder cannot be read ({unreadable.reason}); none of its files were "
                                     "ingested. Fix its permissions and run ingest again (`find SCAN_DIR ! -readable` "
                                     "lists such folders)")
    return "entry_unreadable", (f"this entry of its folder cannot be looked at ({unreadable.reason}), so whether it "
                                "is a file or a folder is unknown; left out. Check the folder's permissions (it needs "
                                "x) or the storage and run ingest again")


_LINK_REASONS = {  # by LeftOut.code
    "link_outside_root": "a link pointing outside the scan folder; not followed, so that ingest reads only what lies "
                         "under the folder it is given. If it is part of the scan, copy what it points to into the "
                         "scan folder, or ingest the folder it points to (`find SCAN_DIR -type l` lists the links)",
    "link_dangling": "a link pointing nowhere (its target is missing, or links loop); nothing to read. Restore its "
                     "target or remove the link (`find -L SCAN_DIR -type l` lists such links)",
}


def _left_out_specs(root: Path, scan: DicomScan, broken: dict[Path, tuple[str, str]], listed: Sequence[Unreadable],
                    links: Sequence[LeftOut]) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """An entry (names withheld later) for each file, folder or folder entry that could not be read (failed),
    each link not followed and each archive not unpacked (skipped); and a problem for each series with an
    unreadable file or entry, or a file not unpacked, beside it, by series key: it may be missing slices."""
    specs = [{"format": "unknown", "source": relative(root, u.path), "withhold": True, "error": _listing_error(u)}
             for u in listed]
    specs += [{"format": "unknown", "source": relative(root, link.path), "withhold": True,
               "skip": (link.code, _LINK_REASONS[link.code])} for link in links]
    files = {relative(root, path): error for path, error in broken.items() if error[0] == FileUnreadable.code}
    specs += [{"format": "dicom", "source": rel, "withhold": True, "error": error} for rel, error in files.items()]
    specs += [{"format": "unknown", "source": relative(root, path), "withhold": True, "skip": error}
              for path, error in broken.items() if error[0] == PackedFile.code]
    entries = [relative(root, u.path) for u in listed if not u.folder]  # a file, or a folder: unknown
    counts = Counter(_parent(rel) for rel in [*files, *entries])
    blocked = Counter(_parent(relative(root, u.path)) for u in listed if u.folder)  # by the folder holding them
    packed = Counter(_parent(relative(root, path)) for path, error in broken.items() if error[0] == PackedFile.code)
    problems = {}
    for series in scan.series if counts or blocked or packed else ():
        folders = {_parent(h.rel) for h in series.headers}
        beside = sum(counts[folder] for folder in folders)
        # a folder that cannot be listed, directly in one of the series' folders or, for a series split over
        # folders, beside one of them (SE1/part1 read, SE1/part2 not): more of the series may be in it
        near = folders | ({_parent(folder) for folder in folders if folder != "."} if len(folders) > 1 else set())
        hidden = sum(blocked[folder] for folder in near)
        unpacked = sum(packed[folder] for folder in folders)  # a slice compressed on its own (IM0007.dcm.gz)
        what = [f"{beside} file(s) in this series' folder cannot be read"] if beside else []
        what += [f"{hidden} folder(s) beside or below its files cannot be listed"] if hidden else []
        what += [f"{unpacked} compressed file(s) or archive(s) in its folder were not unpacked"] if unpacked else []
        if what:
            problems[series.key] = ("dicom_unreadable_neighbour",
                                    f"{'; '.join(what)} (see the file_unreadable, entry_unreadable, folder_unreadable "
                                    "and archive_not_unpacked entries); the series may be missing slices")
    return specs, problems


def _parent(rel: str) -> str:
    """The folder of ``rel`` (relative to the scan folder), "." for the scan folder itself."""
    return rel.rpartition("/")[0] or "."


def _output_spec(rel: str, stage: str | None) -> dict[str, Any]:
    """A skipped entry for a folder inside the scan folder that a medpipe stage wrote (an earlier run's)."""
    what = (f"a medpipe {stage} output folder (its record.json says so)" if stage is not None else
            "the output folder of a medpipe run that did not finish (its config.yaml says so)")
    return {"format": "unknown", "source": rel, "id_key": rel,
            "skip": ("medpipe_output", f"{what}; left out, so "
                                       "that images medpipe wrote are not ingested again as scans. Move it out of "
                                       "the scan folder, or ingest the folder that holds only the scans")}


def _known_folders(scan: DicomScan, nifti: Sequence[str]) -> set[str]:
    """Every folder (and folder above it) that holds a file whose header was read, or a NIfTI image (``nifti``:
    their relative paths), whose path manifests show as it is (NIfTI holds no patient data to scrub by)."""
    known: set[str] = set()
    for rel in [*(h.rel for series in scan.series for h in series.headers), *nifti]:
        folder = rel.rpartition("/")[0]
        while folder and folder not in known:
            known.add(folder)
            folder = folder.rpartition("/")[0]
    return known


def discover(root: Path, files: list[Path], *, out_dir: Path, config: IngestConfig, previous: dict[str, Study],
             unreadable: Sequence[Unreadable] = (), links: Sequence[LeftOut] = (),
             outputs: Sequence[StageFolder] = (),
             prefetch: HeaderPrefetch | None = None) -> tuple[list[IngestTask], dict[str, Any], Scrubber]:
    """All tasks under ``root``, the manifest header (dataset name, labels, ignored file count) and the
    scrubber that keeps this scan's PHI out of sources and messages (task sources are already scrubbed).
    ``files``: the scan's listing, sorted (as :func:`list_scan_files` gives it); ``unreadable``: what
    that listing could not read (:func:`checked_listing`): a failed entry each; ``links``: the links it did
    not follow, ``outputs``: the medpipe output folders it left out: a skipped entry each; ``prefetch``: the
    helper reading headers since the command started (:mod:`pipeline.stages.ingest_prefetch`), if any."""
    base: dict[str, Any] = {"out_dir": str(out_dir)}
    specs: list[dict[str, Any]] = []
    header: dict[str, Any] = {"dataset": None, "labels": None, "channels": None}
    remaining = files
    if (root / "dataset.json").is_file():
        msd_specs, consumed, header = msd_tasks(root, base, set(files))
        specs += [{**s, "format": "nifti"} for s in msd_specs]
        remaining = [p for p in files if p not in consumed]
    dicom = []
    for path in remaining:
        if is_nifti(path):
            rel = relative(root, path)
            spec = {**base, "format": "nifti", "source": rel, "id_key": rel, "image_path": str(path)}
            specs += volume_specs(spec, path) if config.split_4d else [spec]
        else:
            dicom.append(path)
    scan, broken = _discover_series(root, dicom, config=config, prefetch=prefetch)
    unread, neighbours = _left_out_specs(root, scan, broken, unreadable, links)
    for path, error in sorted(broken.items()):
        if error[0] not in (FileUnreadable.code, PackedFile.code):  # not read: _left_out_specs's entries
            rel = relative(root, path)
            specs.append({**base, "format": "dicom", "source": rel, "id_key": rel, "error": error})
    accounted = {spec["id_key"] for spec in specs}  # a link that dataset.json lists: its entry is refused already
    specs += [{**base, **spec, "id_key": spec["source"]} for spec in unread if spec["source"] not in accounted]
    specs += [{**base, **_output_spec(relative(root, folder.path), folder.stage)} for folder in outputs]
    options = DicomOptions(gantry_tilt=config.gantry_tilt, irregular_slices=config.irregular_slices,
                           philips_scaling=config.philips_scaling)
    volumes = split_parts(scan) if config.split_4d else {}
    for series in scan.series:
        specs.append({**base, "format": "dicom", "source": series.folder, "id_key": series.key, "series": series,
                      "modality": series.modality, "skip": skip_reason(series), "dicom_options": options,
                      "error": _too_large(series, config.max_voxels),
                      "problems": (neighbours[series.key],) if series.key in neighbours else (),
                      **volumes.get(series.key, {})})
    specs, seg_labels = pair_segmentations(specs, pattern=config.seg_label_pattern)
    specs, rtstruct_labels = pair_structure_sets(specs, rois=config.rtstruct_rois,
                                                 pattern=config.rtstruct_label_pattern)
    if seg_labels is not None and rtstruct_labels is not None and seg_labels != rtstruct_labels:
        seg_labels = rtstruct_labels = None  # SEG segment names and the listed ROIs: not one list of values
        _label_kinds_mixed(specs)
    seg_labels = seg_labels or rtstruct_labels
    if config.channels:
        specs = combine_channels(specs, config.channels, grid=config.channel_grid)
        header["channels"] = header["channels"] or list(config.channels)
    scrubber = scan_scrubber([[h.path for h in s.headers] for s in scan.series],
                             [relative(root, p) for p in files], key=config.pseudonym_key,
                             enabled=config.scrub_phi)
    known = _known_folders(scan, [s["source"] for s in specs if s["format"] == "nifti"]) if unread else set()
    tasks = []
    taken: set[str] = set()
    for spec in specs:
        study_id, alike = _unique_id(spec.pop("id_key"), taken, key=config.pseudonym_key)
        if alike:
            spec["problems"] = (*spec.get("problems", ()), _WRITTEN_ALIKE)
        raw_source = spec["source"]
        spec.update({name: scrubber.path(spec[name]) for name in ("source", "label_source") if spec.get(name)})
        if spec.get("channel_sources"):
            spec["channel_sources"] = tuple(scrubber.path(rel) for rel in spec["channel_sources"])
        if spec.pop("withhold", False):
            spec["source"] = scrubber.withhold(raw_source, known=known)
        spec.update({name: (spec[name][0], scrubber.text(spec[name][1])) for name in ("error", "skip")
                     if spec.get(name)})
        spec["problems"] = tuple((code, scrubber.text(message)) for code, message in spec.get("problems", ()))
        tasks.append(IngestTask(id=study_id, previous=previous.get(study_id), max_voxels=config.max_voxels, **spec))
    if header["labels"] is None and seg_labels is not None:  # a dataset.json's labels come first
        header["labels"] = {value: scrubber.text(name) for value, name in seg_labels.items()}
    header["ignored_files"] = scan.ignored
    return tasks, header, scrubber


def _label_kinds_mixed(specs: list[dict[str, Any]]) -> None:
    for spec in specs:
        if spec.get("label_path") and spec.get("series") is not None:
            spec["problems"] = (*spec.get("problems", ()), (
                "label_kinds_mixed", "this scan folder's labels come from DICOM SEGs and RT structure sets whose "
                                     "names differ, so the manifest declares no label names; check that equal "
                                     "values mean the same structure in every study"))


def _unique_id(id_key: str, taken: set[str], *, key: str) -> tuple[str, bool]:
    """The study's pseudonym, added to ``taken``, and whether another study had it already.

    Two inputs whose names are written alike (a Latin-1 byte shown as ``\\xfc`` beside a name spelled with a
    backslash and ``xfc``) would share an id, so one output file and one outcome: the later one (in the
    listing's order) gets an id of its own, keyed with a counter, so that neither is lost."""
    study_id, n = pseudonym(id_key, key=key), 1
    while study_id in taken:
        n += 1
        study_id = pseudonym(f"{id_key}\x00{n}", key=key)
    taken.add(study_id)
    return study_id, n > 1


_WRITTEN_ALIKE = ("name_written_alike", "another input's name is written the same way as this one's once bytes that "
                  "are not UTF-8, or do not print, are shown as \\xNN, so this study was given an id of its own; "
                  "rename one of them to tell them apart in the manifest")


# ---- the stage -----------------------------------------------------------------------------


def _study_for(task: IngestTask, status: Literal["failed", "skipped"], code: str, message: str) -> Study:
    if task.source not in message:
        message = f"{task.source}: {message}"
    problem = Problem(code=code, message=message)
    found = [Problem(code=c, message=m) for c, m in task.problems]  # discovery's (an unreadable file beside it)
    return Study(id=task.id, source=task.source, format=task.format, status=status, label_source=task.label_source,
                 modality=task.modality, problems=[problem, *found] if status == "skipped" else found,
                 error=problem if status == "failed" else None, volume=task.volume, volumes=task.volumes)


def _previous_studies(out: Path) -> dict[str, Study]:
    if not (out / "manifest.json").is_file():
        return {}
    try:
        return load_manifest(out).by_id()
    except PipelineError as exc:
        log.warning("ignoring the existing manifest (%s); every study is converted again", exc.code)
        return {}


def _remove_orphans(out: Path, keep: set[str]) -> None:
    for folder in ("images", "labels"):
        for path in sorted((out / folder).glob("*.nii.gz")):
            if f"{folder}/{path.name}" not in keep:
                log.info("removing %s/%s: no longer produced by this scan folder", folder, path.name)
                path.unlink()


def _warn_default_key(config: IngestConfig, tasks: list[IngestTask], record: StageRecord) -> None:
    """DICOM (patient data) pseudonymised with the built-in key: anyone can recompute ids and tokens."""
    default = config.pseudonym_key == DEFAULT_PSEUDONYM_KEY
    record.extra["pseudonym_key"] = "default" if default else "private"
    if default and config.scrub_phi and any(t.format == "dicom" for t in tasks):
        log.warning("ingest.pseudonym_key is the built-in default, so anyone with medpipe can recompute the study "
                    "ids, and the tokens that replace names in paths, from a guessed patient name or path. Before "
                    "sharing outputs, set a private key (ingest.pseudonym_key in the config, or --set "
                    "ingest.pseudonym_key=...) and keep it: the ids change with the key")


def _isolation(config: IngestConfig) -> Isolation:
    return Isolation(memory_limit_mb=config.memory_limit_mb, timeout_s=config.timeout_s,
                     memory_setting="ingest.memory_limit_mb", timeout_setting="ingest.timeout_s")


def _fresh(task: IngestTask, study: Study, scrubber: Scrubber) -> Study:
    """A study converted by a worker, its problem messages (written there from file names) scrubbed."""
    known = set(task.problems)
    problems = [p if (p.code, p.message) in known else Problem(code=p.code, message=scrubber.text(p.message))
                for p in study.problems]
    return study.model_copy(update={"problems": problems})


def _studies(tasks: list[IngestTask], outcomes: dict[str, Any], scrubber: Scrubber,
             record: StageRecord) -> list[Study]:
    studies = []
    for task in tasks:
        reused = False
        if task.skip or task.error:
            status: Literal["failed", "skipped"] = "skipped" if task.skip else "failed"
            code, message = task.skip or task.error  # type: ignore[misc]
            study = _study_for(task, status, code, message)
        elif outcomes[task.id].ok:
            study, reused = outcomes[task.id].result
            study = study if reused else _fresh(task, study, scrubber)
        else:
            outcome = outcomes[task.id]
            study = _study_for(task, "failed", outcome.code or "ingest_error", scrubber.text(outcome.message or ""))
        if study.status != "ok":
            problem = study.error or study.problems[0]
            log.warning("study %s (%s) %s: [%s] %s", study.id, study.source, study.status, problem.code,
                        problem.message, extra=SCRUBBED)  # every field is the manifest's, scrubbed
        studies.append(study)
        problem = study.error or (study.problems[0] if study.status == "skipped" else None)
        record.add(StudyStatus(id=study.id, status=study.status, code=problem.code if problem else None,
                               message=problem.message if problem else None, reused=reused))
    return sorted(studies, key=manifest_order)


def ingest(scan_dir: Path, out: Path, *, config: PipelineConfig | None = None, force: bool = False,
           prefetch: HeaderPrefetch | None = None) -> dict:
    """Convert every study under ``scan_dir`` into ``out`` (images/, labels/, manifest.json, record.json).

    Accepts NIfTI files, an MSD-style dataset folder and DICOM series, mixed. Each study is
    converted in a worker process with memory and time limits; a study that cannot be
    converted (even one that crashes its worker) is recorded as failed with a code and a
    reason, and the others go on. Sources, messages and logs are scrubbed of PHI.
    """
    config = config or PipelineConfig()
    settings = config.ingest
    scan_dir, out = Path(scan_dir), shard_out(Path(out), config)
    owns = study_selector(config)
    with scrubbed_logs(key=settings.pseudonym_key) as logs:
        listing = checked_listing(scan_dir, out=out)
        files = listing.files
        digest = listing_digest(scan_dir, files, left_out=[*listing.unreadable, *listing.links, *listing.outputs])

        def work(record: StageRecord) -> list[Path]:
            previous = _previous_studies(out)
            # many objects (a header per file), no cycles, alive to the end: kept out of collections
            find = partial(discover, scan_dir, files, out_dir=out, config=settings, previous=previous,
                           unreadable=listing.unreadable, links=listing.links, outputs=listing.outputs,
                           prefetch=prefetch)
            with long_lived(find) as (tasks, header, scrubber):
                logs.release(scrubber)
                _warn_default_key(settings, tasks, record)
                if not tasks:
                    raise no_studies(scan_dir, listing)
                tasks = [t for t in tasks if owns(t.id)]  # the whole scan when unsharded
                runnable = [t for t in tasks if t.error is None and t.skip is None]
                jobs = volume_jobs(runnable, workers=settings.workers)  # a 4D image's volumes: read once
                outcomes = per_study(run_batch(jobs, process_job, key=lambda job: job[0].id, workers=settings.workers,
                                               desc="ingest", isolation=_isolation(settings),
                                               execution=config.execution))
                studies = _studies(tasks, outcomes, scrubber, record)
                manifest = Manifest(dataset=header["dataset"], labels=header["labels"], channels=header["channels"],
                                    studies=studies)
                manifest = apply_class_labels(manifest, config.data.labels_csv, root=scan_dir,  # classification
                                              partial=config.execution.shard is not None)
                outputs = [save_manifest(manifest, out)]
                keep = {p for s in studies if s.status == "ok" for p in (s.image, s.label) if p}
                _remove_orphans(out, keep)
                outputs += [out / p for p in sorted(keep)]
                record.digests.update({out / rel: s.sha256[name] for s in studies if s.status == "ok"
                                       for rel, name in ((s.image, "image"), (s.label, "label")) if rel})
                record.extra["ignored_files"] = header["ignored_files"]
                record.extra["reused_studies"] = sum(1 for s in record.studies if s.reused)
                return outputs

        labels_csv = {"labels_csv": Path(config.data.labels_csv)} if config.data.labels_csv else {}
        return execute_stage("ingest", out, config=config, inputs=labels_csv, work=work, force=force,
                             extra_hash={"scan": digest})
