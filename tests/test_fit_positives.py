"""``partial_retrain`` is proposed on the positives the plugin will learn from: the fit split's.

The whole audit set can hold ``min_positives`` positives of a label while the fit half holds fewer;
the rules must then not choose a retraining that the plugin refuses as "not applicable".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import pattern_bundle, write_pattern_dataset

from engine.audit import AuditStore
from engine.core.facts import IssueFact
from engine.replay import replay_audit
from engine.triage import run_triage
from engine.triage.decision import fact_json
from model.data import load_nih_dataset
from model.labels import CHEXNET_LABELS
from rules.decide import decide
from rules.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEFAULT)


def _drop(positives: int = 22) -> IssueFact:
    return IssueFact(kind="auroc_drop", monitor="auroc_drop", label="Pneumothorax", severity="high",
                     message="test", measured={"positives": positives})


def _context(pos: int, neg: int = 400) -> dict:
    return {"fit_positives": {"Pneumothorax": pos}, "fit_negatives": {"Pneumothorax": neg}}


def _names(d) -> list[str]:
    return [c.intervention for c in d.candidates]


def test_too_few_fit_positives_block_the_retraining(policy) -> None:
    (d,) = decide([_drop(22)], policy, run_id="r", context=_context(8))
    assert "partial_retrain" not in _names(d) and d.chosen.intervention == "augmentation"
    assert "only 8 labelled positives, fewer than min_positives 10" in d.rationale
    assert "fit split" in d.rationale


def test_enough_fit_positives_still_retrain(policy) -> None:
    (d,) = decide([_drop(22)], policy, run_id="r", context=_context(12))
    assert d.chosen.intervention == "partial_retrain"
    assert "12 labelled positives" in d.chosen.reason and "fit split" in d.chosen.reason


def test_too_few_fit_negatives_block_it_as_the_plugin_does(policy) -> None:
    (d,) = decide([_drop(22)], policy, run_id="r", context=_context(12, neg=3))
    assert "partial_retrain" not in _names(d)
    assert "only 3 negative images" in d.rationale


def test_without_fit_counts_the_facts_count_is_used_and_said(policy) -> None:
    (d,) = decide([_drop(22)], policy, run_id="r", context={"has_compression_history": False})
    assert d.chosen.intervention == "partial_retrain"
    assert "22 labelled positives" in d.chosen.reason and "whole audit set" in d.chosen.reason


def test_triage_records_the_fit_counts_of_its_split(tmp_path: Path) -> None:
    dataset = load_nih_dataset(write_pattern_dataset(tmp_path / "ds"))
    with AuditStore(tmp_path / "audit.db") as audit:
        out = run_triage(pattern_bundle(dataset), dataset, load_policy(DEFAULT), seed=0, out_dir=tmp_path / "run",
                         audit=audit, dry_run=True)
        (rec,) = [r.payload for r in audit.records(out.run_id) if r.kind == "facts"]
    fit = out.decision["data"]["fit"]["n_images"]
    pos, neg = rec["context"]["fit_positives"], rec["context"]["fit_negatives"]
    assert set(pos) == set(CHEXNET_LABELS)
    assert all(pos[k] + neg[k] == fit for k in CHEXNET_LABELS)
    assert sum(pos.values()) > 0


def test_replay_of_a_store_without_fit_counts_says_so(tmp_path: Path, policy) -> None:
    fact = _drop(22)
    with AuditStore(tmp_path / "old.db", tool_version="test") as store:
        store.append("r", "run_started", {"policy": {"name": "old"}, "parent_hash": None})
        store.append("r", "facts", {"facts": [fact_json(fact)],
                                    "context": {"has_compression_history": False, "has_parent": False}})
    with AuditStore(tmp_path / "old.db", create=False) as store:
        (run,) = replay_audit(store, policy).runs
    assert any("fit_positives is not recorded" in n for n in run.context_notes)
    assert run.facts[0].under_p2.chosen.intervention == "partial_retrain"  # the fact's 22, as decided then
