"""``cli.py policy replay``: recorded runs re-decided under another policy, from the audit record alone.

The audit store is written by real triages (real monitors, the durable-rules policy, the threshold
and classifier-retraining plugins) of a tiny DenseNet whose Effusion logits drifted; the replay
then reads nothing but that store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PATTERN_LABELS, pattern_bundle, write_pattern_dataset

from cli import main
from engine.audit import AuditStore
from engine.core.facts import IssueFact
from engine.replay import ReplayError, replay_audit
from engine.triage import run_triage
from engine.triage.decision import fact_json
from model.data import load_nih_dataset
from model.labels import CHEXNET_LABELS
from rules.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"
CHEAP = ROOT / "policies" / "cheap_retraining.yaml"
LABELS = PATTERN_LABELS
K = CHEXNET_LABELS.index("Effusion")


def _drifted_bundle(dataset):
    """The pattern model (tests/conftest.py) with Effusion's logits shifted by +2.5."""
    drifted = pattern_bundle(dataset).copy()
    with torch.no_grad():
        drifted.model.classifier.bias[K] += 2.5
    return drifted


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An audit store with two real triage runs under the default policy (seeds 0 and 1)."""
    tmp = tmp_path_factory.mktemp("replay")
    dataset = load_nih_dataset(write_pattern_dataset(tmp / "ds"))
    bundle = _drifted_bundle(dataset)
    policy = load_policy(DEFAULT)
    db = tmp / "audit.db"
    run_ids = []
    with AuditStore(db) as audit:
        for seed in (0, 1):
            result = run_triage(bundle, dataset, policy, seed=seed, out_dir=tmp / f"run{seed}", audit=audit)
            run_ids.append(result.run_id)
    return db, run_ids


def _first_decisions(db: Path) -> dict[tuple[str, str], dict]:
    with AuditStore(db, create=False) as store:
        return {(r.run_id, r.payload["fact_id"]): r.payload for r in store.records()
                if r.kind == "decision" and r.payload["attempt"] == 1}


def test_the_recorded_runs_threshold_the_drift(recorded: tuple[Path, list[str]]) -> None:
    db, run_ids = recorded
    chosen = {k: p["chosen"]["intervention"] for k, p in _first_decisions(db).items()}
    assert {run for run, _ in chosen} == set(run_ids)
    assert "threshold" in chosen.values()


def test_replay_under_the_same_policy_is_identical(recorded: tuple[Path, list[str]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db, run_ids = recorded
    with AuditStore(db, create=False) as store:
        result = replay_audit(store, load_policy(DEFAULT))
    assert [r.run_id for r in result.runs] == run_ids and not result.skipped
    facts = [f for r in result.runs for f in r.facts]
    assert facts and all(f.status == "identical" for f in facts)
    assert all(r.same_policy for r in result.runs)
    # The context the rules read is recorded with the facts: replay takes it as it was, with no notes.
    for r in result.runs:
        assert {k: r.context[k] for k in ("has_compression_history", "has_parent")} == {
            "has_compression_history": False, "has_parent": False}
        # the fit split's per-label counts, which partial_retrain's condition reads
        assert set(r.context["fit_positives"]) == set(CHEXNET_LABELS) == set(r.context["fit_negatives"])
    assert all(not r.context_notes for r in result.runs)
    assert main(["policy", "replay", "--audit", str(db), "--policy", str(DEFAULT)]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "CHANGED" not in out
    assert f"{len(facts)} decision(s): {len(facts)} identical" in " ".join(out.split())


def test_a_cheaper_retraining_changes_the_drift_decisions(recorded: tuple[Path, list[str]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    db, run_ids = recorded
    first = _first_decisions(db)
    with AuditStore(db, create=False) as store:
        result = replay_audit(store, load_policy(CHEAP), [run_ids[0]])
    (run,) = result.runs
    assert run.run_id == run_ids[0] and not run.same_policy and run.policy_then["name"] == "default"
    changed = [f for f in run.facts if f.status == "changed"]
    drift = [f for f in changed if f.kind == "calibration_drift" and f.label == "Effusion"]
    assert drift, [(f.kind, f.label, f.status) for f in run.facts]
    f = drift[0]
    # Then: what was recorded, candidates with their costs and rules; threshold at 1 chosen.
    assert f.then is not None and f.then.chosen is not None
    recorded_first = first[(run.run_id, f.fact_id)]
    assert f.then.chosen.intervention == recorded_first["chosen"]["intervention"] == "threshold"
    assert f.then.chosen.cost == 1 and f.then.chosen.rule == "propose:calibration_drift:threshold"
    assert [c.intervention for c in f.then.candidates] == [c["intervention"] for c in recorded_first["candidates"]]
    # Under cheap_retraining: classifier retraining at 1, threshold at 2.
    assert f.under_p2.chosen is not None and f.under_p2.chosen.intervention == "partial_retrain"
    assert f.under_p2.chosen.cost == 1 and f.under_p2.chosen.rule == "propose:calibration_drift:partial_retrain"
    costs = {c.intervention: c.cost for c in f.under_p2.candidates}
    assert costs["threshold"] == 2 and costs["partial_retrain"] == 1
    # What was done then, for context.
    assert f.attempts and f.attempts[0].intervention == "threshold" and f.outcome is not None

    assert main(["policy", "replay", "--audit", str(db), "--policy", str(CHEAP), "--run", run_ids[0][:8]]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "CHANGED" in out and ("changed: calibration_drift / Effusion: then threshold (cost 1, rule "
                                 "propose:calibration_drift:threshold); under cheap_retraining partial_retrain "
                                 "(cost 1, rule propose:calibration_drift:partial_retrain)") in out
    assert run_ids[1] not in out


def test_json_shape_and_determinism(recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    db, run_ids = recorded
    argv = ["policy", "replay", "--audit", str(db), "--policy", str(CHEAP), "--json"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == text
    doc = json.loads(text)
    assert doc["format"] == "cxr-triage-policy-replay" and doc["policy"]["name"] == "cheap_retraining"
    assert [r["run_id"] for r in doc["runs"]] == run_ids and doc["skipped"] == []
    assert set(doc["counts"]) == {"identical", "same_choice", "changed", "undetermined", "not_recorded"}
    assert doc["counts"]["changed"] >= 1
    fact = doc["runs"][0]["facts"][0]
    assert set(fact) == {"fact_id", "kind", "label", "severity", "status", "then", "done_then", "under_policy",
                         "alternative", "note"}
    assert set(fact["under_policy"]) == {"candidates", "chosen", "rationale"}
    assert set(fact["under_policy"]["chosen"]) == {"intervention", "cost", "rule", "needs_approval", "reason"}
    assert set(fact["done_then"]) == {"attempts", "outcome"}
    assert doc["runs"][0]["policy_then"]["name"] == "default"
    assert set(doc["runs"][0]["context"]) == {"has_compression_history", "has_parent", "fit_positives",
                                              "fit_negatives"}


def test_unknown_run_and_missing_audit_are_clear_errors(recorded: tuple[Path, list[str]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    db, _ = recorded
    assert main(["policy", "replay", "--audit", str(db), "--policy", str(CHEAP), "--run", "feedbeef"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "no run 'feedbeef'" in err and "Traceback" not in err
    missing = tmp_path / "nope.db"
    assert main(["policy", "replay", "--audit", str(missing), "--policy", str(CHEAP)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "audit store does not exist" in err and "nope.db" in err and not missing.exists()
    assert main(["policy", "replay", "--audit", str(db), "--policy", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml" in capsys.readouterr().err


def _fact() -> IssueFact:
    return IssueFact(kind="calibration_drift", monitor="calibration_drift", label="Effusion", severity="high",
                     message="drift", measured={"auroc_intact": True, "positives": 30})


def _hand_store(path: Path, runs: dict[str, list[dict] | None]) -> Path:
    """A store written by hand: per run id, its facts record (None: the run failed before monitoring)."""
    with AuditStore(path, tool_version="test") as store:
        for run_id, facts in runs.items():
            store.append(run_id, "run_started", {"policy": {"name": "default"}, "parent_hash": None})
            if facts is None:
                store.append(run_id, "run_finished", {"status": "error", "error": "DataError: bad image"})
            else:
                store.append(run_id, "facts", {"facts": facts})
    return path


def test_a_run_without_facts_is_skipped_or_refused_and_an_altered_fact_is_named(tmp_path: Path) -> None:
    fact = fact_json(_fact())
    policy = load_policy(DEFAULT)
    db = _hand_store(tmp_path / "hand.db", {"crashed": None, "ok": [fact]})
    with AuditStore(db, create=False) as store:
        result = replay_audit(store, policy)
        (run,) = result.runs
        (f,) = run.facts
        assert run.run_id == "ok" and f.status == "not_recorded" and f.then is None
        assert f.under_p2.chosen is not None and f.under_p2.chosen.intervention == "threshold"
        assert [s.run_id for s in result.skipped] == ["crashed"]
        assert "DataError: bad image" in result.skipped[0].reason
        with pytest.raises(ReplayError, match=r"run crashed: the run has no facts record .*DataError: bad image"):
            replay_audit(store, policy, ["crashed"])
    altered = _hand_store(tmp_path / "altered.db", {"altered": [{**fact, "message": "edited"}]})
    with AuditStore(altered, create=False) as store, pytest.raises(ReplayError, match=r"run altered: recorded "
                                                                                   r"fact 0 .*hashes to"):
        replay_audit(store, policy)
    assert main(["policy", "replay", "--audit", str(db), "--policy", str(DEFAULT), "--run", "crashed"]) == 1


def test_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["policy", "replay", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--policy P2" in out and "identical" in out and "undetermined" in out and "--run RUN" in out


def _compression_run(path: Path, rationale: str, reason: str) -> tuple[Path, str]:
    """A hand-written run: one compression_fidelity fact whose first decision chose full_retrain."""
    fact = IssueFact(kind="compression_fidelity", monitor="compression_fidelity", severity="high",
                     message="compressed model drifted from its parent")
    chosen = {"fact_id": fact.fact_id, "kind": fact.kind, "label": None, "intervention": "full_retrain",
              "cost": 10.0, "expected_time_s": 28800.0, "rule": "propose:compression_fidelity:full_retrain",
              "reason": reason, "needs_approval": True}
    with AuditStore(path, tool_version="test") as store:
        store.append("r", "run_started", {"policy": {"name": "old"}, "parent_hash": "ab" * 32})
        store.append("r", "facts", {"facts": [fact_json(fact)]})
        store.append("r", "decision", {"fact_id": fact.fact_id, "attempt": 1, "excluded": [], "candidates": [chosen],
                                       "chosen": chosen, "rationale": rationale})
    return path, fact.fact_id


def test_the_unrecorded_compression_history_is_recovered_or_reported_undetermined(tmp_path: Path) -> None:
    """Stores written before the loop recorded its context: recovered from the decisions where they prove it."""
    policy = load_policy(DEFAULT)  # offers f_reopt (cost 3) before full_retrain only with a compression history
    blocked = "Chose full_retrain ... Not proposed: f_reopt (the bundle has no compression history to re-optimise against)."
    db, _ = _compression_run(tmp_path / "proved.db", blocked, "no conditions")
    with AuditStore(db, create=False) as store:
        (run,) = replay_audit(store, policy).runs
    assert run.context == {"has_parent": True, "has_compression_history": False} and not run.context_notes
    assert run.facts[0].status == "identical" and run.facts[0].alternative is None

    db, _ = _compression_run(tmp_path / "unknown.db", "Chose full_retrain (the old policy allowed only it).",
                             "no conditions")
    with AuditStore(db, create=False) as store:
        (run,) = replay_audit(store, policy).runs
    (f,) = run.facts
    assert "has_compression_history" not in run.context and run.context_notes
    assert f.status == "undetermined" and f.note and "does not record" in f.note
    assert f.under_p2.chosen is not None and f.under_p2.chosen.intervention == "full_retrain"
    assert f.alternative is not None and f.alternative.chosen is not None
    assert f.alternative.chosen.intervention == "f_reopt"
