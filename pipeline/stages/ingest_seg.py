"""Ingest's pairing of DICOM SEG objects with the series they segment: a SEG becomes its series' label.

A SEG (one file) whose ReferencedSeriesSequence names a series of the same scan folder, the only SEG to name
it, and a series that was not split into parts, is that series' label: its own entry leaves the manifest and
the series' study gets ``label_source`` (the SEG's path) and, once converted, ``labels/<id>.nii.gz`` on the
series' grid (:mod:`pipeline.io.dicom_seg_label`). Anything else stays a skipped ``dicom_segmentation``
entry, with the reason: the series it names is not here; several SEGs name it (which one is the label is
not known, unless ``ingest.seg_label_pattern`` matches exactly one of them; and SEGs that medpipe export-seg
wrote step aside for a single other one); the series was split;
or the SEG's Frame of Reference UID is not the series' (a SEG edited or made for another acquisition). Only
headers are read here; pixels are decoded in the study's worker. Segment numbers are the label's values,
unless SEGs number the same names differently: then the names decide (:func:`_label_names`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

from pipeline.stages.ingest_claims import chosen_by_pattern, claims, glob_matches

SEGMENTATION = "dicom_segmentation"
_HEADER_TAGS = ["ReferencedSeriesSequence", "SegmentSequence", "Manufacturer", "FrameOfReferenceUID",
                "SeriesDescription"]  # not the per-frame groups nor the pixels


class SegHeader(NamedTuple):
    """What pairing reads of a SEG's header."""

    series: list[str]  # the series UIDs it references
    names: dict[str, str]  # segment names by number
    ours: bool  # written by medpipe export-seg
    frame_of_reference: str | None
    description: str  # its SeriesDescription ("" when none)


def _references(path: str) -> SegHeader | None:
    """The SEG's header as pairing needs it, or None when it names no referenced series or no segments."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, specific_tags=_HEADER_TAGS)
        uids = [str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])
                if "SeriesInstanceUID" in item]
        names = {str(int(s.SegmentNumber)): str(s.get("SegmentLabel", "") or f"segment_{int(s.SegmentNumber)}")
                 for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) != 0}  # 0: a LABELMAP's background
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError, TypeError):
        return None
    return SegHeader(uids, names, str(ds.get("Manufacturer", "")) == "medpipe", _frame_of_reference(ds),
                     str(ds.get("SeriesDescription", "") or "").strip()) if uids and names else None


def _frame_of_reference(ds: Any) -> str | None:
    value = str(ds.get("FrameOfReferenceUID", "") or "").strip()
    return value or None


def series_frame_of_reference(spec: dict[str, Any]) -> str | None:
    """The FrameOfReferenceUID of the series' first file, None when it has none or cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return _frame_of_reference(pydicom.dcmread(spec["series"].headers[0].path, stop_before_pixels=True,
                                                   specific_tags=["FrameOfReferenceUID"]))
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError, TypeError):
        return None


_FROM_MEDPIPE = ("dicom_seg_from_medpipe", "its label is a DICOM SEG that medpipe export-seg wrote: a model's "
                 "prediction, unless reference labels were exported with it; check before training or evaluating "
                 "on it")


def _file(spec: dict[str, Any]) -> str:
    """The SEG's file, relative to the scan folder (a series' source is its folder)."""
    return spec["series"].headers[0].rel


def _skip(spec: dict[str, Any], why: str) -> None:
    spec["skip"] = (SEGMENTATION, f"{_file(spec)}: a DICOM SEG object; {why}")


def _texts(claim: tuple[dict[str, Any], SegHeader]) -> tuple[str | None, ...]:
    """What ``ingest.seg_label_pattern`` is matched against: the SEG's series description, its file path
    relative to the scan folder, its file name."""
    rel = _file(claim[0])
    return claim[1].description, rel, rel.rpartition("/")[2]


def _matching(claims: list[tuple[dict[str, Any], SegHeader]], series: str,
              pattern: str | None) -> list[tuple[dict[str, Any], SegHeader]]:
    return chosen_by_pattern(claims, pattern, texts=_texts, file=_file, skip=_skip, what="a segmentation",
                             series=series, setting="ingest.seg_label_pattern")


def _predictions_aside(claims: list[tuple[dict[str, Any], SegHeader]],
                       series: str) -> list[tuple[dict[str, Any], SegHeader]]:
    """The SEGs of one series, less those medpipe export-seg wrote when exactly one other SEG is left: predictions
    written back beside the scans do not hide the reference segmentation."""
    reference = [claim for claim in claims if not claim[1].ours]
    if len(claims) == 1 or len(reference) != 1:
        return claims
    for seg, header in claims:
        if header.ours:
            _skip(seg, f"a segmentation of series {series} that medpipe export-seg wrote (a prediction); the "
                       f"series' other SEG, {_file(reference[0][0])}, is its label")
    return reference


