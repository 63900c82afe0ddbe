"""The four walks: what each mode does at a consumer (the traversal is :class:`~model.compression.walk.Walk`).

* :class:`PlanWalk` measures elimination curves on the original activations; nothing changes.
* :class:`ExactWalk` removes dead, constant and linearly dependent inputs only (lossless).
* :class:`CompressWalk` does the exact removals, then eliminates inputs down to a plan's budgets
  and re-fits.
* :class:`ReplayWalk` re-fits with the index sets and ridges a history entry recorded.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.core.errors import BundleError
from model.compression.allocation import ConsumerCurves, Plan
from model.compression.calibration import Calibration
from model.compression.least_squares import eliminate, ridge_from_json
from model.compression.settings import CompressSettings, Progress
from model.compression.statistics import (
    DEPENDENT_TOL,
    Moments,
    dependent_channels,
    exact_removals,
    moments_3x3,
    moments_of,
    sample_rows,
    well_sampled,
)
from model.compression.walk import DenseSite, SimpleSite, Walk
from model.nets.pruned import PrunedDenseNet, decode_index

__all__ = ["PLAN_FRAC", "PlanWalk", "ExactWalk", "CompressWalk", "ReplayWalk", "local_positions"]

#: Share of the remaining inputs removed per elimination step (planning curves are coarser).
PLAN_FRAC = 0.06

BottleneckChoice = tuple[torch.Tensor, Moments | None, dict[str, list[int]] | None]


class PlanWalk(Walk):
    """Elimination curves of every consumer on the original activations (``curves``); nothing changes."""

    changes_network = False

    def __init__(self, parent: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *,
                 sens: dict[str, torch.Tensor] | None = None, cache: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(parent, calib, settings, sens=sens, cache=cache, progress=progress)
        self.curves: dict[str, ConsumerCurves] = {}

    def fit_dense(self, site: DenseSite) -> None:
        ridge = self.settings.ridge
        n_in, mid = len(site.candidates), site.mid
        _, inputs_curve = eliminate(site.conv1_moments, site.conv1_sens, ridge, candidates=torch.arange(n_in),
                                    stop=1, frac=PLAN_FRAC)
        conv2_moments = moments_3x3(site.conv2_in_orig, site.conv2_out_orig, site.positions_3x3)
        order_b, bottleneck_curve = eliminate(conv2_moments, site.conv2_sens, ridge, candidates=torch.arange(mid),
                                              stop=1, group=9, frac=PLAN_FRAC)
        rest = [i for i in range(mid) if i not in set(order_b)]
        rank = order_b + rest  # removal order; the survivors last
        s_z1 = site.conv1_sens
        share = s_z1[torch.tensor(rank[::-1])].cumsum(0) / s_z1.sum().clamp_min(1e-300)
        hw = int(site.conv1_in_now.shape[2] * site.conv1_in_now.shape[3])
        self.curves[site.name] = ConsumerCurves(
            kind="dense", inputs=n_in, inputs_curve=inputs_curve, hw=hw, mid=mid, growth=site.growth,
            bottleneck_curve=bottleneck_curve, share=share.tolist())

    def fit_simple(self, site: SimpleSite) -> None:
        n_in = len(site.candidates)
        _, curve = eliminate(site.moments, site.sens, self.settings.ridge, candidates=torch.arange(n_in), stop=1,
                             frac=PLAN_FRAC)
        self.curves[site.name] = ConsumerCurves(kind=site.kind, inputs=n_in, inputs_curve=curve,
                                                hw=site.hw, outputs=site.outputs)


def _exact_free(moments: Moments, ranges: tuple[torch.Tensor, torch.Tensor], n_in: int, *, dependent: bool
                ) -> tuple[dict[str, list[int]], set[int], torch.Tensor]:
    """The exact stage's removals (by kind), all removed inputs, and the inputs left free."""
    found = exact_removals(moments, *ranges, dependent=dependent)
    gone = set(found["dead"]) | set(found["constant"]) | set(found["dependent"])
    free = torch.tensor([i for i in range(n_in) if i not in gone], dtype=torch.long)
    return found, gone, free


def _exact_bottleneck(walk: Walk, site: DenseSite, conv2_in_now: torch.Tensor, *, dependent: bool
                      ) -> tuple[list[int], list[int], torch.Tensor]:
    """Dead (and with ``dependent``, linearly dependent) bottleneck channels, and the rest."""
    mid = site.mid
    lo_mid, hi = walk.ranges[site.name + ".mid"]
    dead = [i for i in range(mid) if float(hi[i]) == 0.0]
    dep: list[int] = []
    if dependent:
        center = moments_of(sample_rows(conv2_in_now, site.positions_3x3),
                            sample_rows(site.conv2_out_orig, site.positions_3x3), exact=True)
        gram = center.cov + torch.outer(center.mean_a, center.mean_a)  # uncentred: zero padding
        alive = well_sampled([i for i in range(mid) if i not in set(dead)], torch.diagonal(gram), lo_mid, hi)
        if len(alive) > 1:
            ia = torch.tensor(alive)
            dep = [alive[i] for i in dependent_channels(gram[ia][:, ia], DEPENDENT_TOL)]
    free = torch.tensor([i for i in range(mid) if i not in set(dead) | set(dep)], dtype=torch.long)
    return dead, dep, free


def _with_bottleneck(exact_info: dict[str, list[int]] | None, dead: list[int], dep: list[int]
                     ) -> dict[str, list[int]] | None:
    if exact_info is None:
        return None
    return {**exact_info, "bottleneck_dead": dead, "bottleneck_dependent": dep}


