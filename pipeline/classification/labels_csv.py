"""Class labels from a CSV (columns ``study`` and ``label``): reading, validation, and applying them to a manifest."""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import ManifestError
from pipeline.io.nifti import nifti_stem
from pipeline.manifest import Manifest, Study

log = logging.getLogger(__name__)

STUDY_COLUMN = "study"
LABEL_COLUMN = "label"
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class LabelRow:
    """One CSV row: the study as written (normalised), its class index and the line it is on."""

    study: str
    label: int
    line: int


@dataclass(frozen=True)
class LabelTable:
    """A validated labels CSV: its rows and the class names (``{"0": name, ...}``) its labels use."""

    path: Path
    rows: tuple[LabelRow, ...]
    classes: dict[str, str]


def _error(path: Path, line: int | None, message: str, *, code: str) -> ManifestError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return ManifestError(f"labels CSV {where}: {message}", code=code)


def _normalise(value: str, root: Path | None) -> str:
    """The study as a posix path relative to ``root`` (backslashes, ``./`` and absolute paths inside root undone)."""
    text = value.strip().replace("\\", "/")
    if root is not None and text.startswith("/"):
        try:
            text = Path(text).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return text
    return PurePosixPath(text).as_posix() if text else text


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _class_index(raw: list[tuple[str, int]], path: Path,
                 known: dict[str, str] | None) -> tuple[dict[str, int], dict[str, str]]:
    """``({raw label: class index}, classes)``: integers as they are, or names numbered in sorted order."""
    kinds: dict[str, str] = {}
    for value, line in raw:
        number = _number(value)
        if _INTEGER.fullmatch(value) or (number is not None and math.isfinite(number) and number == int(number)):
            if number is not None and number < 0:
                raise _error(path, line, f"label '{value}' is negative; class labels are integers 0..K-1 or class "
                                         "names", code="labels_csv_bad_label")
            kinds[value] = "integer"
        elif number is not None:
            raise _error(path, line, f"label '{value}' is not an integer; class labels are integers 0..K-1 or "
                                     "class names (e.g. normal, tumour)", code="labels_csv_bad_label")
        else:
            kinds[value] = "name"
    first_value, first_line = raw[0]
    for value, line in raw:
        if kinds[value] != kinds[first_value]:
            raise _error(path, line, f"label '{value}' is a {kinds[value]} but line {first_line} gives the "
                                     f"{kinds[first_value]} '{first_value}'; use integers 0..K-1 or class names "
                                     "throughout", code="labels_csv_bad_label")
    if kinds[first_value] == "integer":
        index = {value: int(float(value)) for value, _ in raw}
        if known is not None:
            for value, line in raw:
                if str(index[value]) not in known:
                    raise _error(path, line, f"class {index[value]} is not one of the known classes "
                                             f"{', '.join(sorted(known, key=int))}", code="labels_csv_unknown_class")
            return index, dict(known)
        present = sorted(set(index.values()))
        gaps = sorted(set(range(present[-1] + 1)) - set(present))
        if gaps:
            log.warning("labels CSV %s: no study has class %s (classes are numbered 0..%d)", path.name,
                        ", ".join(map(str, gaps)), present[-1])
        return index, {str(i): f"class_{i}" for i in present}
    if known is not None:
        by_name = {name: int(key) for key, name in known.items()}
        for value, line in raw:
            if value not in by_name:
                raise _error(path, line, f"unknown class name '{value}'; the known classes are "
                                         f"{', '.join(sorted(by_name))}", code="labels_csv_unknown_class")
        return {value: by_name[value] for value, _ in raw}, dict(known)
    names = sorted({value for value, _ in raw})
    return {name: i for i, name in enumerate(names)}, {str(i): name for i, name in enumerate(names)}


