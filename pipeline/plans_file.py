"""A hand-edited plans.json (``preprocess.plans_file``): loading it and checking every key it sets."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.registry import did_you_mean

NORMALIZATIONS = ("auto", "zscore", "zscore_nonzero", "ct", "none")
CHANNEL_KEYS = ("name", "normalization", "intensity")
IGNORED_KEYS = ("schema_version", "fingerprint")  # measurements and format, not choices: never replace planned values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _triple(check: Callable[[Any], bool], what: str) -> Callable[[Any], str | None]:
    def validate(value: Any) -> str | None:
        if isinstance(value, list) and len(value) == 3 and all(check(v) for v in value):
            return None
        return f"a list of 3 {what}"
    return validate


def _orientation(value: Any) -> str | None:
    if isinstance(value, str) and len(value) == 3:
        axes = sorted(i for c in value.upper() for i, pair in enumerate(("LR", "PA", "IS")) if c in pair)
        if axes == [0, 1, 2]:
            return None
    return "three axis letters, one of L/R, one of P/A and one of I/S (e.g. \"RAS\")"


def _labels(value: Any) -> str | None:
    if isinstance(value, dict) and all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                       for k, v in value.items()):
        return None
    return "an object mapping class values (\"0\", \"1\", ...) to names"


def _intensity(value: Any) -> str | None:
    keys = ("mean", "std", "p005", "p995")
    if isinstance(value, dict) and all(_is_number(value.get(k)) for k in keys) and value["std"] >= 0:
        return None
    return "an object with numbers mean, std (>= 0), p005 and p995"


def _network(value: Any) -> str | None:
    shape = "an object {kernel_sizes: [[k,k,k],...], strides: [[s,s,s],...], filters: [f,...]} with one entry per level"
    if not isinstance(value, dict) or set(value) != {"kernel_sizes", "strides", "filters"}:
        return shape
    kernels, strides, filters = value["kernel_sizes"], value["strides"], value["filters"]
    if not (isinstance(kernels, list) and isinstance(strides, list) and isinstance(filters, list)):
        return shape
    if not len(kernels) == len(strides) == len(filters) or not kernels:
        return shape + " (the three lists have the same length)"
    odd = _triple(lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "odd positive integers")
    positive = _triple(lambda v: _is_int(v) and v >= 1, "positive integers")
    if any(odd(k) for k in kernels) or any(positive(s) for s in strides):
        return shape + " (kernels odd, strides positive integers)"
    if not all(_is_int(f) and f >= 1 for f in filters):
        return shape + " (filters positive integers)"
    return None


def _channels(value: Any) -> str | None:
    shape = ("a list of two or more objects, one per image channel in order, each with 'name', "
             f"'normalization' ({', '.join(NORMALIZATIONS)}) and optionally 'intensity'")
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, dict) for c in value):
        return shape
    for channel in value:
        if set(channel) - set(CHANNEL_KEYS) or not isinstance(channel.get("name"), str) or \
                channel.get("normalization") not in NORMALIZATIONS:
            return shape
        if "intensity" in channel and _intensity(channel["intensity"]) is not None:
            return shape
    return None


def _choice(values: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda value: None if value in values else f"one of {', '.join(values)}"


def _check(ok: Callable[[Any], bool], what: str) -> Callable[[Any], str | None]:
    return lambda value: None if ok(value) else what


VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    "schema_version": _check(lambda v: v == 1, "1 (the only plans schema)"),
    "orientation": _orientation,
    "target_spacing": _triple(lambda v: _is_number(v) and v > 0, "positive numbers (mm)"),
    "normalization": _choice((*NORMALIZATIONS, "per_channel")),
    "crop_foreground": _check(lambda v: isinstance(v, bool), "true or false"),
    "patch_size": _triple(lambda v: _is_int(v) and v >= 4, "integers >= 4"),
    "batch_size": _check(lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "num_classes": _check(lambda v: _is_int(v) and v >= 2, "an integer >= 2 (background included)"),
    "labels": _labels,
    "modality": _check(lambda v: v is None or isinstance(v, str), "a string or null"),
    "intensity": _intensity,
    "channels": _channels,
    "network": _network,
    "fingerprint": _check(lambda v: isinstance(v, dict), "an object"),
}
PLANS_KEYS = tuple(VALIDATORS)


def validate_plans_overrides(data: Any, *, source: str) -> dict[str, Any]:
    """Check a plans object key by key; return the keys that replace planned values (ConfigError otherwise)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a plans file holds a JSON object (like 02_preprocess/plans.json), "
                          f"got {type(data).__name__}")
    for key, value in data.items():
        validator = VALIDATORS.get(key)
        if validator is None:
            raise ConfigError(f"{source}: unknown plans key '{key}'.{did_you_mean(key, PLANS_KEYS)} "
                              f"Known keys: {', '.join(PLANS_KEYS)}")
        problem = validator(value)
        if problem is not None:
            raise ConfigError(f"{source}: plans key '{key}' must be {problem}; got {json.dumps(value)[:200]}")
    if "labels" in data and "num_classes" in data and any(int(k) >= data["num_classes"] for k in data["labels"]):
        raise ConfigError(f"{source}: plans key 'labels' names classes beyond num_classes {data['num_classes']}")
    out = {k: v for k, v in data.items() if k not in IGNORED_KEYS}
    if "orientation" in out:
        out["orientation"] = out["orientation"].upper()
    return out


def load_plans_file(path: str | Path) -> dict[str, Any]:
    """Read and validate ``path``; return the plans keys it sets (``fingerprint``/``schema_version`` dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preprocess.plans_file {path} does not exist; point it at an edited copy of "
                          "02_preprocess/plans.json or set it to null")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix the file or set preprocess.plans_file to null"
                          ) from None
    return validate_plans_overrides(data, source=str(path))