def pair_segmentations(specs: list[dict[str, Any]], *,
                       pattern: str | None = None) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """``specs`` with each SEG that labels a series of the scan folder moved onto that series' spec (``label_path``,
    ``label_source``), and the label names they declare (``{"0": "background", "1": "Liver"}``) when every
    such SEG declares the same names, else None. ``pattern`` (``ingest.seg_label_pattern``) chooses among
    several SEGs of one series."""
    segs = [s for s in specs if s.get("skip") and s["skip"][0] == SEGMENTATION and len(s["series"].headers) == 1]
    images, naming = claims(specs, segs, read=_references, skip=_skip, verb="segments",
                            unreadable="its header names no referenced series or no segments; not ingested")
    used: list[dict[str, Any]] = []
    declared: list[tuple[dict[str, Any], dict[str, str]]] = []
    for uid, claimed in naming.items():
        targets = images[uid]
        claimed = _predictions_aside(_matching(claimed, targets[0]["source"], pattern), targets[0]["source"])
        if len(claimed) > 1:
            matched = "" if pattern is None else \
                f" (ingest.seg_label_pattern matches {sum(glob_matches(pattern, _texts(c)) for c in claimed)} of them)"
            for seg, _ in claimed:
                _skip(seg, f"one of {len(claimed)} segmentations of series {targets[0]['source']}; which one is its "
                           f"label is not known{matched}, so none is used: set ingest.seg_label_pattern to a glob "
                           "of the label's series description or file name, or ingest a folder holding one of them")
            continue
        if len(targets) > 1:
            _skip(claimed[0][0], f"the series it segments ({targets[0]['source']}) was split into "
                                 f"{len(targets)} volumes; not used as a label")
            continue
        (seg, header), image = claimed[0], targets[0]
        series_frame = series_frame_of_reference(image) if header.frame_of_reference else None
        if series_frame and series_frame != header.frame_of_reference:
            _skip(seg, f"it names series {image['source']}, but its Frame of Reference UID differs from the "
                       "series' (its positions are in another coordinate system); not used as a label")
            continue
        image.update(label_path=seg["series"].headers[0].path, label_source=_file(seg))
        if header.ours:
            image["problems"] = (*image.get("problems", ()), _FROM_MEDPIPE)
        used.append(seg)
        declared.append((image, header.names))
    return [s for s in specs if not any(s is u for u in used)], _label_names(declared)


def _by_number(names: dict[str, str]) -> dict[str, str]:
    return dict(sorted(names.items(), key=lambda item: int(item[0])))


def _label_names(declared: list[tuple[dict[str, Any], dict[str, str]]]) -> dict[str, str] | None:
    """The manifest's label names for the SEGs used as labels, or None. Where SEGs number the same names
    differently (a study without one structure: its SEG has one segment fewer, and the later ones move
    up), each such image spec gets ``seg_values`` (segment number -> label value) so that one name is one
    value in every study, with a ``dicom_seg_renumbered`` problem; where that cannot be decided, each
    image gets ``dicom_seg_names_differ`` instead."""
    if not declared:
        return None
    if all(names == declared[0][1] for _, names in declared):
        return {"0": "background", **_by_number(declared[0][1])}
    reference = _reference_names([names for _, names in declared])
    if reference is None:
        for image, names in declared:
            shown = ", ".join(f"{value} {name}" for value, name in _by_number(names).items())
            image["problems"] = (*image.get("problems", ()), (
                "dicom_seg_names_differ", f"the DICOM SEGs of this scan folder name their segments differently "
                                          f"(this one: {shown}), and no SEG names every structure, so the manifest "
                                          "declares no label names; check that equal values mean the same structure "
                                          "in every study"))
        return None
    values = {name.casefold(): int(number) for number, name in reference.items()}
    for image, names in declared:
        mapping = {int(number): values[name.casefold()] for number, name in names.items()}
        moved = {number: value for number, value in mapping.items() if number != value}
        if moved:
            image["seg_values"] = tuple(sorted(mapping.items()))
            shown = ", ".join(f"{names[str(n)]} {n} -> {v}" for n, v in sorted(moved.items()))
            image["problems"] = (*image.get("problems", ()), (
                "dicom_seg_renumbered", f"its SEG numbers its segments unlike the scan folder's other SEGs; the "
                                        f"label's values follow the segment names: {shown}"))
    return {"0": "background", **_by_number(reference)}


def _reference_names(named: list[dict[str, str]]) -> dict[str, str] | None:
    """The numbering of the SEGs that name every structure of the folder (the most common one among them), or
    None: a SEG names two segments alike (case aside), or no SEG names them all (then "Liver" in one and
    "Liver_1" in another may be one structure spelt two ways, not two)."""
    folded = [{number: name.casefold() for number, name in names.items()} for names in named]
    if any(len(set(f.values())) != len(f) for f in folded):
        return None
    every = set().union(*(f.values() for f in folded))
    numberings = [tuple(sorted((int(n), name) for n, name in f.items())) for f in folded]
    full = Counter(numbering for numbering, f in zip(numberings, folded, strict=True) if set(f.values()) == every)
    if not full:
        return None
    return named[numberings.index(max(sorted(full), key=full.__getitem__))]