def read_labels_csv(path: str | Path, *, root: str | Path | None = None,
                    known_classes: dict[str, str] | None = None) -> LabelTable:
    """Read and validate a labels CSV: header with ``study`` and ``label``, one row per study, integer or named labels.

    Integer labels are class indices (named ``class_<i>``); names are numbered 0..K-1 in sorted
    order. ``known_classes`` (``{"0": name, ...}``) restricts the labels to those classes.
    Errors name the file, the line and the fix.
    """
    path = Path(path)
    root_path = Path(root) if root is not None else None
    if not path.is_file():
        raise _error(path, None, "no such file; set data.labels_csv to a CSV with columns 'study' and 'label'",
                     code="labels_csv_missing")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            columns = [c.strip().lower() for c in header or []]
            if STUDY_COLUMN not in columns or LABEL_COLUMN not in columns:
                found = ", ".join(repr(c) for c in columns if c) or "none"
                raise _error(path, 1, f"the header needs columns '{STUDY_COLUMN}' and '{LABEL_COLUMN}' (found "
                                      f"{found}); write a first line 'study,label'", code="labels_csv_column")
            s_col, l_col = columns.index(STUDY_COLUMN), columns.index(LABEL_COLUMN)
            cells: list[tuple[str, str, int]] = []
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) <= max(s_col, l_col):
                    raise _error(path, line, f"{len(row)} column(s), but the header has {len(columns)}; give a "
                                             "study and a label on every line", code="labels_csv_column")
                study, label = _normalise(row[s_col], root_path), row[l_col].strip()
                if not study or not label:
                    what = "study" if not study else "label"
                    raise _error(path, line, f"the {what} is empty; give a study and a label on every line "
                                             "(or delete the line)", code="labels_csv_empty")
                cells.append((study, label, line))
    except UnicodeDecodeError as exc:
        raise _error(path, None, f"not UTF-8 text ({exc.reason}); save the CSV as UTF-8",
                     code="labels_csv_encoding") from None
    except csv.Error as exc:
        raise _error(path, None, f"not a readable CSV ({exc})", code="labels_csv_format") from None
    if not cells:
        raise _error(path, None, "no rows below the header; add one 'study,label' line per labelled study",
                     code="labels_csv_empty")
    first: dict[str, int] = {}
    for study, _, line in cells:
        if study in first:
            raise _error(path, line, f"study '{study}' is listed again (first on line {first[study]}); keep one "
                                     "line per study", code="labels_csv_duplicate")
        first[study] = line
    index, classes = _class_index([(label, line) for _, label, line in cells], path, known_classes)
    rows = tuple(LabelRow(study=study, label=index[label], line=line) for study, label, line in cells)
    return LabelTable(path=path, rows=rows, classes=classes)


def _keys(study: Study) -> Iterable[tuple[int, str]]:
    """(priority, key) pairs naming a study: its source path, its id, its file name, its file stem (DICOM:
    the series folder's name)."""
    source = PurePosixPath(study.source)
    yield 0, source.as_posix()
    yield 1, study.id
    if source.name:
        yield 2, source.name
        yield 3, nifti_stem(Path(source.name))


def match_rows(table: LabelTable, studies: list[Study], *, partial: bool = False) -> dict[str, LabelRow]:
    """``{study id: row}``. A row names a study by source path (relative to data.root), id or file stem.

    A row that names no study (unless ``partial``: a shard sees some studies only), a stem shared
    by several sources, or two rows naming one study are errors.
    """
    by_key: dict[str, dict[int, set[str]]] = {}
    for study in studies:
        for priority, key in _keys(study):
            by_key.setdefault(key, {}).setdefault(priority, set()).add(study.source)
    by_source: dict[str, list[Study]] = {}
    for study in studies:
        by_source.setdefault(study.source, []).append(study)
    matched: dict[str, LabelRow] = {}
    for row in table.rows:
        candidates = by_key.get(row.study)
        if not candidates:
            if partial:
                continue
            raise _error(table.path, row.line, f"study '{row.study}' is not among the {len(by_source)} scans "
                                               "ingested; give its path relative to data.root (as in the manifest's "
                                               "'source') or its file name without extension",
                         code="labels_csv_unknown_study")
        sources = candidates[min(candidates)]
        if len(sources) > 1:
            raise _error(table.path, row.line, f"'{row.study}' names {len(sources)} scans (e.g. "
                                               f"{', '.join(sorted(sources)[:2])}); give the path relative to "
                                               "data.root instead", code="labels_csv_ambiguous_study")
        for study in by_source[next(iter(sources))]:
            if study.id in matched:
                other = matched[study.id]
                raise _error(table.path, row.line, f"'{row.study}' and '{other.study}' (line {other.line}) name "
                                                   "the same scan; keep one line per study",
                             code="labels_csv_duplicate")
            matched[study.id] = row
    return matched


def apply_class_labels(manifest: Manifest, labels_csv: str | Path | None, *, root: str | Path | None = None,
                       partial: bool = False, known_classes: dict[str, str] | None = None) -> Manifest:
    """The manifest with each study's ``class_label`` (and ``classes``) from ``labels_csv``.

    Studies without a row are unlabelled (``class_label`` None: inference only). ``None`` for
    ``labels_csv`` clears class labels left from an earlier run. ``partial``: the manifest holds
    some of the scans only (a shard), so rows naming other scans are not errors.
    """
    if labels_csv is None:
        if manifest.classes is None and all(s.class_label is None for s in manifest.studies):
            return manifest
        studies = [s.model_copy(update={"class_label": None}) for s in manifest.studies]
        return manifest.model_copy(update={"studies": studies, "classes": None})
    table = read_labels_csv(labels_csv, root=root, known_classes=known_classes)
    matched = match_rows(table, manifest.studies, partial=partial)
    studies = [s.model_copy(update={"class_label": matched[s.id].label if s.id in matched else None})
               for s in manifest.studies]
    unlabelled = sum(1 for s in studies if s.status == "ok" and s.class_label is None)
    counts = {name: sum(1 for s in studies if s.class_label == int(key)) for key, name in table.classes.items()}
    log.info("labels CSV %s: %s; %d ok stud(ies) unlabelled (inference only)", table.path.name,
             ", ".join(f"{name}: {n}" for name, n in counts.items()), unlabelled)
    return manifest.model_copy(update={"studies": studies, "classes": table.classes})
