"""Paired intervals: exact where they must be, honest where they cannot be estimated."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import auroc
from model.paired import (
    paired_auroc_delta,
    paired_mean_auroc_delta,
    paired_rate_delta,
    wilson_interval,
)


def test_wilson_matches_known_values_and_edges() -> None:
    iv = wilson_interval(2, 5)
    assert iv.estimate == pytest.approx(0.4)
    assert iv.low == pytest.approx(0.1176, abs=1e-3) and iv.high == pytest.approx(0.7693, abs=1e-3)
    zero = wilson_interval(0, 20)
    assert zero.low == 0.0 and 0.1 < zero.high < 0.2  # an upper bound even with no success
    assert not wilson_interval(0, 0).estimable and wilson_interval(0, 0).reason == "no trials"


def _scores(seed: int, n: int = 300, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, y * shift + rng.normal(size=n)


def test_paired_auroc_delta_point_is_the_plain_difference_and_covers_a_real_gain() -> None:
    y, s = _scores(0)
    better = s + 1.5 * y  # separates the classes further
    iv = paired_auroc_delta(y, s, better, seed=1)
    assert iv.estimate == pytest.approx(auroc(y, better) - auroc(y, s), abs=1e-9)
    assert iv.low > 0  # the improvement excludes "no change"
    same = paired_auroc_delta(y, s, s.copy())
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_interval_is_tighter_than_unpaired_noise_would_be() -> None:
    y, s = _scores(2)
    rng = np.random.default_rng(3)
    slightly = s + 0.05 * rng.normal(size=len(s))
    iv = paired_auroc_delta(y, s, slightly, seed=4)
    assert iv.high - iv.low < 0.05  # two models that agree: paired noise is small


def test_cannot_estimate_with_one_class() -> None:
    y = np.zeros(50, int)
    iv = paired_auroc_delta(y, np.arange(50.0), np.arange(50.0)[::-1])
    assert not iv.estimable and iv.reason == "one class only" and "cannot be estimated" in iv.text()
    mean = paired_mean_auroc_delta(np.zeros((10, 3)), np.zeros((10, 3)), np.ones((10, 3)))
    assert not mean.estimable


def test_mean_delta_skips_one_class_labels_and_is_deterministic() -> None:
    y0, s0 = _scores(5)
    y = np.stack([y0, np.zeros_like(y0)], axis=1)
    before = np.stack([s0, s0], axis=1)
    after = np.stack([s0 + y0, s0], axis=1)
    a = paired_mean_auroc_delta(y, before, after, seed=7)
    b = paired_mean_auroc_delta(y, before, after, seed=7)
    assert a == b and a.estimate == pytest.approx(auroc(y0, s0 + y0) - auroc(y0, s0), abs=1e-9)


def test_paired_rate_delta_counts_lost_hits() -> None:
    before = np.ones(5, bool)
    after = np.array([1, 1, 0, 0, 0], bool)
    iv = paired_rate_delta(before, after, seed=0)
    assert iv.estimate == pytest.approx(-0.6) and iv.high < 0


def test_youden_delta_judges_a_trade_on_the_sum() -> None:
    from model.paired import paired_youden_delta

    y = np.r_[np.ones(20), np.zeros(80)].astype(bool)
    before = np.r_[np.ones(20), np.ones(40), np.zeros(40)].astype(bool)  # sens 1.0, spec 0.5
    after = np.r_[np.ones(18), np.zeros(2), np.zeros(80)].astype(bool)   # sens 0.9, spec 1.0
    iv = paired_youden_delta(y, before, after, seed=0)
    assert iv.estimate == pytest.approx(0.4) and iv.low > 0


def test_paired_statistic_resamples_rows_for_any_statistic_and_says_when_undefined() -> None:
    from model.paired import paired_statistic

    before = np.zeros(200, bool)
    after = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    iv = paired_statistic(lambda r: after[r].mean() - before[r].mean(), 200, seed=0)
    assert iv.estimate == pytest.approx(0.3) and 0.2 < iv.low < 0.3 < iv.high < 0.4
    assert iv == paired_statistic(lambda r: after[r].mean() - before[r].mean(), 200, seed=0)  # deterministic
    undefined = paired_statistic(lambda r: float("nan"), 10)
    assert not undefined.estimable and "undefined" in undefined.reason
    assert paired_statistic(lambda r: 0.0, 0).reason == "no rows"
