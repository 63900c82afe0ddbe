"""The expert knowledge, as durable-rules declarations generated from a policy.

One *propose* rule per (issue kind, intervention) pair the policy allows; its left-hand side is the
kind plus the intervention's applicability conditions, and its action asserts a ``candidate`` fact.
For every way a condition can fail there is a *block* rule that asserts a ``blocked`` fact with the
reason in words, so a decision record can say why a cheaper treatment was not proposed. Selection
is not done here: every matching rule fires (that is how durable-rules works), and
``rules.decide`` picks among the candidates.

The policy's limits (``max_channels``, ``min_positives``, ``min_auroc_ratio``) travel *in the
asserted fact* (resolved for the fact's label), and the rules compare against them
(``m.n_channels_needed <= m.max_channels``). The ruleset therefore depends only on which pairs are
allowed and which conditions are switched on, and per-label overrides need no extra rules.

Conditions (all read fields of the record built by :func:`issue_record`):

* ``threshold`` - ranking intact: the monitor reports ``auroc_intact`` true, or (when it does not
  say) AUROC >= ``min_auroc_ratio`` x the reference AUROC. Moving an operating point cannot help a
  model that no longer ranks.
* ``zeroing`` - few channels: ``n_channels_needed <= max_channels`` (from the fp_cluster evidence);
  on a ``reported_fp`` fact no condition: the plugin zeroes at most ``max_channels`` (the largest
  decrease where that many cannot bring the image below its threshold) and verification judges it.
* ``partial_retrain`` - enough positives: ``positives >= min_positives``, counted in the fit split
  the plugin learns from when the context gives ``fit_positives`` / ``fit_negatives`` (then the
  negatives must reach ``min_positives`` too, as the plugin requires), else the fact's count on the
  whole audit set (replay of stores that did not record the fit counts).
* ``threshold`` on a ``reported_fp`` fact - also zeroing first: a threshold moved above one reported
  image changes every image's decision on the label, so it is proposed only once zeroing was tried
  (``zeroing_tried``), or where the policy does not allow zeroing for the kind.
* ``f_reopt`` - the bundle has a compression history (``context["has_compression_history"]``),
  unless ``conditions.f_reopt.require_compression_history`` is false.
* ``augmentation``, ``full_retrain`` and plugins: no conditions here (a plugin's own
  ``applicable()`` is checked when it runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from engine.core.facts import IssueFact
from rules.durable_import import durable_modules
from rules.policy.schema import Policy

__all__ = [
    "Condition",
    "RuleSpec",
    "RULESET_PREFIX",
    "conditions_for",
    "rule_specs",
    "ruleset_name",
    "build_ruleset",
    "issue_record",
    "format_reason",
]

RULESET_PREFIX = "cxr_triage_policy_"

m = durable_modules()[0].m  # durable-rules' message proxy (rules/durable_import.py explains the indirection)

Expr = Callable[[], Any]  # builds a fresh durable expression (they are consumed by define())


@dataclass(frozen=True)
class Condition:
    """One applicability condition: an expression that must hold, and the ways it can fail."""

    name: str
    #: The condition in words, with the policy's parameter name (for ``policy explain``).
    words: str
    #: Reason template when it holds ({field} = a field of the issue record).
    holds_reason: str
    holds: Expr
    #: (reason template, expression) per way of failing; together they cover "not holds".
    fails: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class RuleSpec:
    """A propose rule: ``kind`` may be treated by ``intervention`` when all ``conditions`` hold."""

    kind: str
    intervention: str
    conditions: tuple[Condition, ...]

    @property
    def name(self) -> str:
        return f"propose:{self.kind}:{self.intervention}"

    def words(self) -> str:
        if not self.conditions:
            return "always (no applicability condition)"
        return " and ".join(c.words for c in self.conditions)


def _is_issue() -> Any:
    return m.t == "issue"


_RANKING = Condition(
    name="ranking_intact",
    words="ranking intact (monitor's auroc_intact, else AUROC >= conditions.threshold.min_auroc_ratio x reference), "
          "or too few positives to judge ranking while the negatives' scores moved past the threshold (the "
          "threshold then restores the reference false-positive rate from the negatives)",
    holds_reason="ranking intact or not needed (auroc_intact={auroc_intact}, AUROC ratio {auroc_ratio}, "
                 "min_auroc_ratio {min_auroc_ratio}; negatives moved past the threshold with ranking not "
                 "judgeable: {negatives_moved})",
    holds=lambda: ((m.auroc_intact == True) | (m.negatives_moved == True)  # noqa: E712
                   | (-m.auroc_intact & (m.auroc_ratio >= m.min_auroc_ratio))),
    fails=(
        ("the monitor reports that ranking is not intact (auroc_intact=false), so a new operating point "
         "cannot fix it", lambda: (m.auroc_intact == False) & -m.negatives_moved),  # noqa: E712
        ("ranking intactness unknown: the fact has neither auroc_intact nor an AUROC with a reference",
         lambda: -m.auroc_intact & -m.auroc_ratio),
        ("AUROC fell to {auroc_ratio} x reference, below min_auroc_ratio {min_auroc_ratio}",
         lambda: -m.auroc_intact & (m.auroc_ratio < m.min_auroc_ratio)),
    ),
)
_FEW_CHANNELS = Condition(
    name="few_channels",
    words="n_channels_needed <= conditions.zeroing.max_channels (few classifier channels explain the FP cluster)",
    holds_reason="{n_channels_needed} classifier channel(s) explain the FP cluster (max_channels {max_channels})",
    holds=lambda: m.n_channels_needed <= m.max_channels,
    fails=(
        ("no small set of classifier channels explains the FP cluster (the fact gives no n_channels_needed)",
         lambda: -m.n_channels_needed),
        ("{n_channels_needed} classifier channels are needed, more than max_channels {max_channels}",
         lambda: m.n_channels_needed > m.max_channels),
    ),
)
_ENOUGH_POSITIVES = Condition(
    name="enough_positives",
    words="positives >= conditions.partial_retrain.min_positives (enough labelled positives to retrain on; "
          "counted in the fit split, with as many negatives there, when the triage gives them)",
    holds_reason="{positives} labelled positives (min_positives {min_positives}; counted in {positives_in})",
    holds=lambda: ((m.positives >= m.min_positives)
                   & (-m.negatives | (m.negatives >= m.min_positives))),
    fails=(
        ("the fact does not give the number of labelled positives", lambda: -m.positives),
        ("only {positives} labelled positives, fewer than min_positives {min_positives} (counted in {positives_in})",
         lambda: m.positives < m.min_positives),
        ("only {negatives} negative images, fewer than min_positives {min_positives} (counted in {positives_in})",
         lambda: m.negatives < m.min_positives),
    ),
)
_COMPRESSION_HISTORY = Condition(
    name="compression_history",
    words="the bundle has a compression history (context has_compression_history)",
    holds_reason="the bundle records its compression history",
    holds=lambda: m.has_compression_history == True,  # noqa: E712
    fails=(
        ("the bundle has no compression history to re-optimise against",
         lambda: m.has_compression_history == False),  # noqa: E712
    ),
)


_ZEROING_FIRST = Condition(
    name="zeroing_first",
    words="zeroing tried first, or not allowed by the policy (a reported false positive: the surgical change "
          "before a new operating point for every image)",
    holds_reason="zeroing was tried or is not allowed (tried: {zeroing_tried}, allowed: {zeroing_allowed})",
    holds=lambda: (m.zeroing_tried == True) | (m.zeroing_allowed == False),  # noqa: E712
    fails=(
        ("zeroing (at most max_channels {max_channels}) is tried first on a reported false positive",
         lambda: (m.zeroing_tried == False) & (m.zeroing_allowed == True)),  # noqa: E712
    ),
)


def conditions_for(intervention: str, policy: Policy, kind: str | None = None) -> tuple[Condition, ...]:
    """The applicability conditions the rules attach to ``intervention`` for ``kind`` under ``policy``."""
    if intervention == "threshold":
        return (_RANKING, _ZEROING_FIRST) if kind == "reported_fp" else (_RANKING,)
    if intervention == "zeroing":
        # A reported image is corrected with at most max_channels channels even when that many cannot
        # bring it below the threshold (the largest decrease then); verification judges the result.
        return () if kind == "reported_fp" else (_FEW_CHANNELS,)
    if intervention == "partial_retrain":
        return (_ENOUGH_POSITIVES,)
    if intervention == "f_reopt":
        return (_COMPRESSION_HISTORY,) if policy.conditions.f_reopt.require_compression_history else ()
    return ()


def rule_specs(policy: Policy) -> list[RuleSpec]:
    """One propose rule per allowed (kind, intervention) pair, in a stable order."""
    return [RuleSpec(kind, name, conditions_for(name, policy, kind))
            for kind in sorted(policy.treatments) for name in sorted(policy.treatments[kind])]


def ruleset_name(policy: Policy) -> str:
    """Derived from the policy's content hash: equal policies share a ruleset, different ones never clash."""
    return RULESET_PREFIX + policy.content_hash[:24]


