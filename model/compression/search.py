"""How far to go: the planning pass, one pass per target, and the tolerance search.

Planning (logit sensitivities, then every consumer's elimination curves) is shared by all passes
over one (model, calibration) pair. A target pass allocates the budgets that remove a share of
the parameters and runs a :class:`~model.compression.modes.CompressWalk`; with tolerances, a
bisection over target passes finds the largest reduction that stays inside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.core.errors import BundleError
from model.compression.allocation import ConsumerCurves, fixed_params, plan_for_error, plan_for_params
from model.compression.calibration import Calibration
from model.compression.guard import HoldoutGuard, auroc_within
from model.compression.measure import batched_logits, count_macs, fidelity
from model.compression.modes import CompressWalk, ExactWalk, PlanWalk
from model.compression.passes import check_problem_sizes, logit_sensitivities, sample_positions
from model.compression.settings import CompressSettings, Progress
from model.compression.surgery import surgery
from model.compression.walk import Walk
from model.nets.pruned import PrunedDenseNet

__all__ = [
    "SEARCH_RESOLUTION",
    "Planning",
    "prepare_planning",
    "holdout_guard",
    "compress_to_target",
    "search_tolerance",
    "run_compression",
]


def _tolerance_ok(fid: dict[str, Any], settings: CompressSettings) -> bool:
    ok = True
    if settings.max_logit_delta is not None:
        ok &= fid["max_abs_dlogit"] <= settings.max_logit_delta
    if settings.max_auroc_drop is not None:
        rows = [r for r in fid["labels"].values() if r["delta"] is not None]
        ok &= auroc_within(np.array([r["auroc_ref"] for r in rows]), np.array([r["auroc_new"] for r in rows]),
                           settings.max_auroc_drop)[0]
    return bool(ok)


def _default_logit_delta(settings: CompressSettings) -> float:
    """Logit tolerance that steers the budget when only an AUROC tolerance is given.

    AUROC on a few dozen held-out images moves in coarse steps, so on its own it would let the
    selection fit the holdout's ranking; a logit bound keeps the deviation small everywhere.
    """
    if settings.max_logit_delta is not None:
        return settings.max_logit_delta
    return max(0.01, 50 * (settings.max_auroc_drop or 0.001))


@dataclass
class Planning:
    """What every compression pass of one (model, calibration) pair shares."""

    parent: PrunedDenseNet
    calib: Calibration
    settings: CompressSettings
    sens: dict[str, torch.Tensor]
    curves: dict[str, ConsumerCurves]
    cache: dict[str, Any]
    hold_ref: np.ndarray
    flop_price: float
    total: int
    fixed: int


def prepare_planning(parent_net: PrunedDenseNet, calib: Calibration, settings: CompressSettings,
                     progress: Progress | None) -> Planning:
    """Sensitivities, then elimination curves of every consumer on the original activations."""
    cache: dict[str, Any] = {}
    samples = sample_positions(parent_net, calib.fit.shape[0], int(calib.fit.shape[-1]), settings)
    check_problem_sizes(parent_net, calib, samples)
    sens = logit_sensitivities(parent_net, calib.fit[: min(calib.fit.shape[0], 128)], settings.seed)
    # Planning curves only rank budgets: half the samples are plenty.
    plan_settings = settings.replace(positions=max(64, settings.positions // 2),
                                     positions_3x3=max(64, settings.positions_3x3 // 2))
    planner = PlanWalk(parent_net, calib, plan_settings, sens=sens, cache=cache, progress=progress).run()
    total = sum(p.numel() for p in parent_net.parameters())
    size = int(calib.fit.shape[-1])
    macs = count_macs(parent_net, size, int(calib.fit.shape[1]))
    hold_ref = (batched_logits(parent_net, calib.hold) if len(calib.hold)
                else np.zeros((0, parent_net.classifier.out_features)))
    return Planning(parent_net, calib, settings, sens, planner.curves, cache, hold_ref,
                    settings.flops_weight * total / max(macs, 1), total, fixed_params(parent_net))


def holdout_guard(pl: Planning, logit_tol: float | None) -> HoldoutGuard:
    """A per-step guard on the calibration holdout (``compress_targets`` with tolerances)."""
    return HoldoutGuard(pl.hold_ref, pl.calib.hold_labels, logit_tol, pl.settings.max_auroc_drop)


def compress_to_target(pl: Planning, target: float, guard: HoldoutGuard | None, progress: Progress | None
                       ) -> tuple[CompressWalk, dict[str, Any]]:
    """One compression pass with the budgets that remove ``target`` of the parameters."""
    budget = int((1 - target) * pl.total) - pl.fixed
    plan = plan_for_params(pl.curves, budget, pl.flop_price)
    if plan.params > budget:
        smallest = (plan.params + pl.fixed) / pl.total
        raise BundleError(f"target reduction {target:.3f} is out of reach: at most {1 - smallest:.3f} of the "
                          f"parameters can go with one input channel per consumer")
    walk = CompressWalk(pl.parent, pl.calib, pl.settings, sens=pl.sens, plan=plan, guard=guard, cache=pl.cache,
                        progress=progress).run()
    return walk, {"mode": "target" + ("+tolerance" if guard else ""), "passes": 1, "lam": plan.lam,
                  "planned_params": plan.params + pl.fixed, "predicted_sq_error": sum(plan.error.values())}


def _reachable_reduction(pl: Planning) -> float:
    """The largest parameter reduction a target pass can deliver (one input channel per consumer)."""
    floor = plan_for_params(pl.curves, 0, pl.flop_price)
    return max(0.0, 1.0 - (floor.params + pl.fixed + 1) / pl.total)


#: The tolerance search stops once the passing and failing reductions are this close.
SEARCH_RESOLUTION = 0.01


def search_tolerance(pl: Planning, progress: Progress | None, log: list[str], cap: float | None = None
                     ) -> tuple[Walk, dict[str, Any]]:
    """The largest reduction (at most ``cap``) whose target pass stays inside the tolerances.

    Each probe is one unguarded target pass (as ``--target-reduction``) judged once on the held-out
    calibration part; the deviation grows with the reduction, so a bisection between the largest
    passing and the smallest failing reduction needs few probes (``max_passes``). The first probe is
    ``cap`` when given, else the reduction the planning curves predict for the logit tolerance. A
    per-step guard that re-ran the held-out forward after every consumer took over 20 minutes on
    2 cores; this takes at most ``max_passes`` target passes.
    """
    settings = pl.settings
    d_eff = _default_logit_delta(settings)
    tol_settings = settings.replace(max_logit_delta=d_eff)
    k_out = pl.parent.classifier.out_features
    lo, hi = 0.0, _reachable_reduction(pl)
    if cap is not None:
        hi = min(hi, cap)
        r = hi
    else:
        guess = plan_for_error(pl.curves, k_out * (d_eff / 3.5) ** 2, pl.flop_price)
        r = min(max(1.0 - (guess.params + pl.fixed) / pl.total, 2 * SEARCH_RESOLUTION), hi)
    best: tuple[Walk, dict[str, Any]] | None = None
    probes: list[dict[str, Any]] = []
    for _ in range(settings.max_passes):
        walk, _info = compress_to_target(pl, r, None, progress)
        fid = fidelity(pl.hold_ref, batched_logits(walk.work, pl.calib.hold), pl.calib.hold_labels,
                       [str(i) for i in range(k_out)], n_boot=1)
        ok = _tolerance_ok(fid, tol_settings)
        params = sum(q.numel() for q in surgery(walk.work).parameters())
        probes.append({"target": round(r, 6), "params": params, "holdout_max_dlogit": fid["max_abs_dlogit"],
                       "within_tolerance": ok})
        log.append(f"probe {len(probes)}: target reduction {r:.3f}, {params:,} parameters, held-out max "
                   f"|Δlogit| {fid['max_abs_dlogit']:.4g}, within tolerance: {ok}")
        if ok:
            lo = r
            if best is None or params < best[1]["params"]:
                best = (walk, {"mode": "tolerance", "target": round(r, 6), "params": params,
                               "holdout_max_dlogit": fid["max_abs_dlogit"], "logit_tolerance": d_eff})
        else:
            hi = r
        if hi - lo <= SEARCH_RESOLUTION or (ok and cap is not None and r >= cap):
            break
        r = 0.5 * (lo + hi)
    if best is None:
        log.append("no probe met the tolerance; falling back to the exact stage only")
        walk = ExactWalk(pl.parent, pl.calib, settings, cache=pl.cache, progress=progress).run()
        return walk, {"mode": "exact (fallback)", "passes": len(probes) + 1, "probes": probes}
    walk, entry = best
    entry.update(passes=len(probes), probes=probes)
    return walk, entry


def run_compression(parent_net: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *,
                    progress: Progress | None, log: list[str]) -> tuple[Walk, dict[str, Any]]:
    """The exact stage only, one target pass, or the tolerance search, as ``settings`` ask."""
    if settings.exact_only or (settings.target_reduction is None and not settings.tolerances):
        walk = ExactWalk(parent_net, calib, settings, progress=progress)
        check_problem_sizes(parent_net, calib, walk.samples)
        return walk.run(), {"mode": "exact", "passes": 1}
    pl = prepare_planning(parent_net, calib, settings, progress)
    if settings.target_reduction is not None and not settings.tolerances:
        return compress_to_target(pl, settings.target_reduction, None, progress)
    return search_tolerance(pl, progress, log, cap=settings.target_reduction)
