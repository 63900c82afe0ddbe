"""The decision façade: issue facts in, candidates and the chosen treatment out.

The rules (``rules.ruleset``) *propose*; this module *selects*: the cheapest candidate, ties broken
by expected wall time and then by name, so the same facts and policy always give the same
decision. Every candidate is kept with its cost and the rule that proposed it, and every rule
that was blocked is named with its reason, so the rationale can say which cheaper options were
ruled out and why.

All durable-rules quirks are contained here:

* **Global ruleset names.** ``durable.lang`` keeps one module-level host and refuses a second
  ruleset of the same name ("already registered"). We use our own :class:`durable.engine.Host`
  and name each ruleset after the policy's content hash; a policy already registered is reused.
* **Background threads.** ``Host()`` starts timer threads that dispatch pending actions every
  0.2 s; the C core has no locks. Our host does not start them (we run every action
  synchronously inside ``assert_fact``) and a process-wide lock serialises all engine calls.
* **Swallowed exceptions.** An exception inside an action is stored in the returned state as
  ``exception`` and never raised. We check the state after every assertion and raise
  :class:`RuleEngineError`.
* **Seen messages.** Asserting an identical fact twice raises ``MessageObservedException``. Every
  record carries the run id, fact id and position; every call uses a fresh session (``sid``)
  whose state is deleted afterwards, so earlier calls (even failed ones) cannot interfere.
* **Unhandled facts.** A fact that no rule matches is refused; a catch-all rule acknowledges every
  issue (``received``) and a sink rule matches the facts the actions assert. We check that every
  asserted issue was acknowledged.
* **All matching rules fire, in no guaranteed order.** Rules only assert candidates; candidates
  are sorted afterwards.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.core.facts import IssueFact
from rules.durable_import import durable_modules
from rules.policy.schema import NO_ACTION, Policy
from rules.ruleset import build_ruleset, issue_record, ruleset_name

__all__ = ["Candidate", "Decision", "RuleEngineError", "decide", "ESCALATE_RULE", "format_duration"]

durable_engine = durable_modules()[1]  # see rules/durable_import.py

#: ``rule`` of the no_action candidate recorded when nothing can treat a fact.
ESCALATE_RULE = "escalate:no_candidate"


class RuleEngineError(RuntimeError):
    """The rule engine failed (an action raised, or a fact was dropped): a bug, not a user error."""


@dataclass(frozen=True)
class Candidate:
    """One intervention a rule proposed for one fact, with what it would cost."""

    fact_id: str
    kind: str
    label: str | None
    intervention: str
    cost: float
    expected_time_s: float
    #: The rule that proposed it (``propose:KIND:INTERVENTION``, or :data:`ESCALATE_RULE`).
    rule: str
    #: Why the rule's conditions held, in words (or, for no_action, why nothing could be proposed).
    reason: str
    #: Cost above ``approval.auto_max_cost``: applied only with ``--approve INTERVENTION``.
    needs_approval: bool

    @property
    def sort_key(self) -> tuple[float, float, str, str]:
        return (self.cost, self.expected_time_s, self.intervention, self.rule)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Blocked:
    """A rule that matched the fact's kind but whose condition failed."""

    intervention: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The decision for one actionable fact.

    ``candidates`` are sorted by (cost, expected time, name). ``chosen`` is the first of them, or
    None when no treatment can be proposed: then ``candidates`` holds one ``no_action`` candidate
    recording why, and the fact is escalated to a human.
    """

    fact: IssueFact
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    rationale: str
    #: Rules whose conditions failed (not candidates), sorted by intervention.
    blocked: tuple[Blocked, ...] = ()
    #: Interventions already tried and rejected for this fact (from ``exclude``), sorted.
    excluded: tuple[str, ...] = ()

    @property
    def escalate(self) -> bool:
        return self.chosen is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fact_id": self.fact.fact_id,
            "fact": self.fact.model_dump(mode="json"),
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "rationale": self.rationale,
            "blocked": [{"intervention": b.intervention, "rule": b.rule, "reason": b.reason} for b in self.blocked],
            "excluded": list(self.excluded),
        }


# -- the engine ---------------------------------------------------------------------------------

class _SyncHost(durable_engine.Host):
    """A host without durable's dispatcher threads: actions run synchronously in ``assert_fact``."""

    def _run(self) -> None:  # noqa: D401 - overriding durable's thread start
        return None


