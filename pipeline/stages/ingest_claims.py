"""Which image series of a scan folder each label object (a DICOM SEG, an RT structure set) claims to label."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Protocol, TypeVar


class _Referencing(Protocol):
    @property
    def series(self) -> list[str]: ...


H = TypeVar("H", bound=_Referencing)
Spec = dict[str, Any]
Images = dict[str, list[Spec]]


def image_series(specs: list[Spec]) -> Images:
    """Series UID -> the specs of its image parts that ingest converts (more than one when it was split)."""
    images: Images = defaultdict(list)
    for spec in specs:
        if spec.get("series") is not None and spec.get("skip") is None:
            images[spec["series"].uid].append(spec)
    return images


def claims(specs: list[Spec], objects: list[Spec], *, read: Callable[[str], H | None],
           skip: Callable[[Spec, str], None], unreadable: str,
           verb: str) -> tuple[Images, dict[str, list[tuple[Spec, H]]]]:
    """(image series UID -> its image specs, as :func:`image_series`; image series UID -> the ``objects`` (with
    their headers, ``read`` from their one file) that name it and no other series of the folder). An object
    whose header ``read`` cannot give, or that names none or several of the folder's series, is skipped with
    the reason (``verb``: what it does to a series, "segments"). No objects: nothing is read."""
    if not objects:
        return {}, {}
    images = image_series(specs)
    naming: dict[str, list[tuple[Spec, H]]] = defaultdict(list)
    for spec in objects:
        header = read(spec["series"].headers[0].path)
        if header is None:
            skip(spec, unreadable)
            continue
        here = [uid for uid in dict.fromkeys(header.series) if uid in images]
        if len(here) != 1:
            skip(spec, f"the series it {verb} is not an image series ingested from this scan folder; not used"
                 if not here else f"it {verb} {len(here)} series of this scan folder at once; not used")
            continue
        naming[here[0]].append((spec, header))
    return images, naming


def glob_matches(pattern: str, texts: Sequence[str | None]) -> bool:
    """Whether ``pattern`` (a glob, case-insensitive) matches any of ``texts``."""
    return any(fnmatchcase(text.lower(), pattern.lower()) for text in texts if text)


def chosen_by_pattern(claimed: list[tuple[Spec, H]], pattern: str | None, *,
                      texts: Callable[[tuple[Spec, H]], Sequence[str | None]], file: Callable[[Spec], str],
                      skip: Callable[[Spec, str], None], what: str, series: str,
                      setting: str) -> list[tuple[Spec, H]]:
    """The label objects of one series, narrowed to the one ``pattern`` matches (on ``texts``: its description,
    path, file name) when exactly one does, the others skipped naming it; all of them otherwise."""
    if pattern is None or len(claimed) < 2:
        return claimed
    chosen = [claim for claim in claimed if glob_matches(pattern, texts(claim))]
    if len(chosen) != 1:
        return claimed
    for spec, _ in claimed:
        if spec is not chosen[0][0]:
            skip(spec, f"{what} of series {series} that {setting} does not match; the one it matches, "
                       f"{file(chosen[0][0])}, is the series' label")
    return chosen
