"""The AUROC criterion, and the held-out guard that judges one compression step at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model.metrics import auroc_rows

__all__ = ["WORST_LABEL_FACTOR", "HoldoutGuard", "auroc_within", "label_aurocs"]


@dataclass
class HoldoutGuard:
    """Held-out acceptance test of one step: max |Δlogit| against a schedule, and the AUROC criterion.

    AUROC on a few dozen images moves in coarse steps, so once the prefix has used up the AUROC
    tolerance, a later step is still accepted if it leaves the AUROC deviations no worse.
    """

    ref_logits: np.ndarray
    labels: np.ndarray
    max_logit_delta: float | None
    max_auroc_drop: float | None
    ref_auroc: np.ndarray = field(init=False)
    state: tuple[float, float] = (0.0, 0.0)
    last: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        self.ref_auroc = label_aurocs(self.labels, self.ref_logits)

    def check(self, logits: np.ndarray, fraction: float) -> tuple[bool, float, float]:
        """Accept a step? The logit bound grows with the share of the planned error spent so far."""
        dev = float(np.abs(logits - self.ref_logits).max()) if len(logits) else 0.0
        tol = self.max_auroc_drop if self.max_auroc_drop is not None else math.inf
        ok, mean, worst = auroc_within(self.ref_auroc, label_aurocs(self.labels, logits), tol)
        if not ok and math.isfinite(tol):
            ok = mean <= self.state[0] + 1e-12 and worst <= self.state[1] + 1e-12
        self.last = (mean, worst)
        if self.max_logit_delta is not None:
            ok &= dev <= self.max_logit_delta * max(math.sqrt(max(fraction, 0.0)), 0.25)
        return bool(ok), dev, worst

    def commit(self) -> None:
        """The last checked step was kept: its AUROC deviations are the new baseline."""
        self.state = self.last


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