_LOCK = threading.RLock()
_HOST: _SyncHost | None = None
_REGISTERED: set[str] = set()
_SESSIONS = itertools.count()


def _ruleset_for(policy: Policy) -> str:
    global _HOST
    name = ruleset_name(policy)
    if _HOST is None:
        _HOST = _SyncHost()
    if name not in _REGISTERED:
        _HOST.register_rulesets({name: build_ruleset(policy)})
        _REGISTERED.add(name)
    return name


def _check_state(state: Any, where: str) -> None:
    if isinstance(state, Mapping) and state.get("exception"):
        raise RuleEngineError(f"a rule action failed while {where}: {state['exception']}")


def _run_rules(records: list[dict[str, Any]], policy: Policy, run_id: str) -> list[dict[str, Any]]:
    """Assert ``records`` in one fresh session; return every fact the session holds afterwards."""
    with _LOCK:
        name = _ruleset_for(policy)
        assert _HOST is not None
        sid = f"{run_id}#{next(_SESSIONS)}"
        try:
            for record in records:
                where = f"asserting fact {record['fact_id']} ({record['kind']}, {record['label'] or 'model'})"
                try:
                    state = _HOST.assert_fact(name, {**record, "sid": sid})
                except durable_engine.MessageObservedException as exc:
                    raise RuleEngineError(f"durable-rules saw a duplicate while {where}: {exc.message}") from None
                except durable_engine.MessageNotHandledException as exc:
                    raise RuleEngineError(f"no rule handled a fact while {where}: {exc.message}") from None
                _check_state(state, where)
            return list(_HOST.get_facts(name, sid)) if records else []
        finally:
            if records:
                try:
                    _HOST.delete_state(name, sid)
                except Exception:  # noqa: BLE001 - the session may never have been created
                    pass


# -- selection ----------------------------------------------------------------------------------

def _fmt_cost(c: Candidate) -> str:
    return f"{c.intervention} (cost {c.cost:g}, ~{format_duration(c.expected_time_s)})"


def format_duration(seconds: float) -> str:
    """An expected or measured duration in the unit a person reads it in (s, min, h)."""
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _rationale(fact: IssueFact, candidates: list[Candidate], chosen: Candidate | None, blocked: list[Blocked],
               excluded: list[str], policy: Policy) -> str:
    where = f"{fact.kind} on {fact.label or 'the model'}"
    parts: list[str] = []
    if chosen is None:
        parts.append(f"Escalate {where} to a human: no treatment can be proposed.")
    else:
        rest = candidates[1:]
        parts.append(f"Chose {_fmt_cost(chosen)} for {where}, proposed by rule {chosen.rule}: {chosen.reason}.")
        if not rest:
            parts.append("It is the only candidate.")
        else:
            ties = [c for c in rest if c.cost == chosen.cost]
            parts.append(f"It is the cheapest of {len(candidates)} candidates; the others: "
                         + ", ".join(_fmt_cost(c) for c in rest) + ".")
            if ties:
                names = ", ".join(c.intervention for c in ties)
                if all(c.expected_time_s > chosen.expected_time_s for c in ties):
                    parts.append(f"Tie at cost {chosen.cost:g} with {names}, broken by expected time.")
                else:
                    parts.append(f"Tie at cost {chosen.cost:g} with {names}, broken by expected time, then by name.")
        if chosen.needs_approval:
            parts.append(f"Needs human approval: cost {chosen.cost:g} > approval.auto_max_cost "
                         f"{policy.approval.auto_max_cost:g} (apply with --approve {chosen.intervention}).")
    if blocked:
        parts.append("Not proposed: " + "; ".join(f"{b.intervention} ({b.reason})" for b in blocked) + ".")
    if excluded:
        parts.append("Excluded, already tried and rejected: " + ", ".join(excluded) + ".")
    allowed = policy.treatments_for(fact.kind)
    if not allowed:
        parts.append(f"The policy allows no treatment for {fact.kind}.")
    return " ".join(parts)


