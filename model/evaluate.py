"""Per-label evaluation of a bundle on a dataset, through the feature cache."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet, extract_features
from model.interval import Interval, unestimable
from model.metrics import auroc, auroc_rows, per_label_metrics, sigmoid

__all__ = ["evaluate_features", "evaluate_bundle", "mean_auroc_bootstrap_ci"]


def mean_auroc_bootstrap_ci(
    labels: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Interval:
    """Mean AUROC over the labels with both classes, with its bootstrap interval (the same image
    resamples for every label). No such label: cannot be estimated; a zero-width interval (constant
    scores): the mean stands, the interval is None with the reason."""
    level, n = 1 - alpha, len(labels)
    usable = [k for k in range(labels.shape[1]) if 0 < labels[:, k].sum() < len(labels)]
    if not usable:
        return unestimable(level, n, "bootstrap_mean", "no label has both classes")
    point = float(np.mean([auroc(labels[:, k], scores[:, k]) for k in usable]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    per_label = np.stack([auroc_rows(labels[:, k][idx].astype(float), scores[:, k][idx]) for k in usable])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every label has one class
        means = np.nanmean(per_label, axis=0)
    means = means[np.isfinite(means)]
    if len(means) == 0:
        return Interval(point, None, None, level, n, "bootstrap_mean", "every resample had one class in every label")
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if lo == hi:
        return Interval(point, None, None, level, n, "bootstrap_mean", "every resample gave the same mean AUROC")
    return Interval(point, float(lo), float(hi), level, n, "bootstrap_mean")


def evaluate_features(bundle: Bundle, fs: FeatureSet, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics per label at the bundle's thresholds, plus a summary (mean AUROC with 95 % CI).

    A value that cannot be estimated is None with a ``<name>_reason`` key (see :mod:`model.metrics`)."""
    per_label = per_label_metrics(fs.labels, fs.logits, bundle.meta.thresholds, bundle.meta.labels,
                                  n_boot=n_boot, seed=seed)
    aurocs = [row["auroc"] for row in per_label.values() if row["auroc"] is not None]
    mean = mean_auroc_bootstrap_ci(fs.labels, sigmoid(fs.logits), n_boot=n_boot, seed=seed)
    summary: dict[str, Any] = {
        "n_images": len(fs),
        "labels_with_positives": len(aurocs),
        "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
        "mean_auroc_ci_low": mean.low,
        "mean_auroc_ci_high": mean.high,
    }
    if mean.reason is not None:
        for key in ("mean_auroc", "mean_auroc_ci_low", "mean_auroc_ci_high"):
            if summary[key] is None:
                summary[f"{key}_reason"] = mean.reason
    summary.update(model_hash=bundle.content_hash(), manifest_hash=fs.manifest_hash)
    return {"summary": summary, "labels": per_label}


def evaluate_bundle(
    bundle: Bundle,
    dataset: NIHDataset,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    fs = extract_features(bundle, dataset, skip_bad=skip_bad, progress=progress)
    result = evaluate_features(bundle, fs, n_boot=n_boot, seed=seed)
    result["summary"].update(dataset=str(dataset.root), split=dataset.split,
                             skipped=[{"where": s.where, "reason": s.reason} for s in dataset.skipped])
    return result
