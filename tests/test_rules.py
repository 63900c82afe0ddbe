"""The durable-rules ruleset and the decision façade: conditions, selection, escalation, quirks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from engine.core.facts import IssueFact
from rules import ruleset
from rules.decide import ESCALATE_RULE, Decision, RuleEngineError, decide
from rules.policy import load_policy, parse_policy, policy_from_dict
from rules.ruleset import build_ruleset, rule_specs, ruleset_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "policies" / "default.yaml"
CHEAP_YAML = ROOT / "policies" / "cheap_retraining.yaml"


@pytest.fixture(scope="module")
def default():
    return load_policy(DEFAULT_YAML)


def fact(kind: str, label: str | None = "Effusion", *, measured: dict | None = None, reference: dict | None = None,
         evidence: dict | None = None, severity: str = "medium", message: str = "test") -> IssueFact:
    return IssueFact(kind=kind, monitor=kind, label=label, severity=severity, message=message,
                     measured=measured or {}, reference=reference or {}, evidence=evidence or {})


def fp_cluster(channels: int | None = 3, positives: int | None = 30, label: str = "Pneumothorax") -> IssueFact:
    evidence = {} if channels is None else {"n_channels_needed": channels}
    measured = {} if positives is None else {"positives": positives}
    return fact("fp_cluster", label, measured=measured, evidence=evidence, severity="high")


def names(decision: Decision) -> list[str]:
    return [c.intervention for c in decision.candidates]


def one(facts: list[IssueFact] | IssueFact, policy: Any, **kwargs: Any) -> Decision:
    facts = facts if isinstance(facts, list) else [facts]
    (decision,) = decide(facts, policy, run_id=kwargs.pop("run_id", "test-run"), **kwargs)
    return decision


# -- selection and the cost matrix --------------------------------------------------------------

def test_tie_at_cost_two_is_broken_by_expected_time(default) -> None:
    d = one(fp_cluster(), default)
    assert names(d) == ["zeroing", "partial_retrain", "augmentation", "full_retrain"]
    assert d.chosen is not None and d.chosen.intervention == "zeroing"
    assert d.chosen.cost == d.candidates[1].cost == 2  # a genuine tie
    assert d.chosen.rule == "propose:fp_cluster:zeroing"
    assert "Tie at cost 2 with partial_retrain, broken by expected time" in d.rationale
    assert [c.cost for c in d.candidates] == sorted(c.cost for c in d.candidates)


def test_editing_one_cost_in_the_yaml_flips_the_decision(tmp_path: Path, default) -> None:
    text = DEFAULT_YAML.read_text()
    assert "  partial_retrain: 2 " in text
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("  partial_retrain: 2 ", "  partial_retrain: 1 ", 1))
    policy = load_policy(edited)
    assert policy.cost("partial_retrain") == 1 and policy.content_hash != default.content_hash
    d = one(fp_cluster(), policy)
    assert d.chosen.intervention == "partial_retrain"
    assert names(d)[:2] == ["partial_retrain", "zeroing"]
    # The unedited policy, in the same process, still chooses zeroing.
    assert one(fp_cluster(), default).chosen.intervention == "zeroing"


def test_default_and_cheap_retraining_choose_differently() -> None:
    """The documented scenario of policies/cheap_retraining.yaml."""
    scenario = fp_cluster(channels=3, positives=30, label="Pneumothorax")
    default, cheap = load_policy(DEFAULT_YAML), load_policy(CHEAP_YAML)
    d_default, d_cheap = one(scenario, default), one(scenario, cheap)
    assert d_default.chosen.intervention == "zeroing"
    assert d_cheap.chosen.intervention == "partial_retrain" and d_cheap.chosen.cost == 1
    # Few positives and broken ranking: the default needs a human for augmentation, the cheap site
    # retrains the classifier (min_positives 5) on its own.
    drift = fact("calibration_drift", measured={"auroc": 0.7, "positives": 6, "auroc_intact": False},
                 reference={"auroc": 0.85})
    a, b = one(drift, default), one(drift, cheap)
    assert a.chosen.intervention == "augmentation" and a.chosen.needs_approval
    assert b.chosen.intervention == "partial_retrain" and not b.chosen.needs_approval


def test_needs_approval_follows_auto_max_cost(default) -> None:
    d = one(fact("auroc_drop", measured={"positives": 2}), default)
    assert d.chosen.intervention == "augmentation" and d.chosen.cost == 8
    assert d.chosen.needs_approval and "--approve augmentation" in d.rationale
    assert all(c.needs_approval == (c.cost > 3) for c in d.candidates)
    lenient = policy_from_dict({"name": "lenient", "approval": {"auto_max_cost": 8}})
    assert not one(fact("auroc_drop", measured={"positives": 2}), lenient).chosen.needs_approval


def test_per_label_cost_override_changes_only_that_label() -> None:
    policy = policy_from_dict({"name": "x", "labels": {"Pneumothorax": {"costs": {"zeroing": 5}}}})
    assert one(fp_cluster(label="Pneumothorax"), policy).chosen.intervention == "partial_retrain"
    assert one(fp_cluster(label="Mass"), policy).chosen.intervention == "zeroing"


# -- conditions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("measured", "reference", "evidence", "proposed", "why"), [
    ({"auroc_intact": True}, {}, {}, True, "ranking intact"),
    ({"auroc_intact": False, "auroc": 0.9}, {"auroc": 0.9}, {}, False, "ranking is not intact"),
    ({}, {}, {"auroc_intact": True}, True, "ranking intact"),  # evidence counts too
    ({"auroc": 0.80}, {"auroc": 0.82}, {}, True, "ranking intact"),  # ratio 0.976 >= 0.95
    ({"auroc": 0.70}, {"auroc": 0.82}, {}, False, "below min_auroc_ratio 0.95"),
    ({}, {}, {}, False, "ranking intactness unknown"),
])
def test_threshold_only_while_ranking_is_intact(default, measured, reference, evidence, proposed, why) -> None:
    for kind in ("calibration_drift", "recall_collapse"):
        d = one(fact(kind, measured={**measured, "positives": 50}, reference=reference, evidence=evidence), default)
        assert ("threshold" in names(d)) is proposed, kind
        if proposed:
            assert d.chosen.intervention == "threshold" and why in d.chosen.reason
        else:
            assert d.chosen.intervention == "partial_retrain"
            (blocked,) = [b for b in d.blocked if b.intervention == "threshold"]
            assert why in blocked.reason and why in d.rationale


@pytest.mark.parametrize(("channels", "proposed", "why"), [
    (10, True, "10 classifier channel(s) explain"),
    (11, False, "11 classifier channels are needed, more than max_channels 10"),
    (None, False, "no n_channels_needed"),
])
def test_zeroing_only_when_few_channels_explain_the_cluster(default, channels, proposed, why) -> None:
    d = one(fp_cluster(channels=channels), default)
    assert ("zeroing" in names(d)) is proposed
    if proposed:
        assert why in d.chosen.reason
    else:
        assert d.chosen.intervention == "partial_retrain" and why in d.rationale


@pytest.mark.parametrize(("positives", "proposed", "why"), [
    (10, True, "10 labelled positives"),
    (9, False, "only 9 labelled positives, fewer than min_positives 10"),
    (None, False, "does not give the number of labelled positives"),
])
def test_partial_retrain_needs_enough_positives(default, positives, proposed, why) -> None:
    d = one(fact("auroc_drop", measured={} if positives is None else {"positives": positives}), default)
    assert ("partial_retrain" in names(d)) is proposed
    assert d.chosen.intervention == ("partial_retrain" if proposed else "augmentation")
    assert why in (d.chosen.reason if proposed else d.rationale)


def test_per_label_condition_override(default) -> None:
    policy = policy_from_dict({"name": "x", "labels": {"Hernia": {"conditions": {"partial_retrain": {"min_positives": 3}}}}})
    assert "partial_retrain" in names(one(fact("auroc_drop", "Hernia", measured={"positives": 4}), policy))
    assert "partial_retrain" not in names(one(fact("auroc_drop", "Mass", measured={"positives": 4}), policy))


def test_f_reopt_needs_a_compression_history(default) -> None:
    f = fact("compression_fidelity", None, measured={"max_logit_delta": 0.3})
    assert one(f, default, context={"has_compression_history": True}).chosen.intervention == "f_reopt"
    d = one(f, default)  # no context: no history known
    assert names(d) == ["full_retrain"] and "no compression history" in d.rationale
    relaxed = policy_from_dict({"name": "x", "conditions": {"f_reopt": {"require_compression_history": False}}})
    assert one(f, relaxed).chosen.intervention == "f_reopt"


def test_informational_facts_get_no_decision(default) -> None:
    facts = [fact("input_drift", None, severity="info"), fp_cluster(),
             fact("prevalence_shift", severity="info"), fact("cannot_assess", severity="info"),
             fact("auroc_drop", measured={"positives": 20})]
    decisions = decide(facts, default, run_id="r")
    assert [d.fact for d in decisions] == [facts[1], facts[4]]  # input order, actionable only
    assert decide([fact("input_drift", None, severity="info")], default, run_id="r") == []
    assert decide([], default, run_id="r") == []


# -- exclusion and escalation -------------------------------------------------------------------

def test_exclusion_asks_again_without_rejected_interventions(default) -> None:
    f = fp_cluster()
    d = one(f, default, exclude={f.fact_id: {"zeroing"}})
    assert d.chosen.intervention == "partial_retrain"
    assert "zeroing" not in names(d) and d.excluded == ("zeroing",)
    assert "Excluded, already tried and rejected: zeroing" in d.rationale
    # Exclusions for another fact do not apply.
    assert one(f, default, exclude={"someotherfact": {"zeroing"}}).chosen.intervention == "zeroing"


def test_escalation_when_nothing_is_left(default) -> None:
    f = fp_cluster(channels=50, positives=2)
    d = one(f, default, exclude={f.fact_id: {"augmentation", "full_retrain"}})
    assert d.chosen is None and d.escalate
    (c,) = d.candidates
    assert c.intervention == "no_action" and c.rule == ESCALATE_RULE and c.cost == 0 and not c.needs_approval
    for text in ("zeroing: 50 classifier channels are needed", "partial_retrain: only 2 labelled positives",
                 "augmentation: already tried and rejected", "full_retrain: already tried and rejected"):
        assert text in c.reason, text
    assert d.rationale.startswith("Escalate fp_cluster on Pneumothorax to a human")


def test_a_kind_the_policy_cannot_treat_is_escalated() -> None:
    policy = policy_from_dict({"name": "x", "treatments": {"compression_fidelity": []}})
    d = one(fact("compression_fidelity", None), policy, context={"has_compression_history": True})
    assert d.chosen is None and "the policy allows no treatment for compression_fidelity" in d.candidates[0].reason


# -- determinism and durable-rules quirks -------------------------------------------------------

def mixed_facts(n: int = 24) -> list[IssueFact]:
    makers = [
        lambda i: fp_cluster(channels=i % 14, positives=i),
        lambda i: fact("calibration_drift", measured={"auroc": 0.6 + i / 100, "positives": i}, reference={"auroc": 0.8}),
        lambda i: fact("recall_collapse", "Mass", measured={"auroc_intact": i % 2 == 0, "positives": i}),
        lambda i: fact("auroc_drop", "Nodule", measured={"positives": i}),
        lambda i: fact("compression_fidelity", None, measured={"max_logit_delta": i / 10}),
        lambda i: fact("input_drift", None, severity="info", measured={"mmd": i / 100}),
    ]
    return [makers[i % len(makers)](i) for i in range(n)]


def as_dicts(decisions: list[Decision]) -> list[dict]:
    return [d.to_dict() for d in decisions]


def test_same_inputs_same_decisions_within_one_process(default) -> None:
    facts = mixed_facts()
    first = as_dicts(decide(facts, default, run_id="run-a", context={"has_compression_history": True}))
    again = as_dicts(decide(facts, default, run_id="run-a", context={"has_compression_history": True}))
    other_run = as_dicts(decide(facts, default, run_id="run-b", context={"has_compression_history": True}))
    assert first == again == other_run
    reloaded = load_policy(DEFAULT_YAML)  # a second Policy object with the same content
    assert as_dicts(decide(facts, reloaded, run_id="run-a", context={"has_compression_history": True})) == first
    assert ruleset_name(reloaded) == ruleset_name(default)


def test_two_policies_interleaved_in_one_process_never_clash(default) -> None:
    """durable-rules' 'already registered' quirk: each policy gets its own ruleset, reused on reload."""
    cheap = load_policy(CHEAP_YAML)
    assert ruleset_name(cheap) != ruleset_name(default)
    facts = mixed_facts(12)
    a1, b1 = as_dicts(decide(facts, default, run_id="r")), as_dicts(decide(facts, cheap, run_id="r"))
    a2, b2 = as_dicts(decide(facts, default, run_id="r")), as_dicts(decide(facts, cheap, run_id="r"))
    assert a1 == a2 and b1 == b2 and a1 != b1
    fresh = parse_policy(CHEAP_YAML.read_text())  # same content, no file: same ruleset, no re-registration
    assert as_dicts(decide(facts, fresh, run_id="r")) == b1


