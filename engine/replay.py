"""Re-decide recorded triage runs under another policy, from the audit record alone (``policy replay``).

A triage run records its facts (``facts``), the rules' answer for each attempt on each fact
(``decision``: candidates with cost and rule, the chosen one, the rationale), what came of each
attempt (``intervention_applied``, ``outcome``) and how the run ended (``run_finished``). This
module rebuilds the facts from that record (each one checked against its recorded ``fact_id``),
asks the rules of another policy what they would have chosen first (the decision without
exclusions: what the loop applies before any rejection) and compares it with the first decision
recorded then. No model and no data are read: it is the rules and the selection alone, which is
what a change of costs changes ("had retraining been priced at 1, what would you have done?").

What the rules may know beyond the facts is the loop's ``context``, which triage records with the
facts. Stores written before it did lack it: there ``has_parent`` comes from
``run_started.parent_hash``, and ``has_compression_history`` is recovered where the recorded
decisions prove it (an ``f_reopt`` candidate proposed because the bundle records its compression,
or the rule blocked because it does not); otherwise it is reported as not recorded, the decision is
made under both values, and a decision that depends on it is reported as ``undetermined`` with both
answers rather than guessed.

Computation only: :func:`replay_audit` returns typed results; ``engine.commands.policy`` renders them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from engine.audit import AuditRecord, AuditStore, resolve_run, run_instances
from engine.core.errors import AuditError
from engine.core.facts import IssueFact
from rules.decide import Candidate, Decision, decide
from rules.policy import Policy
from rules.ruleset import conditions_for

__all__ = [
    "STATUSES",
    "ReplayError",
    "CandidateView",
    "DecisionView",
    "AttemptView",
    "FactReplay",
    "RunReplay",
    "SkippedRun",
    "ReplayResult",
    "replay_audit",
]

#: How a fact's first decision under the new policy compares with the one recorded then.
STATUSES = ("identical", "same_choice", "changed", "undetermined", "not_recorded")

#: The context key that stores written before the loop recorded its context lack (recovered from
#: the decisions where they prove it).
COMPRESSION_KEY = "has_compression_history"


class ReplayError(AuditError):
    """The audit record cannot be replayed (a fact that does not match its id, a run without facts)."""


# -- result objects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateView:
    """One candidate as compared: intervention, its cost, the rule that proposed it, whether it needs approval."""

    intervention: str
    cost: float
    rule: str
    needs_approval: bool
    reason: str = ""

    @classmethod
    def from_record(cls, c: Mapping[str, Any]) -> CandidateView:
        return cls(str(c.get("intervention")), float(c.get("cost") or 0.0), str(c.get("rule") or ""),
                   bool(c.get("needs_approval")), str(c.get("reason") or ""))

    @classmethod
    def from_candidate(cls, c: Candidate) -> CandidateView:
        return cls(c.intervention, float(c.cost), c.rule, bool(c.needs_approval), c.reason)

    @property
    def key(self) -> tuple[str, float, str, bool]:
        return (self.intervention, self.cost, self.rule, self.needs_approval)

    def to_json(self) -> dict[str, Any]:
        return {"intervention": self.intervention, "cost": self.cost, "rule": self.rule,
                "needs_approval": self.needs_approval, "reason": self.reason}


@dataclass(frozen=True)
class DecisionView:
    """A first decision: the candidates cheapest first, the chosen one (None: escalate) and why."""

    candidates: tuple[CandidateView, ...]
    chosen: CandidateView | None
    rationale: str

    @classmethod
    def from_record(cls, p: Mapping[str, Any]) -> DecisionView:
        chosen = p.get("chosen")
        return cls(tuple(CandidateView.from_record(c) for c in p.get("candidates") or ()),
                   CandidateView.from_record(chosen) if chosen else None, str(p.get("rationale") or ""))

    @classmethod
    def from_decision(cls, d: Decision) -> DecisionView:
        return cls(tuple(CandidateView.from_candidate(c) for c in d.candidates),
                   CandidateView.from_candidate(d.chosen) if d.chosen else None, d.rationale)

    def compare(self, other: DecisionView) -> str:
        """``changed`` (another intervention, or escalation instead of an automatic change and vice
        versa), ``same_choice`` (the same intervention, but its cost, rule or the other candidates
        differ) or ``identical``."""
        def action(d: DecisionView) -> tuple[str, bool] | None:
            return (d.chosen.intervention, d.chosen.needs_approval) if d.chosen else None

        if action(self) != action(other):
            return "changed"
        if (self.chosen.key if self.chosen else None) != (other.chosen.key if other.chosen else None):
            return "same_choice"
        if [c.key for c in self.candidates] != [c.key for c in other.candidates]:
            return "same_choice"
        return "identical"

    def to_json(self) -> dict[str, Any]:
        return {"candidates": [c.to_json() for c in self.candidates],
                "chosen": self.chosen.to_json() if self.chosen else None, "rationale": self.rationale}


@dataclass(frozen=True)
class AttemptView:
    """What was done then: one attempt's intervention (None: none chosen) and its result."""

    attempt: int
    intervention: str | None
    result: str

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "intervention": self.intervention, "result": self.result}


