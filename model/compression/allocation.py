"""Budget allocation: how many inputs (and bottleneck channels) each consumer keeps.

The planning walk records, per consumer, the elimination curve "inputs kept -> added error" on the
original activations (:class:`ConsumerCurves`). One price ``lam`` per unit of saved resource then
picks every consumer's budget at once (a Lagrangian allocation), and a bisection on ``lam`` meets a
parameter budget (:func:`plan_for_params`) or an error budget (:func:`plan_for_error`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.nets.pruned import PrunedDenseNet

__all__ = ["ConsumerCurves", "Plan", "allocate", "fixed_params", "plan_for_budgets", "plan_for_error", "plan_for_params"]

#: ``[(inputs kept, added weighted error per sample)]``, from all inputs down to one.
Curve = list[tuple[int, float]]


@dataclass
class ConsumerCurves:
    """One consumer's elimination curves, measured by the planning walk.

    ``kind`` is ``dense`` (a dense layer: ``conv1`` inputs, then the bottleneck = ``conv2`` inputs),
    ``transition`` or ``head``. ``share[i]`` is the part of the ``conv1`` output sensitivity carried
    by the ``i + 1`` bottleneck channels that elimination removes last.
    """

    kind: str
    inputs: int
    inputs_curve: Curve
    #: Spatial positions per image (1 for the head): what one kept input costs in multiply-adds.
    hw: int
    #: Dense layers: bottleneck width, produced channels, bottleneck curve and sensitivity share.
    mid: int = 0
    growth: int = 0
    bottleneck_curve: Curve = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    #: Transitions and the head: output channels.
    outputs: int = 0


@dataclass
class Plan:
    """Per-consumer budgets: kept inputs (and bottleneck channels), predicted error, total, price."""

    inputs: dict[str, int]
    bottleneck: dict[str, int]
    error: dict[str, float]
    params: int
    lam: float
    #: Multiply-adds of the budgeted consumers per image (at the calibration resolution).
    macs: int = 0


#: A consumer keeps all its inputs or cuts at least this share of them: a cut of a few channels
#: turns a free prefix read into a gather (an extra copy of everything it reads) and saves less
#: than that copy costs, so such a layer is kept whole (the same for a bottleneck).
MIN_CUT = 0.1


def _curve_arrays(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """The curve's (kept, error) points, without the cuts smaller than :data:`MIN_CUT`."""
    ks = np.array([c[0] for c in curve], dtype=np.int64)
    es = np.array([c[1] for c in curve], dtype=np.float64)
    full = ks.max() if len(ks) else 0
    ok = (ks == full) | (ks <= (1 - MIN_CUT) * full)
    return ks[ok], es[ok]


def fixed_params(net: PrunedDenseNet) -> int:
    """Parameters no consumer budget touches: stem and classifier bias."""
    f = net.features
    return int(f.conv0.weight.numel() + f.norm0.weight.numel() * 2 + net.classifier.out_features)


def allocate(curves: dict[str, ConsumerCurves], lam: float, flop_price: float = 0.0, mac_lam: float = 0.0) -> Plan:
    """Per consumer, the budget minimising ``error + lam * (parameters + flop_price * MACs) + mac_lam * MACs``.

    One price for all layers equalises the marginal error per saved resource, so the reduction
    goes where reconstruction is cheap. ``flop_price`` > 0 also values multiply-adds (early,
    high-resolution layers), which is what makes the CPU faster; ``mac_lam`` is the separate
    multiplier of a FLOP budget (:func:`plan_for_budgets`).
    """
    k, kb, err, params, total_macs = {}, {}, {}, 0, 0
    for name, c in curves.items():
        ks, es = _curve_arrays(c.inputs_curve)
        hw = c.hw
        if c.kind == "dense":
            kbs, ebs = _curve_arrays(c.bottleneck_curve)
            share = np.asarray(c.share, dtype=np.float64)
            rho = share[np.clip(kbs - 1, 0, len(share) - 1)]
            macs = ks[:, None] * kbs[None, :] + 9 * kbs[None, :] * c.growth
            p = 2 * ks[:, None] + macs + 2 * kbs[None, :]
            e = es[:, None] * rho[None, :] + ebs[None, :]
            cost = e + lam * (p + flop_price * hw * macs) + mac_lam * hw * macs
            i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
            k[name], kb[name], err[name], params = int(ks[i]), int(kbs[j]), float(e[i, j]), params + int(p[i, j])
            total_macs += int(hw * macs[i, j])
        else:
            p = 2 * ks + ks * c.outputs
            cost = es + lam * (p + flop_price * hw * ks * c.outputs) + mac_lam * hw * ks * c.outputs
            i = int(np.argmin(cost))
            k[name], err[name], params = int(ks[i]), float(es[i]), params + int(p[i])
            total_macs += int(hw * ks[i] * c.outputs)
    return Plan(k, kb, err, params, lam, total_macs)


def plan_for_params(curves: dict[str, ConsumerCurves], budget: int, flop_price: float = 0.0, mac_lam: float = 0.0,
                    *, steps: int = 90) -> Plan:
    """The plan of the smallest price whose parameters fit ``budget`` (bisection on log10 lambda)."""
    lo, hi = -40.0, 40.0  # log10 lambda
    best = None
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        plan = allocate(curves, 10.0**mid, flop_price, mac_lam)
        if plan.params <= budget:
            best = plan
            hi = mid
        else:
            lo = mid
    if best is None:
        best = allocate(curves, 10.0**40, flop_price, mac_lam)
    return best


def plan_for_budgets(curves: dict[str, ConsumerCurves], budget: int, mac_budget: float, flop_price: float = 0.0
                     ) -> Plan | None:
    """The plan within both a parameter and a multiply-add budget (two multipliers), or None.

    Parameters alone are met by the smallest parameter price; when that plan's multiply-adds are
    over ``mac_budget``, a second price on multiply-adds is raised (bisection on its log10) until
    they fit, the parameter price re-fitted at each step -- so more parameters may go than the
    parameter target asks, but only where that buys the FLOPs.
    """
    plan = plan_for_params(curves, budget, flop_price)
    if plan.params > budget or plan.macs <= mac_budget:
        return plan
    lo, hi, best = -40.0, 40.0, None
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        plan = plan_for_params(curves, budget, flop_price, 10.0**mid, steps=48)
        if plan.macs <= mac_budget and plan.params <= budget:
            best, hi = plan, mid
        else:
            lo = mid
    return best


def plan_for_error(curves: dict[str, ConsumerCurves], budget: float, flop_price: float = 0.0) -> Plan:
    """The plan of the largest price whose predicted squared error stays within ``budget``."""
    lo, hi = -40.0, 40.0
    best = allocate(curves, 10.0**-40, flop_price)
    for _ in range(90):
        mid = 0.5 * (lo + hi)
        plan = allocate(curves, 10.0**mid, flop_price)
        if sum(plan.error.values()) <= budget:
            best = plan
            lo = mid
        else:
            hi = mid
    return best