def test_identical_facts_in_one_call_do_not_trip_the_seen_message_quirk(default) -> None:
    f = fp_cluster()
    decisions = decide([f, f, f], default, run_id="dup")
    assert len(decisions) == 3 and len({str(d.to_dict()) for d in decisions}) == 1


def test_input_order_does_not_change_each_facts_decision(default) -> None:
    facts = [f for f in mixed_facts(12) if f.actionable]
    forward = {d.fact.fact_id: d.to_dict() for d in decide(facts, default, run_id="r")}
    backward = {d.fact.fact_id: d.to_dict() for d in decide(facts[::-1], default, run_id="r")}
    assert forward == backward


def test_an_exception_inside_an_action_surfaces(default, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec, record):
        raise ValueError("boom in action")

    monkeypatch.setattr(ruleset._payloads, "candidate", boom)
    with pytest.raises(RuleEngineError, match="boom in action"):
        decide([fp_cluster()], default, run_id="err")
    monkeypatch.undo()
    # The failed session left nothing behind: the same run id and facts decide normally.
    assert one(fp_cluster(), default, run_id="err").chosen.intervention == "zeroing"


def test_concurrent_calls_are_serialised_and_agree(default) -> None:
    facts = mixed_facts(18)
    expected = as_dicts(decide(facts, default, run_id="t"))
    results: list[Any] = []

    def work(i: int) -> None:
        try:
            results.append(as_dicts(decide(facts, default, run_id=f"t{i}")))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_no_durable_dispatcher_threads_are_started(default) -> None:
    """durable's Host() starts self-re-arming timer threads; our host runs actions synchronously instead."""
    decide(mixed_facts(6), default, run_id="threads")
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