# -- records ------------------------------------------------------------------------------------

def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _first(fact: IssueFact, key: str, *sections: str) -> Any:
    for section in sections:
        source = getattr(fact, section)
        if key in source and source[key] is not None:
            return source[key]
    return None


def issue_record(fact: IssueFact, *, seq: int, run_id: str, policy: Policy,
                 context: Mapping[str, Any] | None = None, tried: Collection[str] = ()) -> dict[str, Any]:
    """The flat JSON fact asserted for ``fact``: what the rules may test, plus the label's limits.

    Unknown values are left out (rules test their absence with ``-m.field``) rather than given a
    sentinel that a comparison could mistake for data. ``run_id``, ``fact_id`` and ``seq`` make
    every record unique, so durable-rules never sees the same message twice. ``tried``: interventions
    already tried on the fact (a ``reported_fp`` record says whether zeroing was).
    """
    context = context or {}
    cond = policy.conditions_for(fact.label)
    record: dict[str, Any] = {
        "t": "issue",
        "run_id": run_id,
        "fact_id": fact.fact_id,
        "seq": seq,
        "kind": fact.kind,
        "label": fact.label or "",
        "severity": fact.severity,
        "min_auroc_ratio": cond.threshold.min_auroc_ratio,
        "max_channels": cond.zeroing.max_channels,
        "min_positives": cond.partial_retrain.min_positives,
        "has_compression_history": bool(context.get("has_compression_history", False)),
    }
    intact = _first(fact, "auroc_intact", "measured", "evidence")
    if isinstance(intact, bool):
        record["auroc_intact"] = intact
    # Ranking not judgeable (too few positives) but the negatives moved past the threshold.
    criteria = fact.evidence.get("criteria")
    if (fact.kind == "calibration_drift" and fact.measured.get("auroc_comparable") is False
            and isinstance(criteria, list) and "threshold_displacement" in criteria
            and _number(fact.measured.get("reference_fp_rate")) is not None):
        record["negatives_moved"] = True
    auc, ref = _number(fact.measured.get("auroc")), _number(fact.reference.get("auroc"))
    if auc is not None and ref is not None and ref > 0:
        record["auroc_ratio"] = round(float(auc) / float(ref), 6)
    for key in ("positives", "n_channels_needed"):
        value = _number(_first(fact, key, "measured", "evidence"))
        if value is not None:
            record[key] = value
    record.update(_fit_counts(fact, context))
    if fact.kind == "reported_fp":
        record["zeroing_tried"] = "zeroing" in tried
        record["zeroing_allowed"] = "zeroing" in policy.treatments_for(fact.kind)
    return record