@dataclass(frozen=True)
class FactReplay:
    """One actionable fact: the first decision then, what was done then, and the first decision under P2.

    ``alternative`` is P2's decision under the other value of an unrecorded context key (only when it
    differs from ``under_p2``; ``note`` says which value each was made under).
    """

    fact_id: str
    kind: str
    label: str | None
    severity: str
    then: DecisionView | None
    attempts: tuple[AttemptView, ...]
    outcome: str | None
    under_p2: DecisionView
    alternative: DecisionView | None
    status: str
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {"fact_id": self.fact_id, "kind": self.kind, "label": self.label, "severity": self.severity,
                "status": self.status, "then": self.then.to_json() if self.then else None,
                "done_then": {"attempts": [a.to_json() for a in self.attempts], "outcome": self.outcome},
                "under_policy": self.under_p2.to_json(),
                "alternative": self.alternative.to_json() if self.alternative else None, "note": self.note}


@dataclass(frozen=True)
class RunReplay:
    """One recorded run (``instance`` counts reruns of the same deterministic run id, from 1)."""

    run_id: str
    instance: int
    policy_then: dict[str, Any]
    same_policy: bool
    model_hash: str | None
    outcome_then: str | None
    context: dict[str, Any]
    context_notes: tuple[str, ...]
    facts: tuple[FactReplay, ...]

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "instance": self.instance, "policy_then": self.policy_then,
                "same_policy": self.same_policy, "model_hash": self.model_hash, "outcome_then": self.outcome_then,
                "context": self.context, "context_notes": list(self.context_notes),
                "facts": [f.to_json() for f in self.facts]}


@dataclass(frozen=True)
class SkippedRun:
    run_id: str
    instance: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "instance": self.instance, "reason": self.reason}


@dataclass(frozen=True)
class ReplayResult:
    audit: str
    policy: dict[str, Any]
    runs: tuple[RunReplay, ...]
    skipped: tuple[SkippedRun, ...]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for run in self.runs:
            for fact in run.facts:
                out[fact.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": "cxr-triage-policy-replay", "format_version": 1, "audit": self.audit,
                "policy": self.policy, "counts": self.counts(), "runs": [r.to_json() for r in self.runs],
                "skipped": [s.to_json() for s in self.skipped]}


# -- reading the record ---------------------------------------------------------------------------


def _facts_from_record(where: str, payload: Mapping[str, Any]) -> list[IssueFact]:
    """The recorded facts rebuilt and validated; each must hash to its recorded ``fact_id``."""
    facts = []
    for i, raw in enumerate(payload.get("facts") or ()):
        data = dict(raw)
        recorded = data.pop("fact_id", None)
        try:
            fact = IssueFact.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            path = " ==> ".join(str(p) for p in first["loc"])
            raise ReplayError(f"{where}: recorded fact {i} ({data.get('kind')}) is not a valid issue fact: "
                              f"{path}: {first['msg']}") from None
        if fact.fact_id != recorded:
            raise ReplayError(f"{where}: recorded fact {i} ({fact.kind}, {fact.label or 'model'}) has fact_id "
                              f"{recorded!r} but its content hashes to {fact.fact_id!r}; the record was altered or "
                              "written by an incompatible version (run `cli.py audit verify`)")
        facts.append(fact)
    return facts


