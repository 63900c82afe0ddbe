"""``OUT/backtest.json`` and ``OUT/backtest.html``: the verdicts, their rates, the targets, the definitions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.backtest.runner import Contender
from engine.backtest.scenarios import Scenario
from engine.backtest.summary import check_targets, summarize
from engine.core.storage import atomic_write_json, atomic_write_text
from engine.reports.backtest_report import render_backtest_report
from model.bundle import TOOL_VERSION

__all__ = ["BACKTEST_FILE", "DEFINITIONS", "REPORT_FILE", "build_document", "write_document"]

BACKTEST_FILE = "backtest.json"
REPORT_FILE = "backtest.html"

#: What each reported word means (engine/backtest/judge.py implements them).
DEFINITIONS = {
    "detected": "a fact on the audit part whose kind and label match the fault's ground truth (fault.json)",
    "changed": "the triage (or baseline) changed the model: weights or thresholds",
    "escalated": "the run ended waiting for a human (exit 3) or with issues untreated (exit 4)",
    "healed": "changed, every ground-truth fact the policy's monitors raise on the faulted holdout under the "
              "untreated model is gone, and on the clean holdout no label's AUROC is worse beyond tolerance and "
              "noise (for shortcut, label-noise and prevalence faults also the treated labels' Youden J)",
    "harmed": "changed, and on the holdout some label's AUROC fell by more than max_other_auroc_change with its "
              "paired-bootstrap 95 % interval below zero, or a treated label's Youden J fell with the interval below "
              "zero, or its sensitivity fell beyond noise below the policy's sensitivity target for it",
    "false treatment": "a model change on a clean control (no fault injected)",
    "intervals": "rates: 95 % Wilson; changes: paired percentile bootstrap over the holdout images",
    "baselines": "no_action; always_threshold (Youden J on the whole audit part, every label); always_retrain "
                 "(classifier rows and thresholds of every label with enough positives, on the whole audit part); "
                 "judged with the first policy's monitors and tolerances",
}


def build_document(scenarios: Sequence[Scenario], who: Sequence[Contender],
                   results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary = summarize(results, [c.name for c in who])
    policies = [c.name for c in who if c.baseline is None]
    return {
        "format": "cxr-triage-backtest", "format_version": 1, "tool_version": TOOL_VERSION,
        "definitions": DEFINITIONS,
        "scenarios": [s.to_dict() for s in scenarios],
        "contenders": [{"name": c.name, "policy": c.policy.name, "policy_hash": c.policy.content_hash,
                        "baseline": c.baseline} for c in who],
        "summary": summary,
        "targets": check_targets(summary, policies),
        "results": list(results),
    }


def write_document(out: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    """Both files, atomically; returns their paths."""
    return (atomic_write_json(out / BACKTEST_FILE, doc),
            atomic_write_text(out / REPORT_FILE, render_backtest_report(doc)))