def _fit_counts(fact: IssueFact, context: Mapping[str, Any]) -> dict[str, Any]:
    """The positives (and negatives) a retraining of ``fact``'s label will see: the fit split's, when
    the context gives them, else the fact's own count on the whole audit set (said in ``positives_in``)."""
    pos, neg = context.get("fit_positives"), context.get("fit_negatives")
    if fact.label and isinstance(pos, Mapping) and _number(pos.get(fact.label)) is not None:
        out: dict[str, Any] = {"positives": pos[fact.label], "positives_in": "the fit split retraining learns from"}
        if isinstance(neg, Mapping) and _number(neg.get(fact.label)) is not None:
            out["negatives"] = neg[fact.label]
        return out
    return {"positives_in": "the whole audit set; the fit split's count is not known here"}


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return "unknown"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_reason(template: str, record: Mapping[str, Any]) -> str:
    """Fill a reason template from an issue record (missing fields read 'unknown')."""
    return template.format_map(_Fields({k: _show(v) for k, v in record.items()}))


# -- the ruleset --------------------------------------------------------------------------------

def _header(record: Mapping[str, Any], t: str, rule: str, intervention: str) -> dict[str, Any]:
    return {"t": t, "run_id": record["run_id"], "fact_id": record["fact_id"], "seq": record["seq"],
            "rule": rule, "intervention": intervention}


