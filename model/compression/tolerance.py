"""The tolerance test of a compression probe: statistics on the held-out calibration part, not points.

Why. The held-out part is small (about 130 images on the NIH sample): one swapped pair of a
2-positive label moves its AUROC by 0.005, so a point criterion stops a compression at noise.
Each criterion therefore carries its interval and fails only on what the interval shows:

* **flip rate** -- the share of (image, label) decisions at the bundle thresholds that the
  compressed model flips. Its upper bound (Wilson over the decisions) must stay within
  ``max_flip_rate``: the fewer images, the sooner it binds, which is how the NIH sample stops
  "where its intervals say";
* **AUROC, per label and pooled** -- the paired-bootstrap interval of ΔAUROC (``model.paired``)
  must not lie wholly beyond the tolerance (``|mean Δ| <= max_auroc_drop``, every label
  ``<= 5 x`` it): a ranking change shown beyond noise fails, a noise-level point does not;
* **max |Δlogit|** -- only when the settings give ``max_logit_delta`` (a point bound by design).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.compression.measure import decision_flips
from model.compression.settings import CompressSettings
from model.paired import paired_auroc_delta, paired_mean_auroc_delta, wilson_interval

__all__ = ["TOLERANCE_BOOT", "WORST_LABEL_FACTOR", "judge_probe"]

#: A single label may move this many times the mean tolerance (the benchmark's 0.001 / 0.005 pair).
WORST_LABEL_FACTOR = 5.0

#: Bootstrap resamples per interval (one probe judges 15 of them).
TOLERANCE_BOOT = 400


def _beyond(low: float | None, high: float | None, tol: float) -> bool:
    """The interval lies wholly outside ``[-tol, tol]``: a change beyond the tolerance, shown beyond noise."""
    return low is not None and high is not None and (low > tol or high < -tol)


def judge_probe(ref: np.ndarray, new: np.ndarray, labels: np.ndarray, thresholds: np.ndarray,
                settings: CompressSettings, seed: int = 0) -> dict[str, Any]:
    """Whether ``new`` logits stay inside the tolerances against ``ref`` on held-out images; JSON-able."""
    n = len(ref)
    flips = decision_flips(ref, new, thresholds)
    flip = wilson_interval(int(flips.sum()), int(flips.size))
    out: dict[str, Any] = {"n_images": int(n), "flip_rate": flip.to_dict(),
                           "mean_abs_dlogit": float(np.abs(new - ref).mean()) if n else 0.0,
                           "max_abs_dlogit": float(np.abs(new - ref).max()) if n else 0.0, "failed": []}
    if settings.max_flip_rate is not None and (flip.high is None or flip.high > settings.max_flip_rate):
        out["failed"].append(f"flip rate {flip.text(4)} above {settings.max_flip_rate:g}")
    if settings.max_logit_delta is not None and out["max_abs_dlogit"] > settings.max_logit_delta:
        out["failed"].append(f"max |Δlogit| {out['max_abs_dlogit']:.4g} above {settings.max_logit_delta:g}")
    tol = settings.max_auroc_drop
    if tol is not None:
        pooled = paired_mean_auroc_delta(labels, ref, new, n_boot=TOLERANCE_BOOT, seed=seed)
        out["mean_auroc_delta"] = pooled.to_dict()
        if _beyond(pooled.low, pooled.high, tol):
            out["failed"].append(f"mean ΔAUROC {pooled.text(4)} beyond ±{tol:g}")
        per_label = {}
        for k in range(labels.shape[1]):
            d = paired_auroc_delta(labels[:, k], ref[:, k], new[:, k], n_boot=TOLERANCE_BOOT, seed=[seed, k])
            per_label[str(k)] = d.to_dict()
            if _beyond(d.low, d.high, WORST_LABEL_FACTOR * tol):
                out["failed"].append(f"label {k} ΔAUROC {d.text(4)} beyond ±{WORST_LABEL_FACTOR * tol:g}")
        out["label_auroc_delta"] = per_label
    out["within_tolerance"] = not out["failed"]
    return out
