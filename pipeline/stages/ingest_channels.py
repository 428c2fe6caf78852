"""DICOM studies of several series as one image of several channels (``ingest.channels``): the ingest stage's pairing.

The image series of a scan folder are grouped by their Study Instance UID (read from each series' first
file, only when ``ingest.channels`` is set). In each study every channel's glob must match exactly one series,
by series description or folder (any case), and those series must share one Frame of Reference (the scanner's
coordinate system; series in different ones are not registered). The first channel's series then carries
the others (``channel_series``), its label and id staying its own; the study's other image series are skipped.
A study where a channel matches no series, or several, fails whole: each of its image series is a failed entry
that says which channel is missing or ambiguous. Series descriptions are matched, never written out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, NamedTuple

from pipeline.stages.ingest_claims import glob_matches

CHANNELS = "dicom_channels"
FRAMES = "dicom_channel_frames"
NOT_A_CHANNEL = "dicom_not_a_channel"
_TAGS = ["StudyInstanceUID", "FrameOfReferenceUID", "SeriesDescription"]


class SeriesIdentity(NamedTuple):
    study: str | None
    frame: str | None
    description: str


def _identity(path: str) -> SeriesIdentity:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError, TypeError):
        return SeriesIdentity(None, None, "")
    return SeriesIdentity(str(ds.get("StudyInstanceUID") or "") or None, str(ds.get("FrameOfReferenceUID") or "")
                          or None, str(ds.get("SeriesDescription") or ""))


def _sources(members: list[tuple[dict[str, Any], SeriesIdentity]]) -> str:
    """The members' folders, a series split in several parts (by orientation, echo, image type or
    ``ingest.split_4d``) named once with their count."""
    counts = Counter(spec["source"] for spec, _ in members)
    return ", ".join(source if n == 1 else f"{source} ({n} parts of one series)" for source, n in counts.items())


def _is_image(spec: dict[str, Any]) -> bool:
    return spec.get("series") is not None and not spec.get("skip") and not spec.get("error")


def combine_channels(specs: list[dict[str, Any]], channels: dict[str, str], *,
                     grid: str = "resample") -> list[dict[str, Any]]:
    """``specs`` with each study's channel series carried by its first channel's spec (``channel_series``,
    ``channel_sources``, ``channels``), the other channels' specs removed, and the rest of each study's image
    series skipped or failed with the reason (see the module docstring)."""
    studies: dict[str, list[tuple[dict[str, Any], SeriesIdentity]]] = defaultdict(list)
    for spec in specs:
        if _is_image(spec):
            identity = _identity(spec["series"].headers[0].path)
            studies[identity.study or f"folder {spec['source']}"].append((spec, identity))
    carried: set[int] = set()  # the specs of channels after the first: carried by the first's spec
    for members in studies.values():
        chosen = _chosen(members, channels)
        if chosen is not None:
            chosen[0]["channel_grid"] = grid
            carried.update(id(spec) for spec in chosen[1:])
    return [s for s in specs if id(s) not in carried]


def _chosen(members: list[tuple[dict[str, Any], SeriesIdentity]],
            channels: dict[str, str]) -> list[dict[str, Any]] | None:
    """The specs of one study's channel series, in channel order, the first carrying the others; None (every
    member failed) when a channel matches no series or several, or they lie in different frames of reference."""
    found = {name: [(spec, ident) for spec, ident in members if glob_matches(pattern, (ident.description,
                                                                                       spec["source"]))]
             for name, pattern in channels.items()}
    sources = _sources(members)
    wrong = [f"channel {name} matches " + (f"{len(hits)} of them: {_sources(hits)}" if hits else "none of them")
             for name, hits in found.items() if len(hits) != 1]
    if any(len({spec["source"] for spec, _ in hits}) < len(hits) for hits in found.values()):
        wrong.append("a series split in parts is not one channel (leave ingest.split_4d off)")
    picked = [hits[0] for hits in found.values() if len(hits) == 1]
    if not wrong and len({id(spec) for spec, _ in picked}) < len(picked):
        wrong = ["one series matches several channels"]
    if wrong:
        for spec, _ in members:
            spec["error"] = (CHANNELS, f"{spec['source']}: the channels of its study (image series {sources}) are "
                                       f"not known: {'; '.join(wrong)}. Each of ingest.channels must match exactly "
                                       "one series of a study (by description or folder)")
        return None
    frames = {ident.frame for _, ident in picked}
    if len(frames) != 1 or None in frames:
        for spec, _ in picked:
            spec["error"] = (FRAMES, f"{spec['source']}: the channel series of its study ({_sources(picked)}) lie in "
                                     "different (or unknown) Frames of Reference, so their positions cannot be "
                                     "matched; register them first")
        return None
    first = picked[0][0]
    chosen = [spec for spec, _ in picked]
    first.update(channel_series=tuple(spec["series"] for spec in chosen), channels=len(chosen),
                 channel_sources=tuple(spec["source"] for spec in chosen))
    for spec in chosen[1:]:
        if spec.get("label_path"):
            first["problems"] = (*first.get("problems", ()), ("channel_label_unused", (
                f"{spec.get('label_source')}: a label of channel series {spec['source']}, not used: a study of "
                f"several channels takes its label from the first channel's series ({first['source']})")))
    kept = {id(spec) for spec in chosen}
    for spec, _ in members:
        if id(spec) not in kept:
            spec["skip"] = (NOT_A_CHANNEL, f"{spec['source']}: an image series of a study whose channels are "
                                           f"{', '.join(c['source'] for c in chosen)}; it matches none of "
                                           "ingest.channels, so it is not used")
    return chosen
