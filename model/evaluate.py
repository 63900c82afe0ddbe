"""Per-label evaluation of a bundle on a dataset, through the feature cache."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet, extract_features
from model.metrics import auroc_rows, per_label_metrics, sigmoid

__all__ = ["evaluate_features", "evaluate_bundle", "mean_auroc_bootstrap_ci"]


def mean_auroc_bootstrap_ci(
    labels: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Bootstrap CI of the mean AUROC over labels (same image resamples for every label)."""
    usable = [k for k in range(labels.shape[1]) if 0 < labels[:, k].sum() < len(labels)]
    if not usable:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    per_label = np.stack([auroc_rows(labels[:, k][idx].astype(float), scores[:, k][idx]) for k in usable])
    means = np.nanmean(per_label, axis=0)
    lo, hi = np.nanquantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def evaluate_features(bundle: Bundle, fs: FeatureSet, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics per label at the bundle's thresholds, plus a summary (mean AUROC with 95 % CI)."""
    per_label = per_label_metrics(fs.labels, fs.logits, bundle.meta.thresholds, bundle.meta.labels,
                                  n_boot=n_boot, seed=seed)
    aurocs = [row["auroc"] for row in per_label.values() if row["auroc"] is not None]
    lo, hi = mean_auroc_bootstrap_ci(fs.labels, sigmoid(fs.logits), n_boot=n_boot, seed=seed)
    summary = {
        "n_images": len(fs),
        "labels_with_positives": len(aurocs),
        "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
        "mean_auroc_ci_low": None if math.isnan(lo) else lo,
        "mean_auroc_ci_high": None if math.isnan(hi) else hi,
        "model_hash": bundle.content_hash(),
        "manifest_hash": fs.manifest_hash,
    }
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
