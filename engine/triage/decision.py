"""What a triage run decided: the ``decision.json`` document, the run's outcome and exit code.

``decision.json`` is byte-identical for the same model, data, policy, seed and approvals: it holds
no times (those go to the audit store), and every list in it has a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.audit import to_jsonable
from engine.core.errors import EXIT_NEEDS_APPROVAL, EXIT_UNTREATED
from engine.core.facts import IssueFact
from engine.core.storage import canonical_json, sha256_bytes
from engine.triage.state import TriageRun
from model.bundle import TOOL_VERSION, Bundle
from rules.policy import Policy

__all__ = [
    "EXIT_UNTREATED",
    "DECISION_FILE",
    "MODEL_FILE",
    "DECISION_FORMAT",
    "UNTREATED_OUTCOMES",
    "TriageOutcome",
    "run_id_for",
    "policy_ident",
    "fact_json",
    "candidate_json",
    "candidates_sorted",
    "run_outcome",
    "decision_document",
]

DECISION_FILE = "decision.json"
MODEL_FILE = "model.safetensors"
DECISION_FORMAT = "cxr-triage-decision"

#: A fact's outcomes that leave it untreated (the run exits with :data:`EXIT_UNTREATED`).
UNTREATED_OUTCOMES = ("exhausted", "no_candidate", "budget_exhausted")


@dataclass
class TriageOutcome:
    """What a run decided and produced. ``decision`` is exactly what ``decision.json`` holds."""

    run_id: str
    outcome: str
    exit_code: int
    decision: dict[str, Any]
    bundle: Bundle
    model_hash_before: str
    model_hash_after: str
    decision_path: Path
    model_path: Path | None
    facts: list[IssueFact] = field(default_factory=list)
    remaining: list[IssueFact] = field(default_factory=list)
    wall_time_s: float = 0.0


def run_id_for(model_hash: str, manifest_hash: str, policy_hash: str, seed: int, approve: Iterable[str],
               dry_run: bool, reports: Sequence[dict[str, Any]] = (), policy_monitors: bool = True) -> str:
    """Deterministic run id: the same inputs name the same run (16 hex digits). Reports (and a run of the
    reports alone, ``correct``) are part of the inputs; a run without them keeps its id."""
    ident: dict[str, Any] = {"model": model_hash, "data": manifest_hash, "policy": policy_hash, "seed": int(seed),
                             "approve": sorted(set(approve)), "dry_run": bool(dry_run)}
    if reports:
        ident["reports"] = list(reports)
    if not policy_monitors:
        ident["policy_monitors"] = False
    return sha256_bytes(canonical_json(ident))[:16]


def policy_ident(policy: Policy) -> dict[str, str]:
    """Which plan the run was decided under: the policy's name and content hash."""
    return {"name": policy.name, "content_hash": policy.content_hash}


def fact_json(fact: IssueFact) -> dict[str, Any]:
    return to_jsonable({**fact.model_dump(mode="json"), "fact_id": fact.fact_id})


def candidate_json(candidate: Any) -> dict[str, Any] | None:
    return None if candidate is None else to_jsonable(candidate)


def candidates_sorted(candidates: Iterable[Any]) -> list[dict[str, Any]]:
    """The rules' candidates as JSON, cheapest first (then expected time, name, rule)."""
    rows = [candidate_json(c) for c in candidates]
    return sorted(rows, key=lambda c: (float(c.get("cost") or 0.0), float(c.get("expected_time_s") or 0.0),
                                       str(c.get("intervention")), str(c.get("rule")), canonical_json(c)))


def run_outcome(fact_outcomes: Sequence[str], any_actionable: bool, dry_run: bool) -> tuple[str, int]:
    """The run's outcome and exit code from its facts' outcomes (untreated beats needs_approval)."""
    if any(o in UNTREATED_OUTCOMES for o in fact_outcomes):
        return "untreated", EXIT_UNTREATED
    if "needs_approval" in fact_outcomes:
        return "needs_approval", EXIT_NEEDS_APPROVAL
    if not any_actionable:
        return "healthy", 0
    if dry_run:
        return "planned", 0
    return "treated", 0


def decision_document(run: TriageRun, *, facts: Sequence[IssueFact], treatments: list[dict[str, Any]],
                      remaining: Sequence[IssueFact], model_hash_after: str, model_file: str | None,
                      outcome: str, exit_code: int) -> dict[str, Any]:
    """The content of ``decision.json`` (plain JSON data)."""
    decision = {
        "format": DECISION_FORMAT,
        "format_version": 1,
        "tool_version": TOOL_VERSION,
        "run_id": run.run_id,
        "policy": policy_ident(run.policy),
        "model": {"before": run.model_hash, "after": model_hash_after, "changed": model_hash_after != run.model_hash,
                  "parent": run.parent_hash, "file": model_file},
        "data": {"manifest_hash": run.manifest_hash, "split": run.dataset.split, "n_images": len(run.dataset),
                 "skipped": len(run.dataset.skipped), **run.split_info},
        "seed": run.seed,
        "approve": list(run.approve),
        "dry_run": run.dry_run,
        "facts": [fact_json(f) for f in facts],
        "treatments": treatments,
        "remaining_facts": [fact_json(f) for f in remaining],
        "budget": run.budget.to_json(),
        "outcome": outcome,
        "exit_code": exit_code,
    }
    if run.reports:  # triage --reports, correct: the reports as given (each fact carries its own)
        decision["reports"] = list(run.reports)
        decision["policy_monitors"] = run.policy_monitors
    return to_jsonable(decision)
