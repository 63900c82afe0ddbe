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
from model.compression.allocation import (
    ConsumerCurves,
    Plan,
    allocate,
    fixed_params,
    plan_for_budgets,
    plan_for_params,
)
from model.compression.calibration import Calibration
from model.compression.distill import distill
from model.compression.measure import batched_logits, count_macs
from model.compression.modes import CompressWalk, ExactWalk, PlanWalk
from model.compression.passes import check_problem_sizes, logit_sensitivities, sample_positions
from model.compression.settings import CompressSettings, Progress
from model.compression.surgery import surgery
from model.compression.tolerance import judge_probe
from model.compression.walk import Walk
from model.nets.pruned import PrunedDenseNet

__all__ = [
    "SEARCH_RESOLUTION",
    "Planning",
    "prepare_planning",
    "compress_to_target",
    "finish_network",
    "search_tolerance",
    "run_compression",
]


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
    thresholds: np.ndarray
    flop_price: float
    total: int
    fixed: int
    #: Multiply-adds per image of the whole parent, and of what no budget touches (stem, classifier).
    macs: int
    fixed_macs: int


def prepare_planning(parent_net: PrunedDenseNet, calib: Calibration, settings: CompressSettings,
                     progress: Progress | None, thresholds: np.ndarray) -> Planning:
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
    consumer_macs = allocate(planner.curves, 0.0).macs  # every budget at its full width
    return Planning(parent_net, calib, settings, sens, planner.curves, cache, hold_ref,
                    np.asarray(thresholds, dtype=np.float64), settings.flops_weight * total / max(macs, 1), total,
                    fixed_params(parent_net), macs, max(0, macs - consumer_macs))


def _plan(pl: Planning, target: float, flop_target: float | None) -> Plan:
    """The budgets removing ``target`` of the parameters (and ``flop_target`` of the multiply-adds)."""
    budget = int((1 - target) * pl.total) - pl.fixed
    if flop_target is None:
        plan = plan_for_params(pl.curves, budget, pl.flop_price)
    else:
        plan = plan_for_budgets(pl.curves, budget, (1 - flop_target) * pl.macs - pl.fixed_macs, pl.flop_price)
        if plan is None:
            floor = allocate(pl.curves, 1e40).macs + pl.fixed_macs
            raise BundleError(f"FLOP reduction {flop_target:.3f} is out of reach: at most {1 - floor / pl.macs:.3f} of "
                              f"the multiply-adds can go with one input channel per consumer")
    if plan.params > budget:
        smallest = (plan.params + pl.fixed) / pl.total
        raise BundleError(f"target reduction {target:.3f} is out of reach: at most {1 - smallest:.3f} of the "
                          f"parameters can go with one input channel per consumer")
    return plan


def compress_to_target(pl: Planning, target: float, progress: Progress | None,
                       flop_target: float | None = None) -> tuple[CompressWalk, dict[str, Any]]:
    """One compression pass with the budgets that remove ``target`` of the parameters (and of the FLOPs)."""
    plan = _plan(pl, target, flop_target)
    walk = CompressWalk(pl.parent, pl.calib, pl.settings, sens=pl.sens, plan=plan, cache=pl.cache,
                        progress=progress).run()
    return walk, {"mode": "target", "passes": 1, "lam": plan.lam,
                  "planned_params": plan.params + pl.fixed,
                  "planned_flop_reduction": round(1 - (plan.macs + pl.fixed_macs) / max(pl.macs, 1), 6),
                  "predicted_sq_error": sum(plan.error.values())}


def _reachable_reduction(pl: Planning) -> float:
    """The largest parameter reduction a target pass can deliver (one input channel per consumer)."""
    floor = plan_for_params(pl.curves, 0, pl.flop_price)
    return max(0.0, 1.0 - (floor.params + pl.fixed + 1) / pl.total)


#: The tolerance search stops once the passing and failing reductions are this close.
SEARCH_RESOLUTION = 0.01


def finish_network(pl: Planning, walk: Walk, progress: Progress | None = None
                   ) -> tuple[PrunedDenseNet, dict[str, Any] | None]:
    """Surgery, then (when the settings ask) distillation to the parent: the deployable network."""
    net = surgery(walk.work)
    if pl.settings.distill_epochs <= 0:
        return net, None
    return distill(net, pl.parent, pl.calib.fit, pl.calib.hold, epochs=pl.settings.distill_epochs,
                   lr=pl.settings.distill_lr, seed=pl.settings.seed, progress=progress)


