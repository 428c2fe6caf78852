"""Postprocessing of label maps: keep each class's largest connected component, and when cross-validation says so.

Connectivity: components are 26-connected in 3D (voxels touching by a face, an edge or a
corner belong together), as ``skimage.measure.label``'s default full connectivity that
nnU-Net uses. Voxels outside the kept component become background (0).

The ``auto`` rule is nnU-Net's: over every validation study of the folds used, the mean Dice
of class c with and without its largest component kept; the component filter is enabled for
c iff it makes that mean strictly higher. Dice of a class absent from both prediction and
reference is undefined (null) and left out of the means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import ManifestError
from pipeline.fileio import read_json

log = logging.getLogger(__name__)

CONNECTIVITY = 26
_STRUCTURE = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
VALIDATION_JSON = "validation.json"
POSTPROCESS_MODES = ("auto", "none", "largest_component")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (ties: the lowest component label)."""
    labelled, count = ndimage.label(mask, structure=_STRUCTURE)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """A copy of ``labels`` where each of ``classes`` keeps only its largest component (the rest -> 0)."""
    out = np.array(labels, copy=True)
    for c in sorted({int(c) for c in classes}):
        mask = out == c
        if not mask.any():
            continue
        out[mask & ~largest_component(mask)] = 0
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P and R| / (|P| + |R|) of boolean masks; NaN when both are empty."""
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def class_dice(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """Per class: Dice of ``pred`` and of ``pred`` with only the class's largest component kept.

    Removing another class's stray components only turns its voxels into background, so each
    class's two values are exactly what the combined postprocessing gives for that class.
    """
    raw: dict[str, float | None] = {}
    lcc: dict[str, float | None] = {}
    for c in classes:
        p, r = pred == c, ref == c
        raw[str(c)] = _finite(dice(p, r))
        lcc[str(c)] = _finite(dice(largest_component(p), r)) if p.any() else raw[str(c)]
    return {"dice": raw, "dice_lcc": lcc}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def mean_over(rows: Sequence[Mapping[str, Any]], key: str, classes: Sequence[str]) -> dict[str, float | None]:
    """Per class, the mean of ``row[key][class]`` over the rows where it is defined (null when none is)."""
    out: dict[str, float | None] = {}
    for c in classes:
        values = [float(v) for row in rows if (v := row.get(key, {}).get(c)) is not None]
        out[c] = round(sum(values) / len(values), 6) if values else None
    return out


def read_validation(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read the validation results ({exc}); retrain the fold or use "
                            "infer.postprocess none") from None
    if not isinstance(data, dict) or not isinstance(data.get("studies"), list):
        raise ManifestError(f"{path}: not a medpipe validation.json (no 'studies' list)")
    return data


def decide_postprocessing(validation_files: Sequence[Path]) -> dict[str, Any]:
    """nnU-Net's rule over all studies of ``validation_files``: largest-component for the classes it improves.

    Returns ``{"classes": [c, ...], "per_class": {c: {"dice", "dice_lcc", "studies"}}, "sources": [...]}``.
    """
    rows: list[Mapping[str, Any]] = []
    classes: set[str] = set()
    for path in validation_files:
        data = read_validation(Path(path))
        for row in data["studies"]:
            rows.append(row)
            classes.update(row.get("dice", {}))
    order = sorted(classes, key=int)
    before, after = mean_over(rows, "dice", order), mean_over(rows, "dice_lcc", order)
    chosen, per_class = [], {}
    for c in order:
        n = sum(1 for row in rows if row.get("dice", {}).get(c) is not None)
        per_class[c] = {"dice": before[c], "dice_lcc": after[c], "studies": n}
        if before[c] is not None and after[c] is not None and after[c] > before[c]:
            chosen.append(int(c))
    log.info("postprocess auto: largest component for class(es) %s (validation means %s)", chosen or "none",
             {c: (v["dice"], v["dice_lcc"]) for c, v in per_class.items()})
    return {"classes": chosen, "per_class": per_class, "studies": len(rows),
            "connectivity": CONNECTIVITY}


def postprocess_plan(mode: str, *, num_classes: int, validation_files: Sequence[Path],
                     missing: Sequence[str] = ()) -> dict[str, Any]:
    """What inference does after argmax, for the record: ``{"mode", "classes", ...}``.

    ``largest_component``: every foreground class; ``none``: nothing; ``auto``: the classes
    cross-validation showed it helps (nothing when no validation.json is there).
    """
    if mode == "none":
        return {"mode": mode, "classes": []}
    if mode == "largest_component":
        return {"mode": mode, "classes": list(range(1, num_classes)), "connectivity": CONNECTIVITY}
    if not validation_files:
        log.warning("postprocess auto: no validation.json next to the model(s); no postprocessing "
                    "(train with this version to get one, or set infer.postprocess)")
        return {"mode": mode, "classes": [], "reason": "no validation.json"}
    decision = decide_postprocessing(validation_files)
    plan = {"mode": mode, **decision}
    if missing:
        plan["missing_validation"] = list(missing)
    return plan
