"""The per-study metric table (per_study.csv): its columns, fixed-point writing and parsing."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError

# The first nine columns are the contract (issue 6); the ones after them are extras.
REQUIRED_COLUMNS = ("study", "class", "dice", "iou", "hd95", "assd", "nsd", "volume_ref_ml", "volume_pred_ml")
PER_STUDY_COLUMNS = (*REQUIRED_COLUMNS, "class_name", "rel_volume_error", "nsd_tolerance_mm")
METRICS = ("dice", "iou", "hd95", "assd", "nsd", "volume_ref_ml", "volume_pred_ml", "rel_volume_error")
NUMBER_COLUMNS = (*METRICS, "nsd_tolerance_mm")
HIGHER_IS_BETTER = {"dice": True, "iou": True, "nsd": True, "hd95": False, "assd": False}
DECIMALS = 6


def fmt(value: float) -> str:
    """Fixed-point text with DECIMALS digits; NaN (an undefined value) becomes an empty cell."""
    return "" if math.isnan(value) else f"{value:.{DECIMALS}f}"


def per_study_csv(rows: Iterable[dict[str, Any]]) -> str:
    """CSV text of metric rows (dicts keyed by PER_STUDY_COLUMNS), numbers in fixed-point."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_STUDY_COLUMNS)
    for row in rows:
        writer.writerow([fmt(float(row[k])) if k in NUMBER_COLUMNS else row[k] for k in PER_STUDY_COLUMNS])
    return buffer.getvalue()


def read_per_study(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a per_study.csv with numbers parsed (empty cells -> NaN); extra columns are kept as text."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            header = tuple(reader.fieldnames or ())
            if header[:len(REQUIRED_COLUMNS)] != REQUIRED_COLUMNS:
                raise ManifestError(f"{path}: expected the columns to start with {', '.join(REQUIRED_COLUMNS)}; "
                                    "write it with 'medpipe evaluate'")
            rows = []
            for row in reader:
                parsed: dict[str, Any] = {k: v for k, v in row.items() if k not in NUMBER_COLUMNS}
                parsed["class"] = int(row["class"])
                parsed.setdefault("class_name", f"class_{parsed['class']}")
                parsed.update({k: float(row[k]) if row.get(k) else math.nan for k in NUMBER_COLUMNS})
                rows.append(parsed)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the per-study metrics ({exc.strerror}); run 'medpipe evaluate' "
                            "first") from None
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: malformed per-study metrics ({exc})") from None
    return rows
