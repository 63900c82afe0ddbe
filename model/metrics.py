"""Per-label classification metrics used by evaluation, monitors and verification.

AUROC is computed from ranks so that bootstrap confidence intervals over hundreds of resamples
stay fast (vectorised over resamples). Every function accepts labels with a single class and
returns NaN there instead of raising: "cannot assess" is a result, not a crash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_curve

__all__ = [
    "sigmoid",
    "logit",
    "auroc",
    "auroc_rows",
    "auroc_bootstrap_ci",
    "auprc",
    "expected_calibration_error",
    "calibration_slope_intercept",
    "youden_threshold",
    "confusion_at",
    "per_label_metrics",
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


def auroc_bootstrap_ci(
    y: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC (resampling images); NaNs when undefined."""
    y = np.asarray(y).astype(np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    values = auroc_rows(y[idx], scores[idx])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def auprc(y: np.ndarray, scores: np.ndarray) -> float:
    y = np.asarray(y)
    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, scores))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width probability bins (weighted mean |accuracy - confidence| per bin)."""
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


def calibration_slope_intercept(y: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Logistic recalibration fit ``P(y) = sigmoid(a + b * logit)``: returns (slope b, intercept a).

    A well-calibrated model has slope 1 and intercept 0. Newton iterations on two parameters,
    lightly ridge-regularised so separable data still gives finite numbers.
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        return (float("nan"), float("nan"))
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.array([0.0, 1.0])
    ridge = 1e-3
    for _ in range(50):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[1]), float(w[0])


def youden_threshold(y: np.ndarray, probs: np.ndarray) -> float:
    """Probability threshold maximising sensitivity + specificity - 1 (Youden's J).

    Returns 0.5 when the label has a single class (no operating point can be fitted).
    """
    y = np.asarray(y)
    if y.sum() == 0 or y.sum() == len(y):
        return 0.5
    fpr, tpr, thr = roc_curve(y, probs)
    j = tpr - fpr
    best = int(np.argmax(j))
    t = float(thr[best])
    if not np.isfinite(t):  # roc_curve's first threshold is +inf
        t = float(np.nextafter(np.max(probs), np.inf))
    return float(min(max(t, 1e-6), 1 - 1e-6))


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


def per_label_metrics(
    labels: np.ndarray,
    logits: np.ndarray,
    thresholds: Sequence[float],
    label_names: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float | int | None]]:
    """The evaluation table: one dict per label (AUROC with 95 % CI, AUPRC, ECE, operating point)."""
    probs = sigmoid(logits)
    out: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(label_names):
        y = labels[:, k]
        lo, hi = auroc_bootstrap_ci(y, probs[:, k], n_boot=n_boot, seed=seed + k)
        slope, intercept = calibration_slope_intercept(y, logits[:, k])
        row: dict[str, float | int | None] = dict(
            n=int(len(y)),
            positives=int(y.sum()),
            auroc=auroc(y, probs[:, k]),
            auroc_ci_low=lo,
            auroc_ci_high=hi,
            auprc=auprc(y, probs[:, k]),
            ece=expected_calibration_error(y, probs[:, k]),
            calibration_slope=slope,
            calibration_intercept=intercept,
            threshold=float(thresholds[k]),
            youden_threshold=youden_threshold(y, probs[:, k]),
            prevalence=float(y.mean()) if len(y) else float("nan"),
        )
        row.update(confusion_at(y, probs[:, k], float(thresholds[k])))
        out[name] = {key: (None if isinstance(v, float) and not np.isfinite(v) else v) for key, v in row.items()}
    return out


def logit(p: float) -> float:
    """The inverse of :func:`sigmoid` for one probability, clamped to [1e-12, 1 - 1e-12] so that a
    probability of exactly 0 or 1 (a saturated output, a threshold at the edge) stays finite."""
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))
