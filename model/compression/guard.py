"""The AUROC criterion a compression is judged by (point estimates; the statistical one is in ``tolerance``)."""

from __future__ import annotations

import numpy as np

from model.metrics import auroc_rows

__all__ = ["WORST_LABEL_FACTOR", "auroc_within", "label_aurocs"]


#: A single label may move this many times the mean tolerance (the benchmark's 0.001 / 0.005 pair).
WORST_LABEL_FACTOR = 5.0


def auroc_within(ref_auroc: np.ndarray, new_auroc: np.ndarray, tol: float) -> tuple[bool, float, float]:
    """The AUROC criterion: ``|mean ΔAUROC| <= tol`` and every label's ``|ΔAUROC| <= 5 tol``.

    Labels without both classes are ignored. Returns (ok, |mean Δ|, worst label |Δ|). Both
    directions count: a compressed model that ranks differently is not the same model.
    """
    d = np.asarray(new_auroc, dtype=np.float64) - np.asarray(ref_auroc, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return True, 0.0, 0.0
    mean, worst = abs(float(d.mean())), float(np.abs(d).max())
    return bool(mean <= tol + 1e-12 and worst <= WORST_LABEL_FACTOR * tol + 1e-12), mean, worst


def label_aurocs(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if len(labels) == 0:
        return np.full(labels.shape[1], np.nan)
    return auroc_rows(labels.T.astype(np.float64), logits.T.astype(np.float64))