def decide(
    facts: Sequence[IssueFact],
    policy: Policy,
    *,
    run_id: str,
    context: Mapping[str, Any] | None = None,
    exclude: Mapping[str, set[str]] | None = None,
) -> list[Decision]:
    """One :class:`Decision` per actionable fact, in the order of ``facts``.

    ``context`` carries what the facts cannot (``has_compression_history``: the bundle records its
    compression, so ``f_reopt`` can re-optimise against the parent). ``exclude`` maps a fact id to
    interventions already tried and rejected; escalation calls ``decide`` again without them.
    Informational facts get no decision. Deterministic: the same facts, policy, context and
    exclusions give the same decisions, whatever ran before in the process.
    """
    if not run_id or not isinstance(run_id, str):
        raise ValueError(f"The 'run_id' parameter of decide must be a non-empty string. Got {run_id!r} instead.")
    exclude = exclude or {}
    actionable = [(seq, f) for seq, f in enumerate(facts) if f.actionable]
    records = [issue_record(f, seq=seq, run_id=run_id, policy=policy, context=context,
                            tried=exclude.get(f.fact_id, ())) for seq, f in actionable]
    proposed, blocked = _by_fact(_run_rules(records, policy, run_id), actionable)
    return [_decision(fact, proposed.get(seq, []), blocked.get(seq, []), set(exclude.get(fact.fact_id, ())), policy)
            for seq, fact in actionable]


def _by_fact(results: list[dict[str, Any]], actionable: list[tuple[int, IssueFact]],
             ) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[dict[str, Any]]]]:
    """The session's candidate and blocked facts grouped by the position of the issue they answer.

    Every asserted issue must have been acknowledged (``received``), or the decisions would be incomplete.
    """
    proposed: dict[int, list[dict[str, Any]]] = {}
    blocked: dict[int, list[dict[str, Any]]] = {}
    received: set[int] = set()
    for item in results:
        t = item.get("t")
        if t == "candidate":
            proposed.setdefault(int(item["seq"]), []).append(item)
        elif t == "blocked":
            blocked.setdefault(int(item["seq"]), []).append(item)
        elif t == "received":
            received.add(int(item["seq"]))
    missing = [fact for seq, fact in actionable if seq not in received]
    if missing:
        raise RuleEngineError(f"the rule engine did not acknowledge {len(missing)} fact(s), e.g. "
                              f"{missing[0].fact_id}; decisions would be incomplete")
    return proposed, blocked


def _escalation(fact: IssueFact, blocked: list[Blocked], excluded: list[str], policy: Policy) -> Candidate:
    """The no_action candidate recorded when no rule proposed a treatment, with every reason why."""
    why = [f"{b.intervention}: {b.reason}" for b in blocked]
    why += [f"{name}: already tried and rejected" for name in excluded]
    if not policy.treatments_for(fact.kind):
        why.append(f"the policy allows no treatment for {fact.kind}")
    return Candidate(
        fact_id=fact.fact_id, kind=fact.kind, label=fact.label, intervention=NO_ACTION,
        cost=policy.cost(NO_ACTION, fact.label), expected_time_s=policy.expected_time(NO_ACTION),
        rule=ESCALATE_RULE, reason="no rule proposed a treatment: " + ("; ".join(why) or "no rule matched"),
        needs_approval=False)


def _decision(fact: IssueFact, proposed: list[dict[str, Any]], blocked_raw: list[dict[str, Any]], tried: set[str],
              policy: Policy) -> Decision:
    """Select among one fact's candidates: cheapest first, the tried ones left out, escalation when none is left."""
    all_candidates = {
        item["intervention"]: Candidate(
            fact_id=fact.fact_id, kind=fact.kind, label=fact.label, intervention=item["intervention"],
            cost=policy.cost(item["intervention"], fact.label),
            expected_time_s=policy.expected_time(item["intervention"]), rule=item["rule"],
            reason=item["reason"], needs_approval=policy.needs_approval(policy.cost(item["intervention"], fact.label)))
        for item in proposed
    }
    candidates = sorted((c for name, c in all_candidates.items() if name not in tried), key=lambda c: c.sort_key)
    excluded = sorted(name for name in tried if name in all_candidates)
    blocked = [Blocked(*b) for b in sorted({(b["intervention"], b["rule"], b["reason"]) for b in blocked_raw})]
    chosen: Candidate | None = candidates[0] if candidates else None
    if chosen is None:
        candidates = [_escalation(fact, blocked, excluded, policy)]
    return Decision(
        fact=fact,
        candidates=tuple(candidates),
        chosen=chosen,
        rationale=_rationale(fact, candidates if chosen else [], chosen, blocked, excluded, policy),
        blocked=tuple(blocked),
        excluded=tuple(excluded),
    )
