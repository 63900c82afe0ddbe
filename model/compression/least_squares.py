"""Least squares: ridge re-fits towards the old weights, their ridge, and backward elimination.

A consumer keeps a subset ``keep`` of its inputs and is re-fitted so that ``A[:, keep] W^T + b``
reproduces its original output ``Z`` (statistics from :mod:`model.compression.statistics`). The
ridge pulls ``W`` towards the old weights, not to zero; where samples are few per unknown it is
chosen by 2-fold cross-validation. :func:`eliminate` ranks inputs by what removing them costs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model.compression.statistics import Moments, Stats

__all__ = [
    "EXACT_RIDGE",
    "RIDGE_GRID",
    "CV_SAMPLES_PER_UNKNOWN",
    "absolute_ridge",
    "choose_ridge",
    "refit",
    "ridge_to_json",
    "ridge_from_json",
    "eliminate",
]

#: Ridge of the exact stage's folds (relative to the mean variance): numerically zero.
EXACT_RIDGE = 1e-10


def absolute_ridge(cov: torch.Tensor, rel: float) -> float:
    k = cov.shape[0]
    return float(rel * max(torch.trace(cov).item() / max(k, 1), 1e-30))


def _solve_spd(mat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(mat, rhs, driver="gelsd").solution


#: Relative ridges tried by cross-validation; ``inf`` keeps the old weights (only re-centres the bias).
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
#: Cross-validate the ridge when a problem has fewer than this many samples per unknown.
CV_SAMPLES_PER_UNKNOWN = 20


def _fit_stats(s: Stats, keep: torch.Tensor, w_old: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    cov = s.cov[keep][:, keep]
    w0 = w_old[:, keep].double()
    if math.isinf(ridge):
        w = w0
    else:
        resid_cross = s.cross[keep] - cov @ w0.T
        reg = absolute_ridge(cov, ridge)
        delta = _solve_spd(cov + reg * torch.eye(cov.shape[0], dtype=cov.dtype), resid_cross)
        w = w0 + delta.T
    b = s.mean_z - w @ s.mean_a[keep]
    return w, b


def _val_error(s: Stats, keep: torch.Tensor, w: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> float:
    """Weighted mean squared error of ``Z ≈ A[:, keep] W^T + b`` on the sample summarised by ``s``."""
    cov = s.cov[keep][:, keep]
    quad = ((w @ cov) * w).sum(1)
    lin = (w * s.cross[keep].T).sum(1)
    bias = (s.mean_z - w @ s.mean_a[keep] - b) ** 2
    return float((weights.double() * (s.var_z + quad - 2 * lin + bias)).sum())


def choose_ridge(m: Moments, keep: torch.Tensor, w_old: torch.Tensor, ridge: float,
                 weights: torch.Tensor | None) -> float:
    """The default ridge, or -- with few samples per unknown -- the 2-fold cross-validated best one."""
    if m.n >= CV_SAMPLES_PER_UNKNOWN * (len(keep) + 1):
        return ridge
    folds = m.folds()
    if folds is None:
        return ridge
    weights = weights if weights is not None else torch.ones(w_old.shape[0], dtype=torch.float64)
    best, best_err = ridge, math.inf
    for r in RIDGE_GRID:
        err = 0.0
        for f in (0, 1):
            w, b = _fit_stats(folds[f], keep, w_old, r)
            err += _val_error(folds[1 - f], keep, w, b, weights)
        if err < best_err - 1e-15 * abs(best_err if math.isfinite(best_err) else 0):
            best, best_err = r, err
    return best


def refit(m: Moments, keep: torch.Tensor, w_old: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``Z ≈ A[:, keep] @ W.T + b`` with ridge pulling ``W`` towards ``w_old[:, keep]``.

    Returns float32 ``W`` (o x k) and ``b`` (o,). Shrinking towards the old weights (not to zero)
    means a consumer that loses few inputs barely moves, and ill-posed directions stay put.
    """
    w, b = _fit_stats(Stats(float(m.n), m.mean_a, m.mean_z, m.cov, m.cross, m.var_z), keep, w_old, ridge)
    return w.float(), b.float()


def ridge_to_json(r: float) -> float | str:
    return "inf" if math.isinf(r) else float(r)


def ridge_from_json(v: Any, default: float) -> float:
    if v is None:
        return default
    return math.inf if v == "inf" else float(v)


def eliminate(
    m: Moments, weights: torch.Tensor, ridge: float, *, candidates: torch.Tensor, stop: int, group: int = 1,
    frac: float = 0.03,
) -> tuple[list[int], list[tuple[int, float]]]:
    """Backward elimination of feature groups by least-squares cost (chunked, exact block updates).

    Returns the removal order (group ids, cheapest first) and the curve ``[(groups kept, added
    weighted error per sample)]`` from ``len(candidates)`` down to ``stop`` groups.
    """
    cand = candidates.tolist()
    if len(cand) <= stop:
        return [], [(len(cand), 0.0)]
    cols = torch.tensor([g * group + t for g in cand for t in range(group)], dtype=torch.long)
    cov = m.cov[cols][:, cols]
    reg = absolute_ridge(cov, max(ridge, 1e-8))
    p = torch.linalg.inv(cov + reg * torch.eye(len(cols), dtype=cov.dtype))
    p = 0.5 * (p + p.T)
    wst = p @ (m.cross[cols] * weights.double().clamp_min(0).sqrt()[None, :])
    alive = list(range(len(cand)))
    order: list[int] = []
    err = 0.0
    curve = [(len(cand), 0.0)]
    while len(alive) > stop:
        ng = len(alive)
        if group == 1:
            cost = (wst**2).sum(1) / torch.diagonal(p).clamp_min(1e-300)
        else:
            blocks = p.reshape(ng, group, ng, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            wg = wst.reshape(ng, group, -1)
            sol = torch.linalg.solve(blocks, wg)
            cost = (wg * sol).sum(dim=(1, 2))
        t = min(max(1, int(frac * ng)), ng - stop)
        pick = torch.argsort(cost, stable=True)[:t]
        picked = set(pick.tolist())
        keep_g = [i for i in range(ng) if i not in picked]
        tcols = (pick[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        kcols = (torch.tensor(keep_g, dtype=torch.long)[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        ptt = p[tcols][:, tcols]
        pkt = p[kcols][:, tcols]
        wt = wst[tcols]
        sol = torch.linalg.solve(ptt, torch.cat([wt, pkt.T], 1))
        err += float((wt * sol[:, : wt.shape[1]]).sum())
        wst = wst[kcols] - pkt @ sol[:, : wt.shape[1]]
        p = p[kcols][:, kcols] - pkt @ sol[:, wt.shape[1] :]
        order.extend(cand[alive[i]] for i in pick.tolist())
        alive = [alive[i] for i in keep_g]
        curve.append((len(alive), err))
    return order, curve
