"""Input drift: the audited images' pooled features no longer look like a reference sample.

A kernel two-sample test (unbiased MMD^2 with an RBF kernel, median-heuristic bandwidth, features
standardised by the reference) on a subsample of each side, with a permutation p-value. The bundle
does not store training features, so the reference must be given (``MonitorContext.
reference_features``, e.g. the training images under this model; CLI ``--reference-data``).
Without one the monitor says so with an informational ``cannot_assess`` fact rather than comparing
the data with itself. Informational: drift explains other facts but is not itself treated.
"""

from __future__ import annotations

import numpy as np

from engine.core.facts import IssueFact
from engine.monitors.base import Monitor, MonitorContext, finite_rows
from rules.policy.monitors import MonitorConfig

__all__ = ["InputDriftMonitor", "mmd_permutation_test"]

_SECTION = "input_drift"


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int | list[int]) -> tuple[float, float]:
    """Unbiased MMD^2 between samples ``x`` and ``y`` (RBF kernel) and its permutation p-value."""
    z = np.concatenate([x, y]).astype(np.float64)
    zz = (z * z).sum(axis=1)
    d2 = np.maximum(zz[:, None] + zz[None, :] - 2.0 * z @ z.T, 0.0)  # BLAS; scipy's cdist is ~30x slower here
    np.fill_diagonal(d2, 0.0)
    off = d2[~np.eye(len(z), dtype=bool)]
    scale = float(np.median(off)) if off.size else 1.0
    k = np.exp(-d2 / (scale if scale > 0 else 1.0))
    m, n = len(x), len(y)
    rng = np.random.default_rng(seed)
    assign = np.zeros((n_permutations + 1, m + n), dtype=np.float64)
    assign[0, :m] = 1.0
    for i in range(1, n_permutations + 1):
        assign[i, rng.permutation(m + n)[:m]] = 1.0
    ka = assign @ k  # (P+1, m+n)
    s_xx = (ka * assign).sum(axis=1)
    s_xy = (ka * (1 - assign)).sum(axis=1)
    total = k.sum()
    s_yy = total - s_xx - 2 * s_xy
    diag = 1.0  # RBF kernel: k(z, z) = 1
    mmd = (s_xx - m * diag) / (m * (m - 1)) + (s_yy - n * diag) / (n * (n - 1)) - 2 * s_xy / (m * n)
    pvalue = (1 + int((mmd[1:] >= mmd[0]).sum())) / (1 + n_permutations)
    return float(mmd[0]), float(pvalue)


class InputDriftMonitor(Monitor):
    name = "input_drift"
    kinds = ("input_drift", "cannot_assess")
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        cfg = config.input_drift
        if not cfg.enabled:
            return []
        if ctx.reference_features is None:
            return [self._cannot("no reference feature sample was given (CLI: --reference-data)")]
        ref = np.asarray(ctx.reference_features)
        cur = np.asarray(ctx.data.features)
        if ref.ndim != 2 or ref.shape[1] != cur.shape[1]:
            return [self._cannot(f"reference features have shape {ref.shape}, audited features {cur.shape}")]
        ref = ref[np.isfinite(ref).all(axis=1)]
        cur_rows = np.flatnonzero(finite_rows(ctx.data))
        if min(len(ref), len(cur_rows)) < cfg.min_rows:
            return [self._cannot(f"{len(cur_rows)} audited and {len(ref)} reference rows "
                                 f"(min_rows={cfg.min_rows})")]
        rng = np.random.default_rng([config.seed, 7])
        xs = ref[np.sort(rng.permutation(len(ref))[: cfg.max_samples])].astype(np.float64)
        ys = cur[cur_rows[np.sort(rng.permutation(len(cur_rows))[: cfg.max_samples])]].astype(np.float64)
        mean, std = ref.mean(axis=0, dtype=np.float64), ref.std(axis=0, dtype=np.float64)
        keep = std > 0
        xs = (xs[:, keep] - mean[keep]) / std[keep]
        ys = (ys[:, keep] - mean[keep]) / std[keep]
        mmd, pvalue = mmd_permutation_test(xs, ys, cfg.n_permutations, [config.seed, 8])
        if not (pvalue < cfg.alpha and mmd >= cfg.min_mmd):
            return []
        shift = np.abs(ys.mean(axis=0) - xs.mean(axis=0))
        channels = np.flatnonzero(keep)[np.argsort(-shift, kind="stable")[:10]]
        return [self.fact(
            "input_drift",
            label=None,
            severity="info",
            message=f"pooled features drifted from the reference sample: MMD^2 {mmd:.3f} "
                    f"(permutation p={pvalue:.3g}, {len(ys)} vs {len(xs)} rows).",
            measured={"mmd2": mmd, "p_value": pvalue, "n": len(ys), "n_reference": len(xs)},
            reference={"mmd2": 0.0},
            threshold={f"{_SECTION}.alpha": cfg.alpha, f"{_SECTION}.min_mmd": cfg.min_mmd},
            evidence={"reference_source": ctx.reference_source, "most_shifted_channels": channels.tolist(),
                      "channel_mean_shift_sd": [float(v) for v in np.sort(shift)[::-1][:10]]},
        )]

    def _cannot(self, reason: str) -> IssueFact:
        return self.fact("cannot_assess", label=None, severity="info",
                         message=f"input drift not assessed: {reason}.", evidence={"reason": reason})
