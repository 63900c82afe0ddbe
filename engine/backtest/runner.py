"""Run a backtest: every scenario under every policy and baseline, judged on its holdout; resumable.

For each scenario the audit and holdout parts are written once (:mod:`engine.backtest.parts`); the
untreated model's holdout views are computed once; then each policy triages the AUDIT part
(:func:`engine.triage.run_triage`, recorded in the backtest's audit store) and each baseline treats
it naively, and every treated model is judged on the HOLDOUT (:mod:`engine.backtest.judge`). A run
that escalated to a human is run once more with the escalation approved, and judged too: what
approving it buys.

Each (scenario, policy) verdict is one JSON file under ``OUT/results/`` named by content (scenario
key + policy hash), written atomically: a killed backtest continues where it stopped, and an edited
policy or scenario is run again. Everything but wall times is deterministic under the seeds. A
scenario that cannot run (e.g. a fault that would remove every row) is reported with its error and
left out of the rates; the others go on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.audit import AuditStore
from engine.backtest.baselines import BASELINES, run_baseline
from engine.backtest.judge import HoldoutViews, holdout_views, judge
from engine.backtest.parts import ScenarioParts, load_source, prepare_parts
from engine.backtest.scenarios import Scenario, fault_kind, scenario_key
from engine.core.errors import TriageError
from engine.core.facts import IssueFact
from engine.core.storage import atomic_write_json, canonical_json, sha256_bytes
from engine.triage import TriageOutcome, default_monitor_fn, run_triage
from model.bundle import Bundle, load_bundle
from model.features import FeatureSet, extract_features
from rules.policy import Policy

__all__ = ["RESULTS_DIR", "Contender", "contenders", "run_backtest"]

RESULTS_DIR = "results"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Contender:
    """A policy (triage under it) or a baseline (judged with the reference policy's monitors and tolerances)."""

    name: str
    policy: Policy
    baseline: str | None = None

    @property
    def key(self) -> str:
        ident = {"name": self.name, "policy": self.policy.content_hash, "baseline": self.baseline}
        return sha256_bytes(canonical_json(ident))[:12]


def contenders(policies: Sequence[Policy], baselines: Sequence[str]) -> list[Contender]:
    """The policies under their names (made unique), then the baselines under the first policy."""
    out: list[Contender] = []
    seen: set[str] = set()
    for p in policies:
        name, i = p.name, 2
        while name in seen:
            name, i = f"{p.name}#{i}", i + 1
        seen.add(name)
        out.append(Contender(name, p))
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; expected one of {', '.join(BASELINES)}")
        out.append(Contender(b, policies[0], b))
    return out


def _treated_labels(outcome: TriageOutcome, bundle: Bundle) -> list[str]:
    labels: list[str] = []
    for tr in outcome.decision["treatments"]:
        if tr["outcome"] == "treated":
            labels.extend([tr["label"]] if tr["label"] else list(bundle.labels))
    return sorted(set(labels), key=list(bundle.labels).index)


def _plans(outcome: TriageOutcome) -> list[str]:
    """Interventions the run waits on a human for (its escalations)."""
    names = {a["plan"]["intervention"] for tr in outcome.decision["treatments"] for a in tr["attempts"]
             if a.get("result") == "needs_approval" and a.get("plan")}
    return sorted(names)


def _summary_of(outcome: TriageOutcome, run_dir: Path, out: Path) -> dict[str, Any]:
    return {
        "outcome": outcome.outcome, "exit_code": outcome.exit_code,
        "escalated": outcome.exit_code in (3, 4),
        "treatments": [{"kind": t["kind"], "label": t["label"], "outcome": t["outcome"],
                        "intervention": t["intervention"]} for t in outcome.decision["treatments"]],
        "cost": float(outcome.decision["budget"]["cost_spent"]),
        "decision": str((run_dir / "decision.json").relative_to(out)),
        "run_id": outcome.run_id,
        "waits_for": _plans(outcome),
    }


@dataclass
class _ScenarioState:
    scenario: Scenario
    key: str
    parts: ScenarioParts
    bundle: Bundle
    before: HoldoutViews
    #: The untreated model on the audit part, and its facts per policy: the baselines share them.
    audit: FeatureSet
    audit_facts: dict[str, list[IssueFact]] = field(default_factory=dict)

    def facts_on_audit(self, policy: Policy) -> list[IssueFact]:
        if policy.content_hash not in self.audit_facts:
            self.audit_facts[policy.content_hash] = default_monitor_fn(policy)(self.bundle, self.audit)
        return self.audit_facts[policy.content_hash]


def _triage_and_judge(st: _ScenarioState, who: Contender, out: Path, store: AuditStore | None,
                      approve: Sequence[str], n_boot: int) -> dict[str, Any]:
    t = time.perf_counter()
    suffix = "+approved" if approve else ""
    run_dir = out / "runs" / st.key / f"{who.name}{suffix}"
    outcome = run_triage(st.bundle, st.parts.audit, who.policy, seed=st.scenario.seed, approve=approve,
                         out_dir=run_dir, audit=store)
    after = outcome.bundle
    views = holdout_views(after, st.bundle, st.before, st.parts.holdout, st.parts.holdout_clean)
    verdict = judge(before=st.bundle, after=after, fault_kind=fault_kind(st.scenario.fault),
                    expected=st.parts.expected, audit_facts=outcome.facts,
                    treated_labels=_treated_labels(outcome, st.bundle), before_views=st.before, after_views=views,
                    policy=who.policy, n_boot=n_boot)
    return {**_summary_of(outcome, run_dir, out), **verdict, "approve": list(approve),
            "wall_time_s": time.perf_counter() - t}


def _baseline_and_judge(st: _ScenarioState, who: Contender, n_boot: int) -> dict[str, Any]:
    t = time.perf_counter()
    res = run_baseline(who.baseline or "", st.bundle, st.audit, st.parts.audit, who.policy, st.scenario.seed)
    facts = st.facts_on_audit(who.policy)
    views = holdout_views(res.bundle, st.bundle, st.before, st.parts.holdout, st.parts.holdout_clean)
    verdict = judge(before=st.bundle, after=res.bundle, fault_kind=fault_kind(st.scenario.fault),
                    expected=st.parts.expected, audit_facts=facts, treated_labels=res.treated_labels,
                    before_views=st.before, after_views=views, policy=who.policy, n_boot=n_boot)
    return {"outcome": "baseline", "exit_code": None, "escalated": False, "treatments": [], "cost": res.cost,
            "decision": None, "run_id": None, "waits_for": [], "note": res.note, **verdict, "approve": [],
            "wall_time_s": time.perf_counter() - t}


def _result_path(out: Path, key: str, who: Contender) -> Path:
    return out / RESULTS_DIR / f"{key}-{who.name}-{who.key}.json"


def _run_one(st: _ScenarioState, who: Contender, out: Path, store: AuditStore | None, n_boot: int,
             approve_escalations: bool) -> dict[str, Any]:
    if who.baseline is not None:
        result = _baseline_and_judge(st, who, n_boot)
    else:
        result = _triage_and_judge(st, who, out, store, (), n_boot)
        if approve_escalations and result["waits_for"]:
            result["approved"] = _triage_and_judge(st, who, out, store, result["waits_for"], n_boot)
    return {"scenario": {**st.scenario.to_dict(), "key": st.key, "fault_kind": fault_kind(st.scenario.fault)},
            "contender": who.name, "baseline": who.baseline, "policy": who.policy.name,
            "policy_hash": who.policy.content_hash, "status": status_of(result), **result}


def status_of(result: dict[str, Any]) -> str:
    """``accepted`` (the model changed), ``escalated`` (unchanged, a human is needed) or ``none``."""
    return "accepted" if result["changed"] else "escalated" if result["escalated"] else "none"


def run_backtest(scenarios: Sequence[Scenario], who: Sequence[Contender], out: Path, *,
                 audit: Path | None = None, approve_escalations: bool = True, n_boot: int = 1000,
                 progress: Progress | None = None) -> list[dict[str, Any]]:
    """Every (scenario, contender) verdict, from ``OUT/results`` where already there; see the module docstring."""
    out.mkdir(parents=True, exist_ok=True)
    total, done = len(scenarios) * len(who), 0
    results: list[dict[str, Any]] = []
    store = AuditStore(audit or out / "audit.db")
    try:
        for scenario in scenarios:
            source = load_source(scenario)
            key = scenario_key(scenario, source.manifest_hash())
            st: _ScenarioState | None = None
            for contender in who:
                path = _result_path(out, key, contender)
                if progress is not None:
                    progress(done, total, f"{scenario.name} / {contender.name}")
                if path.is_file():
                    results.append(json.loads(path.read_text(encoding="utf-8")))
                else:
                    try:
                        if st is None:
                            st = _state(scenario, key, source, out)
                        result = _run_one(st, contender, out, store, n_boot, approve_escalations)
                    except TriageError as exc:  # one broken scenario must not lose the others' verdicts
                        results.append(_failed(scenario, key, contender, exc))
                    else:
                        atomic_write_json(path, result)
                        results.append(result)
                done += 1
        if progress is not None:
            progress(done, total, "done")
    finally:
        store.close()
    return results


def _failed(scenario: Scenario, key: str, who: Contender, exc: Exception) -> dict[str, Any]:
    """The record of a (scenario, contender) that could not run; not saved, so a re-run tries again."""
    return {"scenario": {**scenario.to_dict(), "key": key, "fault_kind": fault_kind(scenario.fault)},
            "contender": who.name, "baseline": who.baseline, "policy": who.policy.name,
            "policy_hash": who.policy.content_hash, "error": f"{type(exc).__name__}: {exc}"}


def _state(scenario: Scenario, key: str, source: Any, out: Path) -> _ScenarioState:
    parts = prepare_parts(scenario, source, out / "scenarios" / key)
    bundle = load_bundle(scenario.model)
    before = holdout_views(bundle, bundle, None, parts.holdout, parts.holdout_clean)
    return _ScenarioState(scenario, key, parts, bundle, before, extract_features(bundle, parts.audit))