class ExactWalk(Walk):
    """The exact stage only: dead, constant and linearly dependent inputs go, to float tolerance."""

    def float64_statistics(self, name: str) -> bool:
        return True

    def fit_dense(self, site: DenseSite) -> None:
        found, _, free = _exact_free(site.conv1_moments, self.ranges[site.name], len(site.candidates), dependent=True)
        self.install_dense(site, free, None, "exact", exact_info=found)

    def bottleneck(self, site: DenseSite, conv2_in_now: torch.Tensor, request: Any,
                   exact_info: dict[str, list[int]] | None) -> BottleneckChoice:
        dead, dep, free = _exact_bottleneck(self, site, conv2_in_now, dependent=True)
        return free, None, _with_bottleneck(exact_info, dead, dep)

    def fit_simple(self, site: SimpleSite) -> None:
        found, gone, free = _exact_free(site.moments, self.ranges[site.name], len(site.candidates), dependent=True)
        self.exact_found[site.name] = {k: len(v) for k, v in found.items()}
        self.install_simple(site, free, "exact" if gone else "keep")


class CompressWalk(Walk):
    """Exact removals, then backward elimination to the plan's budgets and least-squares re-fits."""

    def __init__(self, parent: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *, plan: Plan,
                 sens: dict[str, torch.Tensor] | None = None, cache: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(parent, calib, settings, sens=sens, cache=cache, progress=progress)
        self.plan = plan

    def fit_dense(self, site: DenseSite) -> None:
        name, mid = site.name, site.mid
        n_in = len(site.candidates)
        found, _, free = _exact_free(site.conv1_moments, self.ranges[name], n_in, dependent=False)
        k_plan = min(self.plan.inputs.get(name, n_in), len(free))
        order, _ = eliminate(site.conv1_moments, site.conv1_sens, self.settings.ridge, candidates=free,
                             stop=max(1, k_plan))
        removed = set(order[: len(free) - k_plan])
        keep = torch.tensor([i for i in free.tolist() if i not in removed], dtype=torch.long)
        self.install_dense(site, keep, self.plan.bottleneck.get(name, mid), "ls", exact_info=found)

    def bottleneck(self, site: DenseSite, conv2_in_now: torch.Tensor, request: Any,
                   exact_info: dict[str, list[int]] | None) -> BottleneckChoice:
        """Dead bottleneck channels go, then backward elimination (3x3 groups) down to ``request``."""
        dead, dep, free = _exact_bottleneck(self, site, conv2_in_now, dependent=False)
        kb = max(1, min(int(request), len(free)))
        conv2_moments = moments_3x3(conv2_in_now, site.conv2_out_orig, site.positions_3x3, exact=site.float64)
        order, _ = eliminate(conv2_moments, site.conv2_sens, self.settings.ridge, candidates=free, stop=kb, group=9)
        removed = set(order[: len(free) - kb])
        keep = torch.tensor([i for i in free.tolist() if i not in removed], dtype=torch.long)
        return keep, conv2_moments, _with_bottleneck(exact_info, dead, dep)

    def fit_simple(self, site: SimpleSite) -> None:
        name = site.name
        n_in = len(site.candidates)
        found, _, free = _exact_free(site.moments, self.ranges[name], n_in, dependent=False)
        self.exact_found[name] = {k: len(v) for k, v in found.items()}
        k_plan = min(self.plan.inputs.get(name, n_in), len(free))
        order, _ = eliminate(site.moments, site.sens, self.settings.ridge, candidates=free, stop=max(1, k_plan))
        removed = set(order[: len(free) - k_plan])
        keep = torch.tensor([i for i in free.tolist() if i not in removed], dtype=torch.long)
        self.install_simple(site, keep, "ls")


def local_positions(cand: torch.Tensor, keep: list[int], name: str) -> torch.Tensor:
    """Recorded channels (block positions) as positions among the consumer's current inputs."""
    where = {int(v): i for i, v in enumerate(cand.tolist())}
    missing = [v for v in keep if v not in where]
    if missing:
        raise BundleError(f"history: consumer {name} keeps channel(s) {missing[:5]} its parent does not read")
    return torch.tensor([where[v] for v in keep], dtype=torch.long)


class ReplayWalk(Walk):
    """Re-fits with the recorded index sets (``records``: consumer name -> history record)."""

    def __init__(self, parent: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *,
                 records: dict[str, dict[str, Any]], progress: Progress | None = None) -> None:
        super().__init__(parent, calib, settings, progress=progress)
        self.recorded = records

    def _record(self, name: str) -> dict[str, Any]:
        rec = self.recorded.get(name)
        if rec is None:
            raise BundleError(f"history has no record for consumer {name}")
        return rec

    def float64_statistics(self, name: str) -> bool:
        return self._record(name)["fit"] != "ls"

    def fit_dense(self, site: DenseSite) -> None:
        name, rec = site.name, self._record(site.name)
        keep = local_positions(site.candidates, decode_index(rec["keep"], where=f"history {name}.keep"), name)
        keep_mid = torch.tensor(decode_index(rec["mid"], where=f"history {name}.mid"), dtype=torch.long)
        ridges = rec.get("ridge") or [None, None]
        ridge = self.settings.ridge
        self.install_dense(site, keep, keep_mid, rec["fit"],
                           ridges=(ridge_from_json(ridges[0], ridge), ridge_from_json(ridges[1], ridge)))

    def bottleneck(self, site: DenseSite, conv2_in_now: torch.Tensor, request: Any,
                   exact_info: dict[str, list[int]] | None) -> BottleneckChoice:
        return request, None, exact_info

    def fit_simple(self, site: SimpleSite) -> None:
        name, rec = site.name, self._record(site.name)
        keep = local_positions(site.candidates, decode_index(rec["keep"], where=f"history {name}.keep"), name)
        self.install_simple(site, keep, rec["fit"], ridge=ridge_from_json(rec.get("ridge"), self.settings.ridge))
