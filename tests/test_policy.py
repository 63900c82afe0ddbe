"""The policy schema and loader, cost revision, and the ``policy`` CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cli import main
from engine.audit import AuditStore
from engine.core.errors import DataError, PolicyError
from engine.triage.verify import Acceptance
from interventions import registry
from interventions.base import Intervention
from rules.policy import (
    DEFAULT_COSTS,
    AcceptanceConfig,
    Policy,
    load_policy,
    parse_policy,
    policy_from_dict,
)
from rules.revise import revise_costs, rewrite_costs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"
CHEAP = ROOT / "policies" / "cheap_retraining.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- loading the shipped policies ---------------------------------------------------------------

@pytest.mark.parametrize("path", [DEFAULT, CHEAP], ids=["default", "cheap_retraining"])
def test_shipped_policies_load(path: Path) -> None:
    policy = load_policy(path)
    assert policy.source_path == path
    assert len(policy.content_hash) == 64
    # Every actionable kind is treated and every named intervention has a cost and a time.
    for kind, names in policy.treatments.items():
        assert names, kind
        for name in names:
            assert policy.cost(name) >= 0 and policy.expected_time(name) >= 0
            # Only pairs the plugin treats: an approved escalation must be able to run.
            assert kind in registry.available_interventions()[name].treats, (kind, name)


def test_default_policy_is_the_papers_cost_matrix() -> None:
    policy = load_policy(DEFAULT)
    assert dict(policy.costs) == DEFAULT_COSTS
    assert policy.approval.auto_max_cost == 3
    assert policy.acceptance.max_other_auroc_change == 0.01
    # Tie-break order the brief asks for: threshold < zeroing < partial_retrain < f_reopt < backbone work.
    t = policy.expected_time
    assert t("threshold") < 1 < t("zeroing") < 5 < t("partial_retrain") < t("f_reopt") < t("augmentation")
    assert t("f_reopt") >= 60 and t("augmentation") >= 3600 and t("full_retrain") >= 3600


def test_content_hash_ignores_formatting_and_follows_content(tmp_path: Path) -> None:
    a = parse_policy("name: p\ncosts: {zeroing: 2}\n")
    b = parse_policy("# a comment\nname:   p\ncosts:\n  zeroing: 2.0\n")
    c = parse_policy("name: p\ncosts: {zeroing: 3}\n")
    assert a.content_hash == b.content_hash != c.content_hash
    assert a.content_hash == policy_from_dict({"name": "p"}).content_hash  # 2 is the default anyway


# -- error messages -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ncosts:\n  zeroing: -1\n",
     "==> At key: costs ==> At key: zeroing: must be a number >= 0, got -1"),
    ("name: x\ncosts:\n  zeroin: 1\n",
     "==> At key: costs ==> At key: zeroin: unknown intervention 'zeroin' (expected one of: augmentation, "
     "f_reopt, full_retrain, partial_retrain, threshold, zeroing, no_action)"),
    ("name: x\ntreatments:\n  fp_cluster: [zeroing, retrain]\n",
     "==> At key: treatments ==> At key: fp_cluster ==> At index 1: unknown intervention 'retrain'"),
    ("name: x\ncosts:\n  zeroing: cheap\n",
     "==> At key: costs ==> At key: zeroing: must be a number, got 'cheap'"),
    ("name: x\ncosts:\n  zeroing: '2'\n",
     "==> At key: costs ==> At key: zeroing: must be a number, got '2'"),
    ("name: x\napproval:\n  auto_max_cost: true\n",
     "==> At key: approval ==> At key: auto_max_cost: must be a number, got true"),
    ("name: x\nbudget:\n  max_attempts_per_issue: 1.5\n",
     "==> At key: budget ==> At key: max_attempts_per_issue: must be an integer, got 1.5"),
    ("name: x\ntreatments:\n  fp_cluster: zeroing\n",
     "==> At key: treatments ==> At key: fp_cluster: must be a list, got 'zeroing'"),
    ("name: x\ncolour: blue\n",
     "==> At key: colour: unknown key (expected one of: name, version, description, costs, expected_time_s, "
     "treatments, conditions, acceptance, verification, approval, budget, params, labels, monitors)"),
    ("name: x\nacceptance:\n  max_ece: 0.1\n",
     "==> At key: acceptance ==> At key: max_ece: unknown key (expected one of: max_other_auroc_change, "
     "min_improvement, max_tp_lost, max_new_issues, min_fp_removed_share, confidence, bootstrap_resamples)"),
    ("name: x\nacceptance:\n  confidence: 1.5\n",
     "==> At key: acceptance ==> At key: confidence: must be a number < 1, got 1.5"),
    ("name: x\nacceptance:\n  bootstrap_resamples: 10\n",
     "==> At key: acceptance ==> At key: bootstrap_resamples: must be an integer >= 100, got 10"),
    ("name: x\ntreatments:\n  fp_clusters: [zeroing]\n",
     "==> At key: treatments ==> At key: fp_clusters: unknown issue kind 'fp_clusters'"),
    ("name: x\ntreatments:\n  input_drift: [threshold]\n",
     "==> At key: treatments ==> At key: input_drift: issue kind 'input_drift' is informational"),
    ("name: x\ntreatments:\n  fp_cluster: [zeroing, zeroing]\n",
     "==> At key: treatments ==> At key: fp_cluster ==> At index 1: 'zeroing' is listed twice"),
    ("name: x\ntreatments:\n  fp_cluster: [no_action]\n",
     "==> At key: treatments ==> At key: fp_cluster ==> At index 0: 'no_action' is not a treatment"),
    ("name: x\nparams:\n  threshold:\n    method: fixed_sensitivity\n",
     "==> At key: params ==> At key: threshold ==> At key: target: required when method is fixed_sensitivity"),
    ("name: x\nparams:\n  threshold:\n    method: best\n",
     "==> At key: params ==> At key: threshold ==> At key: method: must be one of 'youden', "
     "'fixed_sensitivity' or 'cost_weighted', got 'best'"),
    ("name: x\nlabels:\n  Pneumothorx: {}\n",
     "==> At key: labels ==> At key: Pneumothorx: unknown label 'Pneumothorx'"),
    ("name: x\nlabels:\n  Pneumothorax:\n    acceptance:\n      max_tp_lost: -2\n",
     "==> At key: labels ==> At key: Pneumothorax ==> At key: acceptance ==> At key: max_tp_lost: "
     "must be an integer >= 0, got -2"),
    ("name: x\nlabels:\n  Pneumothorax:\n    monitors:\n      recall_collapse: {min_recall_ratio: 2}\n",
     "==> At key: labels ==> At key: Pneumothorax ==> At key: monitors ==> At key: recall_collapse "
     "==> At key: min_recall_ratio: must be a number <= 1, got 2"),
    ("name: x\nmonitors:\n  auroc_drop: {max_dropp: 0.1}\n",
     "==> At key: monitors ==> At key: auroc_drop ==> At key: max_dropp: unknown key"),
    ("costs: {}\n", "==> At key: name: required key is missing"),
])
def test_error_messages_name_file_key_path_expected_and_got(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: ==> At key: ")
    assert message in str(info.value)


def test_exact_message_for_a_negative_cost(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ncosts:\n  zeroing: -1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: ==> At key: costs ==> At key: zeroing: must be a number >= 0, got -1"


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ncosts: [1, 2\n", "invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    ("name: x\ncosts:\n  zeroing: 1\n   threshold: 2\n", "invalid YAML at line 4, column 13: mapping values are not "
     "allowed here"),
    ("name: x\ncosts:\n  zeroing: 1\n  zeroing: 5\n", "invalid YAML at line 4, column 3: duplicate key 'zeroing' "
     "(first at line 3)"),
    ("", "expected a mapping at the top level (name, costs, treatments ...), got an empty document"),
    ("- name: x\n", "expected a mapping at the top level (name, costs, treatments ...), got a list"),
])
def test_bad_yaml_reports_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="nope.yaml: policy file not found"):
        load_policy(tmp_path / "nope.yaml")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ncosts: {zeroing: -1, threshold: -2}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{path}: ==> At key: costs") for line in lines)


def test_plugin_interventions_are_validated_against_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    class Denoise(Intervention):
        name = "denoise"
        treats = ("auroc_drop",)
        expected_time_s = 42.0

        def _apply(self, ctx):  # pragma: no cover - never run here
            raise NotImplementedError

    with pytest.raises(PolicyError, match=r"At key: costs ==> At key: denoise: unknown intervention 'denoise'"):
        policy_from_dict({"name": "x", "costs": {"denoise": 1.5}})
    monkeypatch.setitem(registry.BUILTINS, "denoise", Denoise)
    with pytest.raises(PolicyError, match=r"At index 0: intervention 'denoise' has no cost; add costs.denoise"):
        policy_from_dict({"name": "x", "treatments": {"auroc_drop": ["denoise"]}})
    with pytest.raises(PolicyError, match=r"At key: treatments ==> At key: fp_cluster: denoise does not treat "
                                          r"fp_cluster \(it treats auroc_drop\)"):
        policy_from_dict({"name": "x", "costs": {"denoise": 1.5}, "treatments": {"fp_cluster": ["zeroing", "denoise"]}})
    policy = policy_from_dict({"name": "x", "costs": {"denoise": 1.5}, "treatments": {"auroc_drop": ["denoise"]}})
    assert policy.cost("denoise") == 1.5
    assert policy.expected_time("denoise") == 42.0  # the plugin's own estimate when the policy gives none
    # A plugin that declares no Params takes no parameters.
    with pytest.raises(PolicyError, match=r"At key: params ==> At key: denoise ==> At key: strength: unknown key"):
        policy_from_dict({"name": "x", "params": {"denoise": {"strength": 2}}})


@pytest.mark.parametrize(("params", "message"), [
    ({"zeroing": {"max_channels": 0}},
     "==> At key: params ==> At key: zeroing ==> At key: max_channels: must be an integer >= 1, got 0"),
    ({"partial_retrain": {"l2_grid": []}},
     "==> At key: params ==> At key: partial_retrain ==> At key: l2_grid: must be a non-empty list of numbers >= 0, "
     "got a list"),
    ({"augmentation": {"epochs": 2.5}},
     "==> At key: params ==> At key: augmentation ==> At key: epochs: must be an integer, got 2.5"),
    ({"full_retrain": {"preset": "huge"}},
     "==> At key: params ==> At key: full_retrain ==> At key: preset: must be one of 'densenet121', 'tiny', "
     "'small' or null, got 'huge'"),
    ({"f_reopt": {"views": True}},
     "==> At key: params ==> At key: f_reopt ==> At key: views: must be an integer, got true"),
])
def test_every_plugins_parameters_are_validated_when_the_policy_loads(params: dict, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"name": "x", "params": params}, source="p.yaml")
    assert str(info.value) == f"p.yaml: {message}"


def test_label_parameters_are_validated_merged_onto_the_policy_wide_ones() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"name": "x", "params": {"threshold": {"method": "cost_weighted", "fn_cost": 2}},
                          "labels": {"Effusion": {"params": {"threshold": {"fp_cost": 0}}}}}, source="p.yaml")
    assert str(info.value) == ("p.yaml: ==> At key: params ==> At key: threshold ==> At key: fp_cost: required when "
                               "method is cost_weighted (a positive number)\n"
                               "p.yaml: ==> At key: labels ==> At key: Effusion ==> At key: params ==> At key: "
                               "threshold ==> At key: fp_cost: must be a number > 0, got 0")


# -- helpers ------------------------------------------------------------------------------------

def test_per_label_overrides_resolve_and_others_keep_the_policy_values() -> None:
    policy = policy_from_dict({
        "name": "x",
        "labels": {"Pneumothorax": {
            "costs": {"zeroing": 5},
            "acceptance": {"max_tp_lost": 1},
            "conditions": {"partial_retrain": {"min_positives": 3}},
            "params": {"threshold": {"method": "fixed_sensitivity", "target": 0.95}},
            "monitors": {"recall_collapse": {"min_recall_ratio": 0.9}},
        }},
    })
    assert policy.cost("zeroing", "Pneumothorax") == 5 and policy.cost("zeroing", "Effusion") == 2
    assert policy.cost("zeroing") == 2
    assert policy.acceptance_for("Pneumothorax").max_tp_lost == 1
    assert policy.acceptance_for("Pneumothorax").max_other_auroc_change == 0.01  # merged, not replaced
    assert policy.acceptance_for("Effusion") == policy.acceptance
    assert policy.conditions_for("Pneumothorax").partial_retrain.min_positives == 3
    assert policy.conditions_for(None).partial_retrain.min_positives == 10
    assert policy.params_for("threshold", "Pneumothorax") == {"method": "fixed_sensitivity", "target": 0.95}
    assert policy.params_for("threshold", "Effusion") == {"method": "youden"}
    assert policy.params_for("full_retrain") == {}
    # Label monitor changes land in MonitorConfig.overrides, where the monitors look for them.
    assert policy.monitors.for_label("Pneumothorax").recall_collapse.min_recall_ratio == 0.9
    assert policy.monitors.for_label("Effusion").recall_collapse.min_recall_ratio == 0.6


def test_params_for_returns_a_copy() -> None:
    policy = policy_from_dict({"name": "x"})
    policy.params_for("threshold")["method"] = "cost_weighted"
    assert policy.params_for("threshold") == {"method": "youden"}


def test_plugin_limits_follow_the_rule_conditions_unless_params_set_them() -> None:
    """The rule that proposes partial_retrain / zeroing and the plugin that applies it read one number."""
    policy = policy_from_dict({
        "name": "x",
        "conditions": {"partial_retrain": {"min_positives": 5}, "zeroing": {"max_channels": 7}},
        "labels": {"Pneumothorax": {"conditions": {"partial_retrain": {"min_positives": 1}},
                                    "params": {"zeroing": {"max_channels": 3}}}},
    })
    assert policy.params_for("partial_retrain") == {"min_positives": 5}
    assert policy.params_for("partial_retrain", "Pneumothorax") == {"min_positives": 2}  # training needs 2 of each
    assert policy.params_for("zeroing") == {"max_channels": 7}
    assert policy.params_for("zeroing", "Pneumothorax") == {"max_channels": 3}  # explicit params win
    explicit = policy_from_dict({"name": "y", "params": {"partial_retrain": {"min_positives": 12}}})
    assert explicit.params_for("partial_retrain") == {"min_positives": 12}


def test_label_monitor_overrides_in_two_places_are_refused() -> None:
    with pytest.raises(PolicyError, match="monitors.overrides.Effusion is also set"):
        policy_from_dict({"name": "x", "monitors": {"overrides": {"Effusion": {"auroc_drop": {"max_drop": 0.1}}}},
                          "labels": {"Effusion": {"monitors": {"auroc_drop": {"max_drop": 0.2}}}}})


def test_unknown_cost_lookup_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="has no cost for intervention 'nope'"):
        policy_from_dict({"name": "x"}).cost("nope")


def test_policy_is_immutable() -> None:
    policy = policy_from_dict({"name": "x"})
    assert isinstance(policy, Policy)
    for section, key, value in ((policy, "name", "y"), (policy.acceptance, "max_tp_lost", 3)):
        with pytest.raises(ValidationError) as info:
            setattr(section, key, value)
        assert [e["type"] for e in info.value.errors()] == ["frozen_instance"]
    assert policy.name == "x" and policy.acceptance.max_tp_lost == 0


def test_acceptance_limits_map_onto_the_verifier_per_label() -> None:
    """The verifier's Acceptance is built from ``acceptance_for(label).model_dump()``: same fields, label merged
    (plus the label's sensitivity target and the monitors' floor of positives, read from elsewhere in the policy)."""
    assert set(AcceptanceConfig.model_fields) == {f.name for f in dataclasses.fields(Acceptance)} - {
        "sensitivity_target", "min_positives"}
    policy = policy_from_dict({
        "name": "x",
        "acceptance": {"max_other_auroc_change": 0.02, "min_improvement": 0.5, "max_new_issues": 2},
        "labels": {"Pneumothorax": {"acceptance": {"max_tp_lost": 1, "min_fp_removed_share": None}}},
    })
    out = Acceptance(**policy.acceptance_for("Pneumothorax").model_dump())
    assert out == Acceptance(max_other_auroc_change=0.02, max_tp_lost=1, min_improvement=0.5, max_new_issues=2,
                             min_fp_removed_share=None)
    other = Acceptance(**policy.acceptance_for("Effusion").model_dump())
    assert other == Acceptance(max_other_auroc_change=0.02, max_tp_lost=0, min_improvement=0.5, max_new_issues=2,
                               min_fp_removed_share=0.5)
    assert Acceptance(**policy.acceptance_for(None).model_dump()) == other


def test_the_verifier_reads_the_labels_sensitivity_target_and_the_statistical_settings() -> None:
    from engine.triage import acceptance_from_policy

    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")
    emergency = acceptance_from_policy(policy, "Pneumothorax")
    assert (emergency.sensitivity_target, emergency.max_tp_lost) == (0.9, 0)  # fixed_sensitivity target 0.9
    other = acceptance_from_policy(policy, "Effusion")  # youden: no target
    assert other.sensitivity_target is None and other.min_positives == policy.monitors.min_comparison_positives
    assert (other.confidence, other.bootstrap_resamples) == (0.95, 1000)
    strict = policy_from_dict({"name": "x", "acceptance": {"confidence": 0.99, "bootstrap_resamples": 2000}})
    assert (acceptance_from_policy(strict, None).confidence, acceptance_from_policy(strict, None).bootstrap_resamples) \
        == (0.99, 2000)


# -- cost revision ------------------------------------------------------------------------------

PAPER_BEFORE = """\
name: paper
# before timing partial retraining
costs:
  threshold: 1
  zeroing: 2
  partial_retrain: 6   # a guess
  full_retrain: 10
