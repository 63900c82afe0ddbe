"""Empirical cost revision: propose a new cost matrix from measured durations and outcomes.

The paper's cost matrix was itself revised this way (partial retraining 6 -> 2 once it was timed
at ~10 s on cached features). This module only *proposes*: it returns a unified diff of the
policy YAML for a human to review and apply; it never edits a policy.

Revision rule, per intervention with at least ``min_observations`` attempts:

1. **Time tier.** The median measured wall time picks a base cost on the reference 0-10 scale
   (the paper's): <= 1 s -> 1 (a threshold), <= 30 s -> 2 (zeroing, classifier retraining on
   cached features), <= 30 min -> 3 (re-optimisation), <= 4 h -> 8 (augmentation),
   longer -> 10 (full retraining).
2. **Failure penalty.** Failed attempts cost a verification and an escalation, so the base is
   multiplied by ``1 + failure_penalty x failure_rate``, where failure_rate = (rejected + error) /
   (accepted + rejected + error); attempts never verified count for time only.
3. **The policy's scale.** The result is multiplied by (the policy's largest intervention cost /
   10), so a site whose costs run 0-6 gets proposals on 0-6, then rounded half-up to a whole
   number, at least 1.

Interventions with fewer observations keep their cost (the row says why); ``no_action`` and
per-label cost overrides are never revised.
"""

from __future__ import annotations

import difflib
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.core.errors import DataError
from rules.policy.load import parse_policy
from rules.policy.schema import NO_ACTION, Policy

__all__ = ["TIME_TIERS", "OUTCOMES", "CostRevision", "RevisedCosts", "revise_costs", "rewrite_costs"]

#: (largest median wall time in seconds, base cost on the reference 0-10 scale).
TIME_TIERS: tuple[tuple[float, float], ...] = (
    (1.0, 1.0),
    (30.0, 2.0),
    (1800.0, 3.0),
    (4 * 3600.0, 8.0),
    (math.inf, 10.0),
)
REFERENCE_SCALE = 10.0
OUTCOMES = ("accepted", "rejected", "error", "unverified")


@dataclass(frozen=True)
class CostRevision:
    """What was measured for one intervention and the cost proposed from it."""

    intervention: str
    n: int
    accepted: int
    rejected: int
    errors: int
    median_time_s: float | None
    failure_rate: float | None
    old_cost: float
    new_cost: float
    reason: str

    @property
    def changed(self) -> bool:
        return self.new_cost != self.old_cost


@dataclass(frozen=True)
class RevisedCosts:
    """The proposal: one row per intervention of the policy, the YAML diff, and what was skipped."""

    policy_name: str
    rows: tuple[CostRevision, ...]
    diff: str
    revised_text: str
    skipped: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> dict[str, tuple[float, float]]:
        return {r.intervention: (r.old_cost, r.new_cost) for r in self.rows if r.changed}


def _round_half_up(x: float) -> float:
    return float(math.floor(x + 0.5))


def _tier(seconds: float) -> float:
    for limit, cost in TIME_TIERS:
        if seconds <= limit:
            return cost
    return TIME_TIERS[-1][1]  # pragma: no cover - the last limit is infinite


