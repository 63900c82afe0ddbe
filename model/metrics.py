"""Per-label classification metrics used by evaluation, monitors and verification.

AUROC is computed from ranks so that bootstrap confidence intervals over hundreds of resamples
stay fast (vectorised over resamples). Every function accepts labels with a single class and
returns NaN there instead of raising: "cannot assess" is a result, not a crash. Where a value is
shown or recorded, the reason goes with it: :func:`per_label_metrics` writes ``None`` plus a
``<name>_reason`` key, and the fits that can fail (calibration, Youden) return result types whose
value is None with the reason, so a caller cannot take a diverged fit for a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_curve

from model.interval import Interval, unestimable

__all__ = [
    "CalibrationFit",
    "YoudenFit",
    "auprc",
    "auroc",
    "auroc_bootstrap_ci",
    "auroc_rows",
    "calibration_slope_intercept",
    "confusion_at",
    "expected_calibration_error",
    "logit",
    "numeric_rows",
    "one_class_reason",
    "per_label_metrics",
    "sigmoid",
    "youden_fit",
    "youden_threshold",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def auroc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` (B, N) against the matching row of ``y`` (B, N)."""
    ranks = rankdata(scores, axis=-1)
    n_pos = y.sum(axis=-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
        out = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(y).astype(np.float64)
    return float(auroc_rows(y[None, :], np.asarray(scores, dtype=np.float64)[None, :])[0])


def one_class_reason(y: np.ndarray) -> str | None:
    """Why a two-class statistic (AUROC, AUPRC, a fit) cannot be estimated on ``y``; None when it can."""
    y = np.asarray(y)
    n, pos = len(y), int(np.asarray(y).sum())
    if n == 0:
        return "no images"
    if pos == 0:
        return "one class: no positives"
    if pos == n:
        return "one class: no negatives"
    return None


def auroc_bootstrap_ci(
    y: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> Interval:
    """AUROC with its percentile bootstrap interval (resampling images).

    One class: cannot be estimated. Constant scores (or any data where every resample gives the
    same value): the AUROC stands but the interval is None with the reason, since a zero-width
    interval would claim a certainty the resampling cannot give.
    """
    y = np.asarray(y).astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    level, n = 1 - alpha, len(y)
    reason = one_class_reason(y)
    if reason is not None:
        return unestimable(level, n, "bootstrap", reason)
    point = auroc(y, scores)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    values = auroc_rows(y[idx], scores[idx])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return Interval(point, None, None, level, n, "bootstrap", "every resample had one class")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    if lo == hi:
        why = "constant scores" if np.ptp(scores) == 0 else "every resample gave the same AUROC"
        return Interval(point, None, None, level, n, "bootstrap", why)
    return Interval(point, float(lo), float(hi), level, n, "bootstrap")


def auprc(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision; NaN with one class (no positives: undefined; no negatives: trivially 1)."""
    y = np.asarray(y)
    if one_class_reason(y) is not None:
        return float("nan")
    return float(average_precision_score(y, scores))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width probability bins (weighted mean |accuracy - confidence| per bin).

    Empty bins carry no weight (they are skipped, not counted as zero error); with no images at
    all every bin is empty and the ECE is NaN (cannot be estimated).
    """
    y = np.asarray(y, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    bins = np.clip((probs * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.sum() * abs(y[mask].mean() - probs[mask].mean())
    return float(total / len(y))


#: Beyond this |slope| or |intercept| a recalibration fit on logits is not a calibration statement
#: (a well-calibrated model has 1 and 0; real drift moves them by units, not hundreds).
MAX_CALIBRATION_COEFFICIENT = 100.0


@dataclass(frozen=True)
class CalibrationFit:
    """Logistic recalibration ``P(y) = sigmoid(intercept + slope * logit)``; None with ``reason`` when it
    cannot be estimated (one class, constant logits, separated classes, no convergence)."""

    slope: float | None
    intercept: float | None
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.slope is not None


def _separation(y: np.ndarray, x: np.ndarray) -> str | None:
    """On one predictor the logistic MLE exists iff the classes overlap; else it runs off to infinity."""
    pos, neg = x[y == 1], x[y == 0]
    if pos.min() >= neg.max():
        return "classes separated by the score (every positive scores at least every negative): the fit diverges"
    if pos.max() <= neg.min():
        return "classes separated by the score (every positive scores at most every negative): the fit diverges"
    return None


def calibration_slope_intercept(y: np.ndarray, logits: np.ndarray) -> CalibrationFit:
    """Logistic recalibration fit ``P(y) = sigmoid(a + b * logit)``: slope b and intercept a.

    A well-calibrated model has slope 1 and intercept 0. Newton iterations on two parameters, with
    a tiny ridge only to keep the Hessian invertible. Under separation the maximum-likelihood fit
    does not exist (the iterates run off to thousands), so that, one class, constant logits, a fit
    that does not converge or absurd coefficients are reported as not estimable with the reason.
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    reason = one_class_reason(y)
    if reason is None and np.ptp(x) == 0:
        reason = "constant scores"
    reason = reason or _separation(y, x)
    if reason is not None:
        return CalibrationFit(None, None, reason)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.array([0.0, 1.0])
    ridge = 1e-3
    converged = False
    for _ in range(50):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            converged = True
            break
    if not converged or not np.isfinite(w).all():
        return CalibrationFit(None, None, "the fit did not converge in 50 Newton steps")
    slope, intercept = float(w[1]), float(w[0])
    if max(abs(slope), abs(intercept)) > MAX_CALIBRATION_COEFFICIENT:
        return CalibrationFit(None, None, f"unstable fit (slope {slope:.3g}, intercept {intercept:.3g}: "
                              f"|coefficient| > {MAX_CALIBRATION_COEFFICIENT:g})")
    return CalibrationFit(slope, intercept)


@dataclass(frozen=True)
class YoudenFit:
    """The threshold maximising Youden's J and that J; None with ``reason`` when no operating point can
    be fitted (one class, constant scores)."""

    threshold: float | None
    j: float | None
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.threshold is not None


def youden_fit(y: np.ndarray, probs: np.ndarray) -> YoudenFit:
    """Probability threshold maximising sensitivity + specificity - 1 (Youden's J), with that J.

    Ties: the threshold is a score value and ``probs >= threshold`` flags every tied image, as
    :func:`confusion_at` does. Constant scores have no operating point (every threshold flags all
    images or none, J = 0): not estimable, rather than a threshold chosen by convention.
    """
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    reason = one_class_reason(y)
    if reason is None and np.ptp(probs) == 0:
        reason = "constant scores"
    if reason is not None:
        return YoudenFit(None, None, reason)
    fpr, tpr, thr = roc_curve(y, probs)
    j = tpr - fpr
    best = int(np.argmax(j))
    t = float(thr[best])
    if not np.isfinite(t):  # roc_curve's first threshold is +inf
        t = float(np.nextafter(np.max(probs), np.inf))
    return YoudenFit(float(min(max(t, 1e-6), 1 - 1e-6)), float(j[best]))


def youden_threshold(y: np.ndarray, probs: np.ndarray, default: float = 0.5) -> float:
    """:func:`youden_fit`'s threshold, or ``default`` where it cannot be estimated.

    For callers that must deploy some threshold (training, re-thresholding treatments); anything
    that records or shows the threshold uses :func:`youden_fit` and its reason.
    """
    fit = youden_fit(y, probs)
    return default if fit.threshold is None else fit.threshold


def confusion_at(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """TP/FP/TN/FN counts and sensitivity/specificity/precision/F1 at ``probs >= threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    tn = int((~pred & ~y).sum())
    fn = int((~pred & y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return dict(tp=tp, fp=fp, tn=tn, fn=fn, sensitivity=sens, specificity=spec, precision=prec, f1=f1)


#: Why each per-label value can be missing, where the value itself does not say (NaN from a division).
_MISSING = {
    "ece": "no images",
    "prevalence": "no images",
    "sensitivity": "no positives",
    "specificity": "no negatives",
    "precision": "no image flagged at the threshold",
    "f1": "no positives and no image flagged",
}

Row = dict[str, float | int | str | None]


def _label_row(y: np.ndarray, z: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> Row:
    """One label's metrics; a value that cannot be estimated is None with a ``<name>_reason`` key after it."""
    p = sigmoid(z)
    ci = auroc_bootstrap_ci(y, p, n_boot=n_boot, seed=seed)
    cal = calibration_slope_intercept(y, z)
    yd = youden_fit(y, p)
    one_class = one_class_reason(y)
    values: dict[str, float | int | None] = {
        "n": len(y), "positives": int(y.sum()), "auroc": ci.estimate, "auroc_ci_low": ci.low,
        "auroc_ci_high": ci.high, "auprc": auprc(y, p), "ece": expected_calibration_error(y, p),
        "calibration_slope": cal.slope, "calibration_intercept": cal.intercept, "threshold": float(threshold),
        "youden_threshold": yd.threshold, "prevalence": float(y.mean()) if len(y) else float("nan"),
    }
    values.update(confusion_at(y, p, float(threshold)))
    reasons = {**_MISSING, "auroc": one_class, "auroc_ci_low": ci.reason, "auroc_ci_high": ci.reason,
               "auprc": one_class, "calibration_slope": cal.reason, "calibration_intercept": cal.reason,
               "youden_threshold": yd.reason}
    row: Row = {}
    for key, v in values.items():
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        row[key] = v
        if v is None:
            row[f"{key}_reason"] = reasons.get(key) or "cannot be estimated"
    return row


def per_label_metrics(
    labels: np.ndarray,
    logits: np.ndarray,
    thresholds: Sequence[float],
    label_names: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Row]:
    """The evaluation table: one dict per label (AUROC with 95 % CI, AUPRC, ECE, calibration fit,
    operating point). A value that cannot be estimated is None, followed by ``<name>_reason``."""
    return {name: _label_row(labels[:, k], np.asarray(logits[:, k], dtype=np.float64), thresholds[k],
                             n_boot=n_boot, seed=seed + k)
            for k, name in enumerate(label_names)}


def numeric_rows(rows: dict[str, Row]) -> dict[str, dict[str, float | None]]:
    """:func:`per_label_metrics` as a bundle's reference metrics hold them: numbers and None only (the
    bundle schema has no room for the ``<name>_reason`` text; the None stays)."""
    return {name: {k: (None if v is None else float(v)) for k, v in row.items() if not isinstance(v, str)}
            for name, row in rows.items()}


def logit(p: float) -> float:
    """The inverse of :func:`sigmoid` for one probability, clamped to [1e-12, 1 - 1e-12] so that a
    probability of exactly 0 or 1 (a saturated output, a threshold at the edge) stays finite."""
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))
