"""Ingest's pairing of DICOM RT Structure Sets with the series they outline: a structure set becomes its series' label.

A structure set (one file) whose referenced series is an image series of the scan folder, the only structure
set to name it, in that series' Frame of Reference, on a series that was not split and has no DICOM SEG label,
becomes the label of that series once ``ingest.rtstruct_rois`` says which ROIs to convert (its n-th name is
label value n: :mod:`pipeline.io.dicom_rtstruct_label`). Anything else stays a skipped entry with the reason;
without ``ingest.rtstruct_rois`` the reason lists the ROIs it holds. Only headers are read here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pipeline.io.dicom_split import RT_STRUCTURE_SET_STORAGE
from pipeline.stages.ingest_claims import chosen_by_pattern, claims, glob_matches
from pipeline.stages.ingest_seg import series_frame_of_reference

RTSTRUCT = "dicom_rtstruct"
_HEADER_TAGS = ["ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "StructureSetLabel",
                "SeriesDescription"]  # not the contours


class StructureSetHeader(NamedTuple):
    series: list[str]  # the series UIDs it references
    frames: list[str]  # the Frame of Reference UIDs it references
    rois: list[str]  # its ROI names
    labels: tuple[str, ...] = ()  # its StructureSetLabel and SeriesDescription (what a pattern matches)


def _header(path: str) -> StructureSetHeader | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from pipeline.io.dicom_rtstruct_label import roi_names

    try:
        ds = pydicom.dcmread(path, specific_tags=_HEADER_TAGS)
        frames = list(ds.get("ReferencedFrameOfReferenceSequence", []) or [])
        series = [str(s.SeriesInstanceUID) for frame in frames for study in frame.get("RTReferencedStudySequence", [])
                  for s in study.get("RTReferencedSeriesSequence", []) if "SeriesInstanceUID" in s]
        uids = [str(frame.FrameOfReferenceUID) for frame in frames if "FrameOfReferenceUID" in frame]
        rois = sorted(roi_names(ds).values())
        labels = tuple(str(ds.get(key) or "") for key in ("StructureSetLabel", "SeriesDescription"))
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError, TypeError):
        return None
    return StructureSetHeader(series, uids, rois, labels)


def _file(spec: dict[str, Any]) -> str:
    return spec["series"].headers[0].rel


def _skip(spec: dict[str, Any], why: str) -> None:
    spec["skip"] = (RTSTRUCT, f"{_file(spec)}: an RT structure set; {why}")


def _texts(claim: tuple[dict[str, Any], StructureSetHeader]) -> tuple[str | None, ...]:
    """What ``ingest.rtstruct_label_pattern`` is matched against: the structure set's label, its series
    description, its file path relative to the scan folder and its file name."""
    rel = _file(claim[0])
    return *claim[1].labels, rel, rel.rpartition("/")[2]


def pair_structure_sets(specs: list[dict[str, Any]], *, rois: list[str] | None,
                        pattern: str | None = None) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """``specs`` with each structure set that labels a series moved onto that series' spec (``label_path``,
    ``label_source``, ``rtstruct_rois``), and the label names (``rois``) when one was used. ``pattern``
    (``ingest.rtstruct_label_pattern``) chooses among several structure sets of one series."""
    sets = [s for s in specs if s.get("series") is not None and s.get("skip") and len(s["series"].headers) == 1
            and s["series"].headers[0].sop_class == RT_STRUCTURE_SET_STORAGE]
    images, naming = claims(specs, sets, read=_header, skip=_skip, verb="outlines",
                            unreadable="its header cannot be read or names no series; not ingested")
    used: list[dict[str, Any]] = []
    for uid, claimed in naming.items():
        targets = images[uid]
        series = targets[0]["source"]
        claimed = chosen_by_pattern(claimed, pattern, texts=_texts, file=_file, skip=_skip, what="a structure set",
                                    series=series, setting="ingest.rtstruct_label_pattern")
        if len(claimed) > 1:
            matched = "" if pattern is None else \
                f" (ingest.rtstruct_label_pattern matches {sum(glob_matches(pattern, _texts(c)) for c in claimed)})"
            for rtstruct, _ in claimed:
                _skip(rtstruct, f"one of {len(claimed)} structure sets of series {series}; which one is its label is "
                                f"not known{matched}, so none is used: set ingest.rtstruct_label_pattern to a glob "
                                "of the label's structure set label, series description or file name, or ingest a "
                                "folder holding one of them")
            continue
        (rtstruct, header), image = claimed[0], targets[0]
        if rois is None:
            _skip(rtstruct, f"it outlines series {series} (ROIs: {', '.join(header.rois) or 'none'}); to make it the "
                            "series' label, list the ROIs to convert in ingest.rtstruct_rois (the n-th is value n)")
            continue
        why = _not_a_label(image, targets, header)
        if why is not None:
            _skip(rtstruct, why)
            continue
        image.update(label_path=rtstruct["series"].headers[0].path, label_source=_file(rtstruct),
                     rtstruct_rois=tuple(rois))
        used.append(rtstruct)
    labels = {"0": "background", **{str(value): name for value, name in enumerate(rois or [], start=1)}}
    return [s for s in specs if not any(s is u for u in used)], labels if used else None


def _not_a_label(image: dict[str, Any], targets: list[dict[str, Any]], header: StructureSetHeader) -> str | None:
    series = image["source"]
    if len(targets) > 1:
        return f"the series it outlines ({series}) was split into {len(targets)} volumes; not used as a label"
    if image.get("label_path"):
        return f"series {series} has a DICOM SEG as its label already; not used"
    frame = series_frame_of_reference(image) if header.frames else None
    if frame and frame not in header.frames:
        return (f"it names series {series}, but not the series' Frame of Reference UID (its contours are in another "
                "coordinate system); not used as a label")
    return None