def _compression_evidence(decisions: Iterable[Mapping[str, Any]]) -> bool | None:
    """``has_compression_history`` as the recorded decisions prove it, or None when they do not.

    The f_reopt rule words its reasons from one condition: a candidate proposed "because the bundle
    records its compression" proves True, the rule blocked for the lack of one proves False.
    """
    probe = Policy.model_validate({"name": "probe", "conditions": {"f_reopt": {"require_compression_history": True}}})
    (condition,) = conditions_for("f_reopt", probe)
    fails = tuple(text for text, _ in condition.fails)
    for p in decisions:
        for c in p.get("candidates") or ():
            if c.get("intervention") == "f_reopt" and condition.holds_reason in str(c.get("reason")):
                return True
        texts = [str(p.get("rationale") or "")] + [str(c.get("reason") or "") for c in p.get("candidates") or ()]
        if any(f in t for f in fails for t in texts):
            return False
    return None


def _context(started: Mapping[str, Any], facts_payload: Mapping[str, Any], decisions: Sequence[Mapping[str, Any]]
             ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The loop's context as recorded with the facts; for stores written before it was recorded, as far
    as the rest of the record gives it, with notes on what it does not."""
    recorded = facts_payload.get("context")
    if isinstance(recorded, Mapping):
        return dict(recorded), ()
    context: dict[str, Any] = {}
    notes: list[str] = []
    if "parent_hash" in started:
        context["has_parent"] = started["parent_hash"] is not None
    else:
        notes.append("has_parent is not recorded (no parent_hash in run_started); the rules do not read it")
    evidence = _compression_evidence(decisions)
    if evidence is None:
        notes.append(f"{COMPRESSION_KEY} is not recorded and the recorded decisions do not show it; decided "
                     "under both values, a decision that depends on it is reported as undetermined")
    else:
        context[COMPRESSION_KEY] = evidence
    return context, tuple(notes)


#: The context keys with the fit split's per-label counts (``partial_retrain``'s condition reads them).
FIT_COUNT_KEY = "fit_positives"


def _fit_count_notes(context: Mapping[str, Any], facts: Sequence[IssueFact], policy: Policy) -> tuple[str, ...]:
    """A note when the record lacks the fit split's counts and a fact's retraining condition needs them."""
    if FIT_COUNT_KEY in context:
        return ()
    needs = [f for f in facts if f.label and "partial_retrain" in policy.treatments_for(f.kind)]
    if not needs:
        return ()
    note = (f"{FIT_COUNT_KEY} is not recorded (a store written before the triage gave the rules the fit split's "
            "counts): partial_retrain's min_positives is checked against the whole audit set's positives, as "
            "the rules did then; the plugin counts only the fit split")
    return (note,)


def _done_then(fact_id: str, records: Sequence[AuditRecord]) -> tuple[tuple[AttemptView, ...], str | None]:
    """Each attempt's intervention and result for ``fact_id``, and the fact's final outcome."""
    chosen: dict[int, str | None] = {}
    results: dict[int, str] = {}
    final: str | None = None
    for rec in records:
        p = rec.payload
        if p.get("fact_id") != fact_id:
            continue
        if rec.kind == "decision":
            chosen[int(p.get("attempt", 0))] = (p.get("chosen") or {}).get("intervention")
        elif rec.kind == "intervention_applied" and p.get("status") == "error":
            results[int(p.get("attempt", 0))] = "error"
        elif rec.kind == "outcome" and "attempt" in p:
            results.setdefault(int(p["attempt"]), str(p.get("outcome")))
        elif rec.kind == "outcome":
            final = str(p.get("outcome"))
    attempts = tuple(AttemptView(n, chosen[n], results.get(n, final or "unfinished")) for n in sorted(chosen))
    return attempts, final


def _outcome_then(records: Sequence[AuditRecord]) -> str | None:
    finished = [r.payload for r in records if r.kind == "run_finished"]
    if not finished:
        return None
    p = finished[-1]
    return f"error: {p.get('error')}" if p.get("status") == "error" else str(p.get("outcome"))


# -- deciding again -------------------------------------------------------------------------------


def _decide_views(facts: list[IssueFact], policy: Policy, run_id: str, context: dict[str, Any]
                  ) -> dict[str, DecisionView]:
    if not facts:
        return {}
    return {d.fact.fact_id: DecisionView.from_decision(d)
            for d in decide(facts, policy, run_id=run_id, context=context, exclude=None)}


def _fact_replay(fact: IssueFact, first: Mapping[str, Any] | None, records: Sequence[AuditRecord],
                 now: DecisionView, other: DecisionView | None) -> FactReplay:
    then = DecisionView.from_record(first) if first is not None else None
    attempts, outcome = _done_then(fact.fact_id, records)
    note = None
    alternative = other if other is not None and other.compare(now) != "identical" else None
    if then is None:
        status = "not_recorded"
        note = (f"no decision was recorded for this fact then (outcome {outcome or 'none recorded'}: "
                "an earlier treatment in the run had resolved it)" if outcome == "resolved_earlier"
                else f"no decision was recorded for this fact then (outcome {outcome or 'none recorded'})")
    else:
        status = then.compare(now)
        if alternative is not None:
            note = (f"the decision depends on {COMPRESSION_KEY}, which the audit does not record "
                    "(the alternative: as if true)")
            if then.compare(alternative) != status:
                status = "undetermined"
    return FactReplay(fact.fact_id, fact.kind, fact.label, fact.severity, then, attempts, outcome, now,
                      alternative, status, note)


def _replay_instance(where: str, run_id: str, instance: int, records: list[AuditRecord], policy: Policy
                     ) -> RunReplay | SkippedRun:
    started = next((r.payload for r in records if r.kind == "run_started"), {})
    facts_rec = [r.payload for r in records if r.kind == "facts"]
    if not facts_rec:
        return SkippedRun(run_id, instance, f"{where}: the run has no facts record (it ended before monitoring: "
                                            f"{_outcome_then(records) or 'no run_finished record'})")
    actionable = [f for f in _facts_from_record(where, facts_rec[-1]) if f.actionable]
    decisions = [r.payload for r in records if r.kind == "decision"]
    first = {str(p.get("fact_id")): p for p in reversed(decisions) if not p.get("excluded")}
    context, notes = _context(started, facts_rec[-1], decisions)
    notes += _fit_count_notes(context, actionable, policy)
    tag = f"replay-{run_id}-{instance}-{policy.content_hash[:12]}"
    if COMPRESSION_KEY in context:
        now, other = _decide_views(actionable, policy, tag, context), {}
    else:
        now = _decide_views(actionable, policy, tag, {**context, COMPRESSION_KEY: False})
        other = _decide_views(actionable, policy, tag, {**context, COMPRESSION_KEY: True})
    facts = tuple(_fact_replay(f, first.get(f.fact_id), records, now[f.fact_id], other.get(f.fact_id))
                  for f in actionable)
    policy_then = dict(started.get("policy") or {})
    return RunReplay(run_id, instance, policy_then, policy_then.get("content_hash") == policy.content_hash,
                     started.get("model_hash"), _outcome_then(records), context, notes, facts)


def replay_audit(store: AuditStore, policy: Policy, runs: Sequence[str] = ()) -> ReplayResult:
    """Every recorded run (or the named ones: an id, a unique prefix or a run folder) re-decided under ``policy``.

    A named run that is unknown or has no facts record is an error naming it; when replaying every
    run, a run without facts (it failed before monitoring) is listed in ``skipped`` instead.
    """
    named = bool(runs)
    run_ids = list(dict.fromkeys(resolve_run(store, r) for r in runs)) if named else store.run_ids()
    done: list[RunReplay] = []
    skipped: list[SkippedRun] = []
    for run_id in run_ids:
        for instance, records in enumerate(run_instances(store.records(run_id)), 1):
            where = f"{store.path}: run {run_id}" + (f" (instance {instance})" if instance > 1 else "")
            result = _replay_instance(where, run_id, instance, records, policy)
            if isinstance(result, SkippedRun):
                if named:
                    raise ReplayError(result.reason)
                skipped.append(result)
            else:
                done.append(result)
    ident = {"name": policy.name, "version": policy.version, "content_hash": policy.content_hash,
             "source": str(policy.source_path) if policy.source_path else None}
    return ReplayResult(str(store.path), ident, tuple(done), tuple(skipped))