def _check_observations(observations: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, obs in enumerate(observations):
        if not isinstance(obs, Mapping):
            raise DataError(f"observation {i}: expected a mapping with intervention, wall_time_s and outcome, "
                            f"got {type(obs).__name__}")
        name = obs.get("intervention")
        if not isinstance(name, str) or not name:
            raise DataError(f"observation {i}: 'intervention' must be a non-empty string, got {name!r}")
        outcome = obs.get("outcome")
        if outcome not in OUTCOMES:
            raise DataError(f"observation {i}: 'outcome' must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        t = obs.get("wall_time_s")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or t < 0):
            raise DataError(f"observation {i}: 'wall_time_s' must be a number >= 0 or null, got {t!r}")
        out.append({"intervention": name, "outcome": outcome, "wall_time_s": None if t is None else float(t)})
    return out


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _revise_one(name: str, old: float, items: list[dict[str, Any]], *, scale: float, min_observations: int,
                failure_penalty: float) -> CostRevision:
    """One intervention's row: what was measured and the cost proposed from it (see the module docstring)."""
    counts = {k: sum(1 for o in items if o["outcome"] == k) for k in OUTCOMES}
    times = [o["wall_time_s"] for o in items if o["wall_time_s"] is not None]
    judged = counts["accepted"] + counts["rejected"] + counts["error"]
    failure = (counts["rejected"] + counts["error"]) / judged if judged else None
    median = statistics.median(times) if times else None
    if len(times) < min_observations:
        new, reason = old, (f"kept: {len(times)} timed attempt(s), fewer than the {min_observations} needed"
                            if items else "kept: never attempted")
    else:
        base = _tier(median)
        raw = base * (1.0 + failure_penalty * (failure or 0.0)) * scale
        new = max(1.0, _round_half_up(raw))
        reason = (f"median {median:.3g} s -> tier {_fmt(base)}; failure rate "
                  f"{'n/a' if failure is None else f'{failure:.0%}'} -> x{1 + failure_penalty * (failure or 0):.2f}"
                  f"; x{scale:.2g} policy scale = {raw:.2f} -> {_fmt(new)}")
    return CostRevision(name, len(items), counts["accepted"], counts["rejected"], counts["error"],
                        median, failure, float(old), float(new), reason)


def revise_costs(
    policy: Policy,
    observations: Iterable[Mapping[str, Any]],
    *,
    text: str | None = None,
    min_observations: int = 3,
    failure_penalty: float = 1.0,
) -> RevisedCosts:
    """Propose revised costs from ``{intervention, wall_time_s, outcome}`` observations.

    ``text`` is the policy's YAML (read from ``policy.source_path`` when omitted; a plain dump of
    the policy when it has no file). The diff changes only the affected ``costs`` entries.
    """
    if min_observations < 1:
        raise ValueError(f"The 'min_observations' parameter must be >= 1. Got {min_observations!r} instead.")
    if failure_penalty < 0:
        raise ValueError(f"The 'failure_penalty' parameter must be >= 0. Got {failure_penalty!r} instead.")
    obs = _check_observations(observations)
    real = {k: v for k, v in policy.costs.items() if k != NO_ACTION}
    scale = (max(real.values()) / REFERENCE_SCALE) if real and max(real.values()) > 0 else 1.0
    by_name: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    for o in obs:
        if o["intervention"] not in real:
            skipped.append(o["intervention"])
            continue
        by_name.setdefault(o["intervention"], []).append(o)

    rows = [_revise_one(name, old, by_name.get(name, []), scale=scale, min_observations=min_observations,
                        failure_penalty=failure_penalty) for name, old in real.items()]
    if text is None:
        if policy.source_path is not None:
            text = Path(policy.source_path).read_text(encoding="utf-8")
        else:
            text = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
    changes = {r.intervention: r.new_cost for r in rows if r.changed}
    revised = rewrite_costs(text, changes) if changes else text
    source = str(policy.source_path) if policy.source_path is not None else f"{policy.name}.yaml"
    if changes:
        check = parse_policy(revised, source)
        wrong = {k: check.costs.get(k) for k, v in changes.items() if check.costs.get(k) != v}
        if wrong:  # pragma: no cover - a bug in rewrite_costs
            raise RuntimeError(f"revised policy text does not carry the proposed costs: {wrong}")
    diff = "".join(difflib.unified_diff(text.splitlines(keepends=True), revised.splitlines(keepends=True),
                                        fromfile=source, tofile=f"{source} (revised)"))
    return RevisedCosts(policy.name, tuple(rows), diff, revised, tuple(sorted(set(skipped))))


def rewrite_costs(text: str, new_costs: Mapping[str, float]) -> str:
    """``text`` with the ``costs`` entries in ``new_costs`` set, touching nothing else (comments stay)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        raise ValueError("policy text is not a mapping")
    costs_node = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "costs"), None)
    values = {name: _fmt(cost) for name, cost in new_costs.items()}
    if costs_node is None:
        block = "costs:\n" + "".join(f"  {name}: {value}\n" for name, value in values.items())
        return text + ("" if text.endswith("\n") or not text else "\n") + block
    if not isinstance(costs_node, yaml.MappingNode):
        raise ValueError("policy 'costs' is not a mapping")
    if costs_node.flow_style or not costs_node.value:
        current = {k.value: v.value for k, v in costs_node.value}
        current.update(values)
        flow = "{" + ", ".join(f"{k}: {v}" for k, v in current.items()) + "}"
        return text[:costs_node.start_mark.index] + flow + text[costs_node.end_mark.index:]
    edits: list[tuple[int, int, str]] = []
    present = set()
    for key_node, value_node in costs_node.value:
        if key_node.value in values:
            present.add(key_node.value)
            edits.append((value_node.start_mark.index, value_node.end_mark.index, values[key_node.value]))
    missing = [name for name in values if name not in present]
    if missing:
        indent = " " * costs_node.value[0][0].start_mark.column
        last = costs_node.value[-1][1]
        line_end = text.find("\n", last.end_mark.index)
        at = len(text) if line_end < 0 else line_end + 1
        prefix = "" if line_end >= 0 else "\n"
        edits.append((at, at, prefix + "".join(f"{indent}{name}: {values[name]}\n" for name in missing)))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text
