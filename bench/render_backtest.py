"""The backtest section of bench/RESULTS.md (kept apart: render_results.py is near its size limit).

Per dataset: one table per fault kind of heal / harm / escalate rates (with 95 % Wilson intervals)
for each policy and baseline, the approved escalations, and the issue's targets, met or not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["section_backtest"]

DASH = "—"


def _rate(r: Any) -> str:
    if not isinstance(r, dict) or not r.get("n"):
        return DASH
    try:
        return f"{r['k']}/{r['n']} ({r['rate']:.0%}; {r['low']:.0%}–{r['high']:.0%})"
    except (KeyError, TypeError, ValueError):
        return DASH


def _row(md: list[str], cells: list[str]) -> None:
    md.append("| " + " | ".join(cells) + " |")


def _dataset(row: dict[str, Any]) -> list[str]:
    s = row.get("summary") if isinstance(row.get("summary"), dict) else {}
    lines = [(f"**{row.get('dataset', DASH)}** — {row.get('n_scenarios', DASH)} scenarios "
             f"({', '.join(row.get('faults') or [])}, clean controls; {row.get('seeds', DASH)} seed(s)); "
             f"compute time {(row.get('compute_time_s') or row.get('wall_time_s') or 0) / 60:.0f} min."), ""]
    lines += ["| fault | contender | n | healed | harmed | escalated | changed | heal − harm |",
              "|---|---|---|---|---|---|---|---|"]
    for kind in s.get("fault_kinds", []):
        for c in s.get("contenders", []):
            r = s.get("by_fault", {}).get(kind, {}).get(c, {})
            hm = r.get("heal_minus_harm")
            _row(lines, [kind, c, str(r.get("n", DASH)), _rate(r.get("healed")), _rate(r.get("harmed")),
                         _rate(r.get("escalated")), _rate(r.get("changed")), DASH if hm is None else f"{hm:+.2f}"])
    approved = s.get("approved") or {}
    if approved:
        lines += ["", "Approved escalations (each escalated run re-run with what it waited for):", "",
                  "| fault | policy | approved | n | healed | harmed | median wall s |", "|---|---|---|---|---|---|---|"]
        for kind, per in approved.items():
            for c, r in per.items():
                _row(lines, [kind, c, ", ".join(r.get("approve", [])), str(r.get("n")), _rate(r.get("healed")),
                             _rate(r.get("harmed")), f"{r.get('median_wall_time_s') or 0:.0f}"])
    lines.append("")
    for t in row.get("targets") or []:
        unmet = [c.get("target", "?") for c in t.get("checks", []) if not c.get("met")]
        lines.append(f"- targets under `{t.get('policy')}`: " + ("all met" if not unmet else "not met: " + "; ".join(unmet)))
    return lines


def _short(r: Any) -> str:
    return DASH if not isinstance(r, dict) or not r.get("n") else f"{r.get('k')}/{r.get('n')}"


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Heal and harm per fault kind and policy, before and after a change (the seeds both runs share differ
    in number: the rates, not the counts, compare)."""
    sb, sa = before.get("summary") or {}, after.get("summary") or {}
    policies = [t.get("policy") for t in after.get("targets") or []]
    lines = [(f"**{after.get('dataset', DASH)}: before → after** (before: {before.get('n_scenarios', DASH)} scenarios, "
             f"{before.get('seeds', DASH)} seed(s))"), "",
             "| fault | policy | healed before | healed after | harmed before | harmed after | escalated before | escalated after |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in sa.get("fault_kinds", []):
        for p in policies:
            b = (sb.get("by_fault") or {}).get(kind, {}).get(p, {})
            a = (sa.get("by_fault") or {}).get(kind, {}).get(p, {})
            _row(lines, [kind, str(p), _short(b.get("healed")), _short(a.get("healed")), _short(b.get("harmed")),
                         _short(a.get("harmed")), _short(b.get("escalated")), _short(a.get("escalated"))])
    return lines


def section_backtest(data: dict[str, Any]) -> list[str]:
    rows = data.get("rows") if isinstance(data.get("rows"), list) else []
    if not rows:
        return [DASH]
    before = {r.get("dataset"): r for r in data.get("before") or [] if isinstance(r, dict)}
    lines: list[str] = []
    for row in rows:
        if isinstance(row, dict):
            lines += _dataset(row) + [""]
            if row.get("dataset") in before:
                lines += _before_after(before[row["dataset"]], row) + [""]
    return lines[:-1]
