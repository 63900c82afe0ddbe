"""``cli.py backtest``: planted heals, harms, escalations and false treatments; resumable and deterministic.

The judge is tested on planted models (a drifted head fixed, a head scrambled) where the right
verdict is known; the runner end to end on a tiny DenseNet and a learnable-pattern dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import pattern_bundle, write_pattern_dataset

from engine.backtest import (
    build_document,
    contenders,
    run_backtest,
    runner,
    scenarios_from_flags,
    write_document,
)
from engine.backtest.judge import holdout_views, judge
from engine.backtest.scenarios import load_scenarios
from engine.backtest.summary import summarize
from engine.core.errors import DataError
from engine.triage import default_monitor_fn
from model.bundle import save_bundle
from model.data import load_nih_dataset
from model.labels import CHEXNET_LABELS
from rules.policy import load_policy, policy_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"
K = CHEXNET_LABELS.index("Effusion")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backtest")
    data = write_pattern_dataset(tmp / "ds", n=320)
    dataset = load_nih_dataset(data)
    good = pattern_bundle(dataset)
    save_bundle(good, tmp / "good.safetensors")
    drifted = good.copy()
    with torch.no_grad():
        drifted.model.classifier.bias[K] += 2.5
    save_bundle(drifted, tmp / "drifted.safetensors")
    return tmp, data, dataset, good, drifted


EXPECT_DRIFT = [{"kind": "calibration_drift", "labels": ["Effusion"]}]


def _judge(before, after, dataset, policy, expected=EXPECT_DRIFT, treated=("Effusion",), fault_kind="scanner_shift"):
    bv = holdout_views(before, before, None, dataset, dataset)
    av = holdout_views(after, before, bv, dataset, dataset)
    facts = default_monitor_fn(policy)(before, bv.faulted)
    return judge(before=before, after=after, fault_kind=fault_kind, expected=expected, audit_facts=facts,
                 treated_labels=list(treated), before_views=bv, after_views=av, policy=policy, n_boot=300)


def test_a_fixed_drift_is_detected_and_healed(world) -> None:
    _, _, dataset, good, drifted = world
    v = _judge(drifted, good, dataset, load_policy(DEFAULT))
    assert v["detected"] and "calibration_drift:Effusion" in v["fault_facts_on_holdout"]["before"]
    assert v["fault_facts_on_holdout"]["after"] == []
    assert v["healed"] is True and v["harmed"] is False, (v["heal_reason"], v["harm_reasons"])


def test_a_scrambled_head_is_harm_and_not_a_heal(world) -> None:
    _, _, dataset, _, drifted = world
    scrambled = drifted.copy()
    with torch.no_grad():
        scrambled.model.classifier.weight[K] *= -1  # ranks Effusion backwards
    v = _judge(drifted, scrambled, dataset, load_policy(DEFAULT))
    assert v["harmed"] is True and any("Effusion AUROC" in r for r in v["harm_reasons"])
    assert v["healed"] is False


def test_an_unchanged_model_is_neither_healed_nor_harmed(world) -> None:
    _, _, dataset, _, drifted = world
    v = _judge(drifted, drifted, dataset, load_policy(DEFAULT))
    assert (v["changed"], v["healed"], v["harmed"]) == (False, False, False)
    assert v["heal_reason"] == "the model did not change"


@pytest.fixture(scope="module")
def backtest_run(world):
    """The drifted model backtested on clean controls and a label-noise fault: a lenient site policy, the same
    needing approval for everything, and the three baselines."""
    tmp, data, _, _, _ = world
    # The planted +2.5 drift flags almost every image, so its fix gives true positives back: a site
    # policy that allows it (the shipped default's max_tp_lost 0 refuses the fix, see test_acceptance).
    lenient = yaml.safe_load(DEFAULT.read_text())
    lenient["name"] = "lenient"
    lenient["acceptance"]["max_tp_lost"] = 1000
    manual = {**lenient, "name": "manual", "approval": {"auto_max_cost": 0}}  # every treatment waits for a human
    policies = [policy_from_dict(lenient, "lenient.yaml"), policy_from_dict(manual, "manual.yaml")]
    scenarios = scenarios_from_flags(tmp / "drifted.safetensors", data, "all", ["label_noise:0.05"], 1)
    who = contenders(policies, ["no_action", "always_threshold", "always_retrain"])
    out = tmp / "bt"
    results = run_backtest(scenarios, who, out, n_boot=200)
    return out, scenarios, who, results


def _by(results, contender, kind):
    return [r for r in results if r["contender"] == contender and r["scenario"]["fault_kind"] == kind]


def test_backtest_runs_every_contender_and_writes_its_report(backtest_run) -> None:
    out, scenarios, who, results = backtest_run
    assert len(results) == len(scenarios) * len(who) == 2 * 5
    doc = build_document(scenarios, who, results)
    json_path, html_path = write_document(out, doc)
    loaded = json.loads(json_path.read_text())
    assert set(loaded["summary"]["by_fault"]) == {"label_noise", "clean"}
    assert "Wilson" in html_path.read_text() and "decision.json" in html_path.read_text()
    for r in results:
        if r["decision"]:
            assert (out / r["decision"]).is_file()


def test_the_drifted_model_is_treated_even_on_a_clean_control(backtest_run) -> None:
    """The planted model drift is real on clean data too: the policy fixes it (a change on a
    clean control counts as a treatment there, which is why clean controls use an unbroken model in the bench)."""
    _, _, _, results = backtest_run
    (clean,) = _by(results, "lenient", "clean")
    assert clean["changed"] and any(t["label"] == "Effusion" and t["outcome"] == "treated" for t in clean["treatments"])
    assert summarize(results)["by_fault"]["clean"]["lenient"]["false_treatment"]["k"] == 1


def test_an_escalation_is_reported_and_rerun_approved(backtest_run) -> None:
    _, _, _, results = backtest_run
    (manual,) = _by(results, "manual", "clean")
    assert manual["escalated"] and not manual["changed"] and manual["waits_for"]
    assert manual["status"] == "escalated" and _by(results, "lenient", "clean")[0]["status"] == "accepted"
    approved = manual["approved"]
    assert approved["approve"] == manual["waits_for"] and approved["changed"]
    assert summarize(results)["approved"]["clean"]["manual"]["changed"]["k"] == 1


def test_baselines_change_without_verification_and_no_action_never_does(backtest_run) -> None:
    _, _, _, results = backtest_run
    assert all(not r["changed"] for r in results if r["contender"] == "no_action")
    assert all(r["changed"] for r in results if r["contender"] == "always_threshold")


def test_a_killed_backtest_resumes_without_rerunning(backtest_run, monkeypatch: pytest.MonkeyPatch) -> None:
    out, scenarios, who, results = backtest_run
    done = sorted((out / "results").glob("*.json"))
    victim = done[-1]
    kept = victim.read_bytes()
    victim.unlink()  # as if killed before the last verdict was written
    calls = []
    real = runner._run_one

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_one", counting)
    again = run_backtest(scenarios, who, out, n_boot=200)
    assert len(calls) == 1
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_time_s", "approved")} for r in rs]
    assert strip(again) == strip(results)  # deterministic under the seeds (wall times aside)
    assert json.loads(victim.read_bytes())["contender"] == json.loads(kept)["contender"]


def test_scenarios_yaml_errors_name_the_key(tmp_path: Path, world) -> None:
    _, data, _, _, _ = world
    bad = tmp_path / "s.yaml"
    bad.write_text(f"scenarios:\n  - model: {tmp_path / 'm.safetensors'}\n    data: {data}\n    faults: [blurr]\n")
    with pytest.raises(Exception, match="blurr"):
        load_scenarios(bad)
    missing = tmp_path / "t.yaml"
    missing.write_text(f"scenarios:\n  - model: nope.safetensors\n    data: {data}\n    faults: [blur]\n")
    with pytest.raises(DataError, match="model .*nope.safetensors does not exist"):
        load_scenarios(missing)


def test_cli_backtest_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main

    with pytest.raises(SystemExit):
        main(["backtest", "--help"])
    out = capsys.readouterr().out
    assert "HOLDOUT" in out and "always_threshold" in out and "resumes" in out
    assert main(["backtest", "--policy", str(DEFAULT), "--out", "x"]) == 2


def test_a_scenario_that_cannot_run_is_reported_and_the_others_go_on(world) -> None:
    tmp, data, _, _, _ = world
    scenarios = scenarios_from_flags(tmp / "good.safetensors", data, "all", ["prevalence:Pneumothorax=1"], 1)
    who = contenders([load_policy(DEFAULT)], ["no_action"])
    results = run_backtest(scenarios, who, tmp / "bt_err", n_boot=100)
    summary = summarize(results)
    errors = summary["errors"]
    assert [e["contender"] for e in errors] == ["default", "no_action"]
    assert all("would remove every row" in e["error"] and e["scenario"].endswith("prevalence:Pneumothorax=1:s0")
               for e in errors)
    assert summary["by_fault"]["clean"]["no_action"]["n"] == 1  # the clean control still ran
    assert not list((tmp / "bt_err" / "results").glob("*prevalence*"))  # nothing saved: a re-run tries again