def test_run_id_is_required(default) -> None:
    with pytest.raises(ValueError, match="'run_id' parameter of decide must be a non-empty string"):
        decide([fp_cluster()], default, run_id="")


# -- the ruleset itself -------------------------------------------------------------------------

def test_one_propose_rule_per_allowed_pair_and_blocks_for_each_failure(default) -> None:
    specs = rule_specs(default)
    pairs = {(s.kind, s.intervention) for s in specs}
    assert pairs == {(k, n) for k, ns in default.treatments.items() for n in ns}
    definition = build_ruleset(default)
    propose = [name for name in definition if name.startswith("propose:")]
    assert sorted(propose) == sorted(s.name for s in specs)
    assert "block:fp_cluster:zeroing:few_channels:1" in definition
    assert "block:calibration_drift:threshold:ranking_intact:0" in definition
    assert not any(name.startswith("block:") and ":augmentation:" in name for name in definition)  # no conditions


def test_rules_fire_from_the_engine_not_from_python(default) -> None:
    """A policy that does not allow zeroing never proposes it, whatever the fact says."""
    policy = policy_from_dict({"name": "no-zeroing", "treatments": {"fp_cluster": ["partial_retrain"]}})
    d = one(fp_cluster(channels=1), policy)
    assert names(d) == ["partial_retrain"] and not d.blocked