def candidate_fact(spec: RuleSpec, record: Mapping[str, Any]) -> dict[str, Any]:
    """Payload a propose rule asserts (called from inside the durable action)."""
    reasons = [format_reason(c.holds_reason, record) for c in spec.conditions]
    reason = "; ".join(reasons) if reasons else f"policy allows {spec.intervention} for {spec.kind} unconditionally"
    return {**_header(record, "candidate", spec.name, spec.intervention), "reason": reason}


def blocked_fact(spec: RuleSpec, condition: Condition, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
    """Payload a block rule asserts (called from inside the durable action)."""
    template, _ = condition.fails[index]
    return {**_header(record, "blocked", f"block:{spec.kind}:{spec.intervention}:{condition.name}:{index}",
                      spec.intervention), "condition": condition.name, "reason": format_reason(template, record)}


def _all_of(parts: list[Any]) -> Any:
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr


def _rule(expr: Any, action: Callable[[Any], None]) -> dict[str, Any]:
    return {"all": [{"m": expr.define()}], "run": action}


def _propose_action(spec: RuleSpec) -> Callable[[Any], None]:
    def action(c: Any) -> None:
        # Look the payload builder up at fire time (tests patch it to prove errors surface).
        c.assert_fact(_payloads.candidate(spec, c.m._d))

    return action


def _block_action(spec: RuleSpec, condition: Condition, index: int) -> Callable[[Any], None]:
    def action(c: Any) -> None:
        c.assert_fact(_payloads.blocked(spec, condition, index, c.m._d))

    return action


def _received_action(c: Any) -> None:
    record = c.m._d
    c.assert_fact({"t": "received", "run_id": record["run_id"], "fact_id": record["fact_id"], "seq": record["seq"]})


def _sink_action(c: Any) -> None:
    """Facts asserted from actions must match some rule, or durable-rules refuses them."""


class _Payloads:
    candidate = staticmethod(candidate_fact)
    blocked = staticmethod(blocked_fact)


_payloads = _Payloads()


def build_ruleset(policy: Policy) -> dict[str, dict[str, Any]]:
    """A fresh durable-rules ruleset definition for ``policy`` (durable consumes it on registration)."""
    definition: dict[str, dict[str, Any]] = {
        "received": _rule(_is_issue(), _received_action),
        "sink": _rule((m.t == "candidate") | (m.t == "blocked") | (m.t == "received"), _sink_action),
    }
    for spec in rule_specs(policy):
        base = [_is_issue(), m.kind == spec.kind]
        definition[spec.name] = _rule(_all_of(base + [c.holds() for c in spec.conditions]), _propose_action(spec))
        for condition in spec.conditions:
            for index, (_, fails) in enumerate(condition.fails):
                name = f"block:{spec.kind}:{spec.intervention}:{condition.name}:{index}"
                definition[name] = _rule(_all_of([_is_issue(), m.kind == spec.kind, fails()]),
                                         _block_action(spec, condition, index))
    return definition