"""


def obs(name: str, seconds: float, outcome: str = "accepted", n: int = 1) -> list[dict]:
    return [{"intervention": name, "wall_time_s": seconds, "outcome": outcome} for _ in range(n)]


def test_revision_reproduces_the_papers_partial_retrain_6_to_2(tmp_path: Path) -> None:
    path = write(tmp_path, PAPER_BEFORE)
    policy = load_policy(path)
    observations = obs("partial_retrain", 9.0, n=3) + obs("partial_retrain", 12.0, n=2) + obs("threshold", 0.2, n=4)
    result = revise_costs(policy, observations)
    assert result.changes == {"partial_retrain": (6.0, 2.0)}
    assert f"--- {path}\n" in result.diff
    assert "-  partial_retrain: 6   # a guess\n" in result.diff
    assert "+  partial_retrain: 2   # a guess\n" in result.diff
    body = result.diff.splitlines()[2:]
    assert sum(line.startswith(("-", "+")) for line in body) == 2  # exactly one line changed
    assert path.read_text() == PAPER_BEFORE  # proposal only
    assert parse_policy(result.revised_text).cost("partial_retrain") == 2


def test_revision_failure_penalty_and_minimum_observations() -> None:
    policy = policy_from_dict({"name": "x"})
    observations = (obs("threshold", 0.3, "accepted", 2) + obs("threshold", 0.4, "rejected", 2)
                    + obs("zeroing", 2.0, n=2) + obs("f_reopt", 900.0, "unverified", 3))
    result = revise_costs(policy, observations)
    rows = {r.intervention: r for r in result.rows}
    assert rows["threshold"].failure_rate == 0.5
    assert rows["threshold"].new_cost == 2  # tier 1 x (1 + 0.5) = 1.5, rounded half-up
    assert rows["zeroing"].new_cost == 2 and "fewer than the 3 needed" in rows["zeroing"].reason
    assert rows["f_reopt"].failure_rate is None and rows["f_reopt"].new_cost == 3  # unverified: time only
    assert rows["full_retrain"].reason == "kept: never attempted"
    assert set(result.changes) == {"threshold"}


def test_revision_maps_onto_the_policys_scale() -> None:
    policy = load_policy(CHEAP)  # largest cost 6 -> scale 0.6
    result = revise_costs(policy, obs("full_retrain", 5 * 3600.0, n=3))
    assert result.changes == {}  # tier 10 x 0.6 = 6: the cost it already has
    assert {r.intervention: r.new_cost for r in result.rows}["full_retrain"] == 6
    result = revise_costs(policy, obs("augmentation", 3 * 3600.0, n=3))
    assert result.changes == {"augmentation": (3.0, 5.0)}  # 8 x 0.6 = 4.8 -> 5


def test_revision_with_matching_measurements_proposes_nothing() -> None:
    policy = load_policy(DEFAULT)
    observations = obs("threshold", 0.4, n=3) + obs("zeroing", 3.0, n=3) + obs("partial_retrain", 11.0, n=3)
    result = revise_costs(policy, observations)
    assert result.changes == {} and result.diff == ""


def test_revision_skips_unknown_interventions_and_rejects_bad_rows() -> None:
    policy = policy_from_dict({"name": "x"})
    assert revise_costs(policy, obs("mystery", 1.0, n=3)).skipped == ("mystery",)
    with pytest.raises(DataError, match="observation 1: 'outcome' must be one of"):
        revise_costs(policy, obs("threshold", 1.0) + [{"intervention": "threshold", "wall_time_s": 1, "outcome": "ok"}])
    with pytest.raises(DataError, match="observation 0: 'wall_time_s' must be a number >= 0 or null, got -1"):
        revise_costs(policy, [{"intervention": "threshold", "wall_time_s": -1, "outcome": "accepted"}])


@pytest.mark.parametrize(("text", "expected"), [
    ("name: x\ncosts: {zeroing: 2, threshold: 1}\n", "name: x\ncosts: {zeroing: 4, threshold: 1, augmentation: 7}\n"),
    ("name: x\n", "name: x\ncosts:\n  zeroing: 4\n  augmentation: 7\n"),
    ("name: x\ncosts:\n  zeroing: 2  # c\nother: 1\n", "name: x\ncosts:\n  zeroing: 4  # c\n  augmentation: 7\nother: 1\n"),
])
def test_rewrite_costs_edits_only_the_cost_entries(text: str, expected: str) -> None:
    assert rewrite_costs(text, {"zeroing": 4.0, "augmentation": 7.0}) == expected


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_validate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["policy", "validate", str(DEFAULT)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and load_policy(DEFAULT).content_hash in out.replace("\n", "")
    bad = write(tmp_path, "name: x\ncosts:\n  zeroing: -1\n")
    assert main(["policy", "validate", str(bad)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "zeroing: must be a number >= 0, got -1" in err and "Traceback" not in err


def test_cli_validate_refuses_a_pair_its_plugin_does_not_treat(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    """Approving such a pair would answer "not applicable", so the plan is refused when it loads."""
    bad = write(tmp_path, "name: x\ntreatments:\n  recall_collapse: [threshold, zeroing]\n"
                          "  compression_fidelity: [f_reopt, threshold]\n")
    assert main(["policy", "validate", str(bad)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    for line in (f"{bad}: ==> At key: treatments ==> At key: recall_collapse: zeroing does not treat recall_collapse "
                 "(it treats fp_cluster, reported_fp)",
                 f"{bad}: ==> At key: treatments ==> At key: compression_fidelity: threshold does not treat "
                 "compression_fidelity (it treats calibration_drift, recall_collapse, reported_fp)"):
        assert line in err, err
    assert "Traceback" not in err and "augmentation" not in err  # the default pairs it fills in are all treatable
    for shipped in (DEFAULT, CHEAP):
        assert main(["policy", "validate", str(shipped)]) == 0


def test_cli_explain_shows_candidates_and_default_choice(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.console import console

    monkeypatch.setattr(console, "width", 220)
    assert main(["policy", "explain", str(DEFAULT)]) == 0
    out = capsys.readouterr().out
    for text in ("calibration_drift", "compression_fidelity", "chosen", "needs --approve",
                 "Per-label overrides", "Pneumothorax", "broken by expected time"):
        assert text in out, text


def test_explain_rows_follow_costs() -> None:
    from engine.commands.policy import explain_rows

    rows = explain_rows(load_policy(DEFAULT))
    assert rows["fp_cluster"]["chosen"] == "zeroing"
    assert [c["intervention"] for c in rows["fp_cluster"]["candidates"]] == [
        "zeroing", "partial_retrain", "augmentation", "full_retrain"]
    assert explain_rows(load_policy(CHEAP))["fp_cluster"]["chosen"] == "partial_retrain"


def test_cli_revise_from_audit_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_path = write(tmp_path, PAPER_BEFORE, "paper.yaml")
    db = tmp_path / "audit.sqlite"
    with AuditStore(db, tool_version="test") as store:
        store.append("run1", "run_started", {})
        for attempt, seconds in enumerate((8.0, 10.0, 11.0)):
            store.append("run1", "intervention_applied", {"intervention": "partial_retrain", "fact_id": "f1",
                                                          "attempt": attempt, "wall_time_s": seconds})
            store.append("run1", "verification", {"intervention": "partial_retrain", "fact_id": "f1",
                                                  "attempt": attempt, "passed": True})
    out_file = tmp_path / "revision.diff"
    assert main(["policy", "revise", str(policy_path), "--audit", str(db), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "partial_retrain" in out and "policy file was not changed" in out
    diff = out_file.read_text()
    assert "+  partial_retrain: 2   # a guess" in diff
    assert policy_path.read_text() == PAPER_BEFORE


def test_cli_revise_from_jsonl_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_path = write(tmp_path, PAPER_BEFORE, "paper.yaml")
    jsonl = tmp_path / "obs.jsonl"
    jsonl.write_text("".join(json.dumps(o) + "\n" for o in obs("threshold", 0.5, n=3)))
    assert main(["policy", "revise", str(policy_path), "--audit", str(jsonl)]) == 0
    assert "No revision proposed" in capsys.readouterr().out
    assert main(["policy", "revise", str(policy_path), "--audit", str(tmp_path / "missing.sqlite")]) == 1
    assert "audit store not found" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite").exists()
    assert main(["policy", "revise", str(policy_path), "--audit", str(jsonl), "--out", str(policy_path)]) == 1
    assert "refusing to write over the policy" in capsys.readouterr().err.replace("\n", "")
    assert policy_path.read_text() == PAPER_BEFORE
