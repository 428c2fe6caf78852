"""Ingest's dry run: what a scan folder holds and what ingest would do with each study, writing nothing.

The same discovery as :func:`pipeline.stages.ingest.ingest` (listing, DICOM headers, series split,
SEG pairing, PHI scrubbing), stopped before any pixel is decoded: each study is ``to_convert``,
``skipped`` (with the reason) or ``failed`` (decided from its headers alone, such as a series too
large for the limits). A study listed ``to_convert`` may still fail when its pixels are decoded.
Sources are scrubbed of patient data as in the manifest; study ids are the ones ingest would write.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.collector import long_lived
from pipeline.config import PipelineConfig
from pipeline.privacy import scrubbed_logs
from pipeline.stages.ingest import discover
from pipeline.stages.ingest_listing import checked_listing, no_studies
from pipeline.stages.ingest_prefetch import HeaderPrefetch


@dataclass(frozen=True)
class SurveyedStudy:
    """One study as ingest would see it; ``reason`` is (code, message) for a skipped or failed one."""

    id: str
    source: str
    format: str
    status: str  # to_convert | skipped | failed
    label_source: str | None = None
    reason: tuple[str, str] | None = None
    channels: int | None = None  # an image of several channels (dataset.json names them)
    volume: tuple[int, int] | None = None  # ingest.split_4d: (volume, of how many) of a 4D image or series


def survey(scan_dir: Path, *, config: PipelineConfig | None = None,
           prefetch: HeaderPrefetch | None = None) -> list[SurveyedStudy]:
    """Every study under ``scan_dir`` with what ingest would do with it, in the manifest's order; nothing is
    written. Errors as ingest's for a folder that is missing, unreadable, empty or holds no study.
    ``prefetch``: as :func:`pipeline.stages.ingest.ingest`'s."""
    config = config or PipelineConfig()
    settings = config.ingest
    scan_dir = Path(scan_dir)
    with scrubbed_logs(key=settings.pseudonym_key) as logs:
        listing = checked_listing(scan_dir)
        find = partial(discover, scan_dir, listing.files, out_dir=Path(os.devnull), config=settings, previous={},
                       unreadable=listing.unreadable, links=listing.links, outputs=listing.outputs,
                       prefetch=prefetch)
        with long_lived(find) as (tasks, _, scrubber):  # tasks name an output folder; nothing is written to it
            logs.release(scrubber)
            studies = [SurveyedStudy(id=t.id, source=t.source, format=t.format, label_source=t.label_source,
                                     status="skipped" if t.skip else "failed" if t.error else "to_convert",
                                     reason=t.skip or t.error, channels=t.channels,
                                     volume=(t.volume, t.volumes) if t.volume and t.volumes else None) for t in tasks]
    if not studies:
        raise no_studies(scan_dir, listing)
    return sorted(studies, key=lambda s: (s.source, s.volume or (0, 0), s.id))


def survey_lines(studies: list[SurveyedStudy], scan_dir: Path) -> list[str]:
    """The dry run as the command prints it: counts, then one line per study."""
    converted = [s for s in studies if s.status == "to_convert"]
    formats = Counter(s.format for s in converted)
    lines = [f"ingest (dry run): {len(studies)} studies under {scan_dir}; nothing was written",
             f"  to convert: {len(converted)} ({', '.join(f'{n} {f}' for f, n in sorted(formats.items())) or 'none'}"
             f"; {sum(1 for s in converted if s.label_source)} with a label)"]
    for status in ("skipped", "failed"):
        codes = Counter(s.reason[0] for s in studies if s.status == status and s.reason)
        if codes:
            lines.append(f"  {status}: {sum(codes.values())} ("
                         + ", ".join(f"{n} {code}" for code, n in sorted(codes.items())) + ")")
    for s in studies:
        what = (f"label {s.label_source}" if s.label_source else "no label") + (
            f"; {s.channels} channels" if s.channels else "") + (
            f"; volume {s.volume[0]} of {s.volume[1]}" if s.volume else "")
        detail = f"[{s.reason[0]}] {s.reason[1]}" if s.reason else what
        lines.append(f"  {s.id}  {s.status:<10}  {s.format:<7}  {s.source}: {detail}")
    return lines