def _judge(pl: Planning, net: PrunedDenseNet) -> dict[str, Any]:
    return judge_probe(pl.hold_ref, batched_logits(net, pl.calib.hold), pl.calib.hold_labels, pl.thresholds,
                       pl.settings, seed=pl.settings.seed)


def search_tolerance(pl: Planning, progress: Progress | None, log: list[str], cap: float | None = None
                     ) -> tuple[Walk, PrunedDenseNet, dict[str, Any] | None, dict[str, Any]]:
    """The largest reduction (at most ``cap``) whose network stays inside the tolerances.

    Each probe is one target pass (as ``--target-reduction``), judged on the held-out calibration
    part by :func:`model.compression.tolerance.judge_probe` (intervals, not points). Fidelity falls
    with the reduction, so a bisection between the largest passing and the smallest failing
    reduction needs few probes (``max_passes``); the first is ``cap`` when given, else half the
    reachable reduction. Probes are judged on their re-fitted network; the distillation of the
    chosen one keeps the re-fit unless an epoch improves its held-out |Δlogit|.
    """
    settings = pl.settings
    lo, hi = 0.0, _reachable_reduction(pl)
    hi = min(hi, cap) if cap is not None else hi
    r = hi if cap is not None else 0.5 * hi
    best: tuple[Walk, dict[str, Any]] | None = None
    probes: list[dict[str, Any]] = []
    for _ in range(settings.max_passes):
        walk, _info = compress_to_target(pl, r, progress, settings.target_flop_reduction)
        net = surgery(walk.work)
        verdict = _judge(pl, net)
        ok = verdict["within_tolerance"]
        params = sum(q.numel() for q in net.parameters())
        probes.append({"target": round(r, 6), "params": params, "within_tolerance": ok,
                       "flip_rate": verdict["flip_rate"], "holdout_mean_dlogit": verdict["mean_abs_dlogit"],
                       "holdout_max_dlogit": verdict["max_abs_dlogit"], "failed": verdict["failed"]})
        log.append(f"probe {len(probes)}: target reduction {r:.3f}, {params:,} parameters, held-out flip rate "
                   f"{verdict['flip_rate']['estimate']:.4%}, mean |Δlogit| {verdict['mean_abs_dlogit']:.4g}: "
                   + ("within tolerance" if ok else "; ".join(verdict["failed"])))
        if ok:
            lo = r
            if best is None or params < best[1]["params"]:
                best = (walk, {"mode": "tolerance", "target": round(r, 6), "params": params})
        else:
            hi = r
        if hi - lo <= SEARCH_RESOLUTION or (ok and cap is not None and r >= cap):
            break
        r = 0.5 * (lo + hi)
    if best is None:
        log.append("no probe met the tolerance; falling back to the exact stage only")
        walk = ExactWalk(pl.parent, pl.calib, settings, cache=pl.cache, progress=progress).run()
        return walk, surgery(walk.work), None, {"mode": "exact (fallback)", "passes": len(probes) + 1,
                                                "probes": probes}
    walk, entry = best
    net, record = finish_network(pl, walk)
    final = _judge(pl, net)
    if record is not None and not final["within_tolerance"]:  # distillation may not undo a passing probe
        log.append("the distilled network left the tolerances (" + "; ".join(final["failed"]) + "): kept the re-fit")
        net, record = surgery(walk.work), None
        final = _judge(pl, net)
    entry.update(passes=len(probes), probes=probes, final=final)
    return walk, net, record, entry


def run_compression(parent_net: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *,
                    thresholds: np.ndarray, progress: Progress | None, log: list[str]
                    ) -> tuple[Walk, PrunedDenseNet, dict[str, Any] | None, dict[str, Any]]:
    """The exact stage only, one target pass, or the tolerance search, as ``settings`` ask.

    Returns the walk (its records are the history), the deployable network, the distillation
    record (None without one) and what was done.
    """
    if settings.exact_only or (settings.target_reduction is None and not settings.tolerances):
        walk = ExactWalk(parent_net, calib, settings, progress=progress)
        check_problem_sizes(parent_net, calib, walk.samples)
        walk.run()
        return walk, surgery(walk.work), None, {"mode": "exact", "passes": 1}
    pl = prepare_planning(parent_net, calib, settings, progress, thresholds)
    if settings.target_reduction is not None and not settings.tolerances:
        walk, info = compress_to_target(pl, settings.target_reduction, progress, settings.target_flop_reduction)
        net, record = finish_network(pl, walk)
        return walk, net, record, info
    return search_tolerance(pl, progress, log, cap=settings.target_reduction)
