"""Degenerate statistics say "cannot be estimated" with the reason instead of printing a number.

On real NIH images a label with 8 positives got calibration intercept 8000 and slope -47025 (a logistic
fit diverging under separation); one class, constant scores and empty bins are the other ways.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.evaluate import mean_auroc_bootstrap_ci
from model.metrics import (
    auprc,
    auroc_bootstrap_ci,
    calibration_slope_intercept,
    expected_calibration_error,
    numeric_rows,
    per_label_metrics,
    youden_fit,
    youden_threshold,
)


def _overlapping(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    z = rng.normal(size=n) + 1.5 * y - 1.0
    return y, z


def test_calibration_fit_on_overlapping_classes_is_estimated() -> None:
    y, z = _overlapping()
    fit = calibration_slope_intercept(y, z)
    assert fit.estimable and fit.reason is None
    assert 0.3 < fit.slope < 3 and abs(fit.intercept) < 3


def test_calibration_fit_under_separation_says_so() -> None:
    # the NIH case: 8 positives, every one scored below every negative (no true positive at threshold)
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(-6, 0.2, 8), rng.normal(-2, 0.5, 300)])
    y = np.concatenate([np.ones(8), np.zeros(300)])
    fit = calibration_slope_intercept(y, z)
    assert fit.slope is None and fit.intercept is None
    assert "separated" in fit.reason
    with pytest.raises(TypeError):  # the old tuple unpacking cannot silently take it for numbers
        tuple(fit)
    # and the other direction
    assert "separated" in calibration_slope_intercept(1 - y, z).reason


@pytest.mark.parametrize(("y", "z", "word"), [
    (np.zeros(50), np.linspace(-2, 2, 50), "no positives"),
    (np.ones(50), np.linspace(-2, 2, 50), "no negatives"),
    (np.r_[np.zeros(25), np.ones(25)], np.zeros(50), "constant"),
])
def test_calibration_fit_one_class_or_constant(y: np.ndarray, z: np.ndarray, word: str) -> None:
    fit = calibration_slope_intercept(y, z)
    assert not fit.estimable and word in fit.reason


def test_auroc_interval_one_class_and_constant_scores() -> None:
    iv = auroc_bootstrap_ci(np.zeros(30), np.linspace(0, 1, 30), n_boot=50)
    assert iv.estimate is None and iv.reason == "one class: no positives"
    y = np.r_[np.zeros(20), np.ones(10)]
    iv = auroc_bootstrap_ci(y, np.full(30, 0.3), n_boot=50)
    assert iv.estimate == 0.5 and iv.low is None and iv.high is None and iv.reason == "constant scores"
    y, z = _overlapping()
    iv = auroc_bootstrap_ci(y, z, n_boot=100)
    assert iv.low < iv.estimate < iv.high and iv.reason is None


def test_mean_auroc_interval_constant_and_one_class() -> None:
    labels = np.zeros((40, 2))
    assert mean_auroc_bootstrap_ci(labels, np.random.default_rng(0).random((40, 2)), n_boot=20).reason \
        == "no label has both classes"
    labels[:10, 0] = 1
    iv = mean_auroc_bootstrap_ci(labels, np.full((40, 2), 0.2), n_boot=20)
    assert iv.estimate == 0.5 and iv.low is None and "same" in iv.reason


def test_auprc_one_class_and_ece_bins() -> None:
    assert np.isnan(auprc(np.ones(10), np.linspace(0, 1, 10)))  # no negatives: trivially 1, not a measurement
    assert np.isnan(auprc(np.zeros(10), np.linspace(0, 1, 10)))
    # empty bins carry no weight: two occupied bins, both perfectly calibrated
    y = np.r_[np.zeros(8), np.ones(2), np.ones(8), np.zeros(2)]
    p = np.r_[np.full(10, 0.2), np.full(10, 0.8)]
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))


def test_youden_on_constant_scores_and_one_class() -> None:
    y = np.r_[np.zeros(20), np.ones(10)]
    fit = youden_fit(y, np.full(30, 0.7))
    assert fit.threshold is None and fit.reason == "constant scores"
    assert youden_threshold(y, np.full(30, 0.7)) == 0.5  # callers that must deploy a threshold get the default
    assert youden_fit(np.zeros(30), np.linspace(0, 1, 30)).reason == "one class: no positives"
    # ties: the threshold is a score value and ">=" flags every tied image
    p = np.r_[np.full(20, 0.2), np.full(10, 0.6)]
    fit = youden_fit(y, p)
    assert fit.threshold == pytest.approx(0.6) and fit.j == pytest.approx(1.0)


def test_per_label_metrics_null_plus_reason_in_json() -> None:
    rng = np.random.default_rng(0)
    n = 60
    labels = np.zeros((n, 3))
    labels[:20, 1] = 1
    labels[:15, 2] = 1
    logits = rng.normal(size=(n, 3))
    logits[:, 2] = np.where(labels[:, 2] == 1, -5.0, 2.0) + rng.normal(0, 0.1, n)  # separated
    rows = per_label_metrics(labels, logits, [0.5] * 3, ["none", "ok", "separated"], n_boot=50)
    none, ok, sep = rows["none"], rows["ok"], rows["separated"]
    assert none["auroc"] is None and none["auroc_reason"] == "one class: no positives"
    assert none["auprc"] is None and none["auprc_reason"] == "one class: no positives"
    assert none["auroc_ci_low"] is None and none["auroc_ci_low_reason"] == "one class: no positives"
    assert none["youden_threshold"] is None and none["youden_threshold_reason"]
    assert none["sensitivity"] is None and none["sensitivity_reason"] == "no positives"
    assert ok["calibration_slope"] is not None and "calibration_slope_reason" not in ok
    assert sep["calibration_slope"] is None and "separated" in sep["calibration_slope_reason"]
    assert sep["calibration_intercept"] is None and sep["calibration_intercept_reason"]
    # every null carries its reason; nothing is NaN
    for row in rows.values():
        for key, value in row.items():
            if value is None:
                assert isinstance(row.get(f"{key}_reason"), str), key
    text = json.dumps(rows, allow_nan=False)
    assert "NaN" not in text
    # a bundle's reference metrics hold numbers and None only (the bundle schema has no room for text)
    ref = numeric_rows(rows)
    assert ref["separated"]["calibration_slope"] is None and "calibration_slope_reason" not in ref["separated"]
    assert all(v is None or isinstance(v, float) for r in ref.values() for v in r.values())


def _label(y: np.ndarray, z: np.ndarray):
    from engine.monitors.base import LabelData

    reference = {"ece": 0.02, "auroc": 0.8, "youden_threshold": 0.3, "n": 300, "positives": 30,
                 "prevalence": 0.1, "threshold": 0.3, "fp": 30, "tn": 240}
    return LabelData(k=0, name="Effusion", rows=np.arange(len(y)), y=y.astype(int), logits=z,
                     probs=1 / (1 + np.exp(-z)), threshold=0.3, reference=reference)


def test_calibration_drift_records_an_unestimable_fit_as_not_assessable() -> None:
    from engine.monitors import MonitorConfig
    from engine.monitors.base import bootstrap_counts
    from engine.monitors.calibration_drift import CalibrationDriftMonitor

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(300)]
    monitor, config = CalibrationDriftMonitor(), MonitorConfig()
    # every positive below every negative (separation), and badly calibrated: the ECE criterion fires
    z = np.r_[rng.normal(-3, 0.1, 30), rng.normal(1, 0.1, 300)]
    fact = monitor._check(_label(y, z), config, lambda n_boot: bootstrap_counts(len(y), n_boot, 0), family=1)
    assert fact is not None and "ece" in fact.evidence["criteria"]
    assert fact.measured["calibration_slope"] is None and fact.measured["calibration_intercept"] is None
    assert "separated" in fact.measured["calibration_slope_reason"]
    assert "separated" in fact.evidence["not_assessable"]["calibration_slope"]
    # constant scores: no Youden threshold, so the operating-point criterion is not assessable (not passed)
    z = np.full(330, 1.0)
    fact = monitor._check(_label(y, z), config, lambda n_boot: bootstrap_counts(len(y), n_boot, 0), family=1)
    assert fact is not None
    assert fact.measured["youden_threshold"] is None and fact.measured["threshold_shift"] is None
    assert fact.evidence["not_assessable"]["operating_point"] == "constant scores"
    assert fact.measured["youden_threshold_reason"] == "constant scores"


def test_tables_and_reports_say_why() -> None:
    from engine.commands.evaluate import _cell
    from engine.reports.run_report import _metrics_table

    row = {"auroc": None, "auroc_reason": "one class: no positives", "ece": 0.1234}
    assert _cell(row, "auroc") == "n/a (one class: no positives)"
    assert _cell(row, "ece") == "0.123"
    before = {"Effusion": {"n": 10, "positives": 0, "auroc": None, "auroc_reason": "one class: no positives",
                           "sensitivity": None, "sensitivity_reason": "no positives", "ece": 0.1,
                           "threshold": 0.4, "specificity": 0.9, "tp": 0, "fp": 1}}
    html = _metrics_table(before, before, "Effusion")
    assert "n/a (one class: no positives)" in html and "n/a (no positives)" in html
