"""A hand-edited plans file: its values replace the planned ones; unknown keys and wrong types are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import ConfigError
from pipeline.planning import StudyFingerprint, dataset_fingerprint, make_plans
from pipeline.plans_file import load_plans_file, validate_plans_overrides


@pytest.fixture
def fingerprint() -> dict:
    studies = [StudyFingerprint(id=f"s{i}", spacing=(1.0, 1.0, 1.0), shape=(36, 50, 35),
                                foreground=np.array([10.0, 20.0, 30.0]), class_counts={0: 900, 1: 50, 2: 50},
                                modality="MR") for i in range(40)]
    return dataset_fingerprint(studies)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_overrides_replace_planned_values(fingerprint: dict, tmp_path: Path) -> None:
    planned = make_plans(fingerprint, config=PreprocessConfig())
    assert planned["target_spacing"] == [1.0, 1.0, 1.0] and planned["patch_size"] == [40, 56, 40]
    path = _write(tmp_path / "plans.json", {"target_spacing": [2.0, 2.0, 2.0], "batch_size": 3,
                                            "normalization": "none", "orientation": "lps"})
    overrides = load_plans_file(path)
    plans = make_plans(fingerprint, config=PreprocessConfig(), overrides=overrides)
    assert plans["target_spacing"] == [2.0, 2.0, 2.0] and plans["batch_size"] == 3
    assert plans["normalization"] == "none" and plans["orientation"] == "LPS"
    # the patch is planned for the file's spacing: median 36x50x35 at 1 mm is 18x25x17.5 at 2 mm
    assert plans["fingerprint"]["planning_shape"] == [18.0, 25.0, 17.5]
    assert plans["patch_size"] == [20, 28, 20] and plans["network"]["strides"][1:] == [[2, 2, 2], [2, 2, 2]]


def test_a_written_plans_file_reproduces_itself(fingerprint: dict, tmp_path: Path) -> None:
    planned = make_plans(fingerprint, config=PreprocessConfig(), labels={"0": "bg", "1": "a", "2": "b"})
    path = _write(tmp_path / "plans.json", planned)
    overrides = load_plans_file(path)
    assert "fingerprint" not in overrides and "schema_version" not in overrides  # measurements are not choices
    assert make_plans(fingerprint, config=PreprocessConfig(), overrides=overrides) == planned


def test_network_override_rounds_the_planned_patch(fingerprint: dict) -> None:
    network = {"kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [8, 16, 32]}
    plans = make_plans(fingerprint, config=PreprocessConfig(), overrides={"network": network})
    assert plans["network"] == network and plans["patch_size"] == [36, 52, 36]  # multiples of 4


def test_network_override_must_divide_a_given_patch(fingerprint: dict, tmp_path: Path) -> None:
    network = {"kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [8, 16, 32]}
    path = _write(tmp_path / "edited.json", {"network": network, "patch_size": [36, 50, 36]})
    with pytest.raises(ConfigError, match=r"edited\.json.*'network'.*not divisible"):
        make_plans(fingerprint, config=PreprocessConfig(), overrides=load_plans_file(path), overrides_source=str(path))


@pytest.mark.parametrize(("data", "pattern"), [
    ({"target_spacings": [1, 1, 1]}, r"unknown plans key 'target_spacings'\. Did you mean 'target_spacing'"),
    ({"patch_size": "32"}, r"'patch_size' must be a list of 3 integers >= 4"),
    ({"patch_size": [32, 32, 2]}, r"'patch_size'"),
    ({"batch_size": True}, r"'batch_size' must be a positive integer"),
    ({"target_spacing": [1, 0, 1]}, r"'target_spacing' must be a list of 3 positive numbers"),
    ({"normalization": "minmax"},
     r"'normalization' must be one of auto, zscore, zscore_nonzero, ct, none, per_channel"),
    ({"orientation": "RAR"}, r"'orientation'"),
    ({"crop_foreground": "yes"}, r"'crop_foreground' must be true or false"),
    ({"intensity": {"mean": 1.0, "std": 1.0}}, r"'intensity'"),
    ({"labels": {"zero": "background"}}, r"'labels'"),
    ({"num_classes": 2, "labels": {"0": "bg", "1": "a", "2": "b"}}, r"beyond num_classes"),
    ({"network": {"kernel_sizes": [[3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "filters": [8]}}, r"'network'"),
    ({"network": {"kernel_sizes": [[2, 2, 2]], "strides": [[1, 1, 1]], "filters": [8]}}, r"kernels odd"),
    ({"schema_version": 2}, r"'schema_version'"),
    ([1, 2, 3], r"JSON object"),
])
def test_bad_plans_files_are_refused_naming_file_and_key(tmp_path: Path, data: object, pattern: str) -> None:
    path = _write(tmp_path / "my_plans.json", data)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_plans_file(path)
    assert "my_plans.json" in str(info.value)


def test_unreadable_plans_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_plans_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{\"patch_size\": [32, ")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        load_plans_file(tmp_path / "broken.json")
    assert validate_plans_overrides({}, source="x") == {}
