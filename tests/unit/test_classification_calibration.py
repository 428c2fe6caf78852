"""Bias-corrected temperature scaling: recovers known parameters, keeps the binary AUC, fixes the 0.5 threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.classification.calibration import Calibration, fit_calibration
from pipeline.classification.metrics import classification_metrics
from pipeline.errors import CheckpointError


def _shifted(n: int, *, seed: int, temperature: float, bias: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / temperature + bias): the calibration to recover is known."""
    rng = np.random.default_rng(seed)
    k = len(bias)
    logits = rng.normal(0.0, 2.0, (n, k))
    truth = Calibration(temperature, tuple(bias)).probabilities(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(truth, axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize(("temperature", "bias"), [(2.0, [0.0, -2.5]), (0.5, [0.0, 1.0, -1.5])])
def test_fit_recovers_the_temperature_and_offsets_that_generated_the_labels(temperature: float,
                                                                           bias: list[float]) -> None:
    logits, labels = _shifted(20000, seed=1, temperature=temperature, bias=bias)
    fitted = fit_calibration(logits, labels)
    assert fitted.temperature == pytest.approx(temperature, rel=0.06)
    assert np.allclose(fitted.bias, bias, atol=0.12)
    only_t = fit_calibration(logits, labels, bias=False)
    assert only_t.bias == () and fit_calibration(logits, labels, temperature=False).temperature == 1.0
    assert fit_calibration(logits, labels, temperature=False, bias=False) == Calibration()


def test_offsets_fix_the_operating_point_of_a_shifted_binary_classifier_without_changing_its_auc() -> None:
    # a classifier whose logits favour the rare positive class by 3 (as inverse-frequency class weights do)
    logits, labels = _shifted(400, seed=2, temperature=1.0, bias=[0.0, -3.0])
    t_only = classification_metrics(labels, logits, calibration=fit_calibration(logits, labels, bias=False),
                                    bootstrap=0)
    corrected = fit_calibration(logits, labels)
    both = classification_metrics(labels, logits, calibration=corrected, bootstrap=0)
    majority = max(np.mean(labels), 1 - np.mean(labels))
    assert t_only["accuracy"] < majority < both["accuracy"]
    assert both["nll"] < t_only["nll"] and both["ece"] < t_only["ece"]
    assert both["auc"] == pytest.approx(skm.roc_auc_score(labels, logits[:, 1] - logits[:, 0]))
    assert both["auc"] == pytest.approx(t_only["auc"])
    assert both["temperature"] == corrected.temperature and both["logit_bias"] == list(corrected.bias)


def test_no_offsets_are_fitted_for_a_class_absent_from_the_labels(caplog: pytest.LogCaptureFixture) -> None:
    logits, _ = _shifted(200, seed=3, temperature=1.0, bias=[0.0, 0.0, 0.0])
    labels = (logits[:, 1] > logits[:, 0]).astype(np.int64)  # class 2 never occurs
    assert fit_calibration(logits, labels).bias == ()
    assert "2 of 3 classes" in caplog.text


def test_model_json_round_trip_and_errors(tmp_path: Path) -> None:
    calibration = Calibration(0.7, (0.0, -1.25))
    meta = json.loads(json.dumps(calibration.as_json()))
    assert Calibration.from_json(meta, where="m.json", num_classes=2) == calibration
    assert Calibration.from_json({"temperature": 1.5}, where="old", num_classes=2) == Calibration(1.5)  # older models
    with pytest.raises(CheckpointError, match=r"m.json: logit_bias has 2 values for 3 classes"):
        Calibration.from_json(meta, where="m.json", num_classes=3)
    with pytest.raises(CheckpointError, match=r"m.json: bad calibration .*positive"):
        Calibration.from_json({"temperature": -1}, where="m.json", num_classes=2)
    with pytest.raises(ValueError, match="3 calibration offsets for logits of 2 classes"):
        Calibration(1.0, (0.0, 1.0, 2.0)).probabilities(np.zeros((1, 2)))


def test_too_few_validation_studies_of_a_class_leave_the_logits_uncalibrated(caplog: pytest.LogCaptureFixture) -> None:
    logits = np.array([[2.0, -1.0], [1.5, 0.0], [3.0, -2.0], [0.5, 0.2], [1.0, -1.0], [-1.0, 2.0], [0.0, 3.0],
                       [-2.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])  # separable: an unconstrained fit would sharpen without bound
    assert fit_calibration(logits, labels) == Calibration()
    assert "5/4 validation studies per class" in caplog.text
    more = np.concatenate([labels, [1]]), np.concatenate([logits, [[0.3, 0.6]]])
    fitted = fit_calibration(more[1], more[0])
    assert 0.05 < fitted.temperature < 1 and fitted.bias  # sharper, yet held off the limits by the priors
