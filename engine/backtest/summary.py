"""Aggregate backtest verdicts into rates with their intervals, and check the issue's targets.

Per fault family and contender: how often the fault was detected, the model changed, a human was
asked (escalated), the treatment healed, and it harmed; on clean controls, how often a model was
changed at all (a false treatment). Every rate carries its 95 % Wilson interval: with ten seeds a
rate of 0/10 still means "up to 28 %". Approved escalations are summarised apart: what approving
them bought.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from engine.backtest.scenarios import CLEAN
from model.paired import wilson_interval

__all__ = ["ACTIVE_BASELINES", "check_targets", "summarize"]

#: Baselines that change the model (no_action cannot harm, so "half of its harm rate" means nothing).
ACTIVE_BASELINES = ("always_threshold", "always_retrain")


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    iv = wilson_interval(sum(bool(f) for f in flags), len(flags))
    return {"k": sum(bool(f) for f in flags), "n": len(flags), "rate": iv.estimate, "low": iv.low, "high": iv.high}


def _group(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    faults = [r for r in results if r["scenario"]["fault_kind"] != CLEAN]
    clean = [r for r in results if r["scenario"]["fault_kind"] == CLEAN]
    row: dict[str, Any] = {
        "n": len(results),
        "detected": _rate([r["detected"] for r in faults]) if faults else None,
        "changed": _rate([r["changed"] for r in results]),
        "escalated": _rate([r["escalated"] for r in results]),
        "healed": _rate([bool(r["healed"]) for r in faults]) if faults else None,
        "harmed": _rate([r["harmed"] for r in results]),
        "false_treatment": _rate([r["changed"] for r in clean]) if clean else None,
        "mean_cost": round(statistics.fmean(r["cost"] for r in results), 6) if results else None,
        "median_wall_time_s": statistics.median(r["wall_time_s"] for r in results) if results else None,
    }
    shares = [r["healed_share"] for r in faults if r.get("healed_share") is not None]
    # Partial heals (some of the fault's facts gone): the mean share gone, over runs where any fired.
    row["mean_healed_share"] = round(statistics.fmean(shares), 6) if shares else None
    heal = row["healed"]["rate"] if row["healed"] else None
    row["heal_minus_harm"] = None if heal is None else round(heal - row["harmed"]["rate"], 6)
    return row


def summarize(results: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, Any]:
    """``{"by_fault": {fault: {contender: row}}, "overall": {contender: row}, "approved": {...}, "errors": [...]}``.

    ``order`` gives the contenders' order (policies first, as run); others follow by name. Records with an ``error`` (a scenario that could not run) are listed under ``errors`` and left out of the rates.
    """
    errors = [{"scenario": r["scenario"]["name"], "contender": r["contender"], "error": r["error"]}
              for r in results if r.get("error")]
    results = [r for r in results if not r.get("error")]
    kinds = sorted({r["scenario"]["fault_kind"] for r in results}, key=lambda k: (k == CLEAN, k))
    seen = {r["contender"] for r in results}
    names = [c for c in order if c in seen] + sorted(seen - set(order))
    by_fault = {k: {c: _group([r for r in results if r["scenario"]["fault_kind"] == k and r["contender"] == c])
                    for c in names} for k in kinds}
    overall = {c: _group([r for r in results if r["contender"] == c]) for c in names}
    approved: dict[str, Any] = {}
    for k in kinds:
        for c in names:
            runs = [r["approved"] for r in results
                    if r["scenario"]["fault_kind"] == k and r["contender"] == c and r.get("approved")]
            if runs:
                fixed = [{**a, "scenario": {"fault_kind": k}} for a in runs]
                approved.setdefault(k, {})[c] = {**_group(fixed), "approve": sorted({n for a in runs for n in a["approve"]})}
    return {"fault_kinds": kinds, "contenders": names, "by_fault": by_fault, "overall": overall,
            "approved": approved, "errors": errors}


def check_targets(summary: dict[str, Any], policies: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets per policy: harm <= 5 % and <= half of each active baseline's; heal - harm at least
    every baseline's on every fault kind; no model change on clean controls. Each with the figures used."""
    out = []
    overall, by_fault = summary["overall"], summary["by_fault"]
    baselines = [b for b in summary["contenders"] if b not in policies]
    for p in policies:
        harm = overall[p]["harmed"]["rate"]
        checks = [{"target": "harm rate <= 5 %", "value": harm, "met": harm is not None and harm <= 0.05}]
        for b in ACTIVE_BASELINES:
            if b in overall and overall[b]["changed"]["k"] > 0:  # a baseline that never changed the model is not active
                limit = overall[b]["harmed"]["rate"] / 2
                checks.append({"target": f"harm rate <= half of {b}'s", "value": harm, "limit": limit,
                               "met": harm is not None and harm <= limit})
        for kind, rows in by_fault.items():
            if kind == CLEAN or rows[p]["heal_minus_harm"] is None:
                continue
            worst = [(b, rows[b]["heal_minus_harm"]) for b in baselines if rows.get(b, {}).get("heal_minus_harm") is not None]
            best = max((v for _, v in worst), default=None)
            checks.append({"target": f"{kind}: heal - harm >= every baseline's", "value": rows[p]["heal_minus_harm"],
                           "limit": best, "met": best is None or rows[p]["heal_minus_harm"] >= best - 1e-12})
        if CLEAN in by_fault:
            ft = by_fault[CLEAN][p]["false_treatment"]
            checks.append({"target": "0 model changes on clean controls", "value": ft["k"] if ft else None,
                           "met": ft is not None and ft["k"] == 0})
        out.append({"policy": p, "checks": checks, "all_met": all(c["met"] for c in checks)})
    return out
