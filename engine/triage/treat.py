"""One fact's treatment: decide → apply to a copy → verify → accept, or escalate to the next candidate.

The rules choose the cheapest candidate; unless the budget is spent, the candidate needs a human's
approval or the run is a dry run, it is applied to a copy of the current model (learning only from
the FIT split) and verified on the patient-disjoint VERIFY split. An accepted copy becomes the
current model; a rejected one (or one that failed to apply) is excluded and the rules are asked
again. Every attempt is one record in the fact's ``attempts`` and in the audit trail.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.audit import to_jsonable
from engine.core.errors import DataError, InterventionError, PolicyError
from engine.core.facts import IssueFact
from engine.core.storage import atomic_write_bytes, canonical_json, sha256_bytes
from engine.triage.correction import ReportedViews, reported_images
from engine.triage.decision import candidate_json, candidates_sorted
from engine.triage.state import TriageRun, reorder_like
from engine.triage.verify import Acceptance, VerifyResult, treated_features, verify_treatment
from interventions.attribution import head_logits, truth_index
from interventions.base import InterventionResult, TreatmentContext
from interventions.registry import get_intervention
from model.bundle import save_bundle
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from rules.decide import Candidate, Decision
from rules.policy import Policy

__all__ = ["SCORES_DIR", "acceptance_from_policy", "treat_fact"]

#: Per-attempt verify-split scores, under the run folder (for the report's ROC curves).
SCORES_DIR = "verify_scores"


def acceptance_from_policy(policy: Policy, label: str | None) -> Acceptance:
    """The verify-split limits for ``label``: ``policy.acceptance_for(label)``, the label's sensitivity
    target (``params.threshold``: ``method: fixed_sensitivity``, ``target``) and the monitors' floor of
    positives for comparisons (``min_comparison_positives``)."""
    threshold = policy.params_for("threshold", label)
    target = threshold.get("target") if threshold.get("method") == "fixed_sensitivity" else None
    return Acceptance(**policy.acceptance_for(label).model_dump(),
                      sensitivity_target=None if target is None else float(target),
                      min_positives=int(policy.monitors.for_label(label).min_comparison_positives))


@dataclass
class _Escalation:
    """One fact's way through its candidates: what was tried, and how it ended."""

    fact: IssueFact
    acceptance: Acceptance
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    attempt_no: int = 0
    tried: int = 0  # interventions actually run for this issue (the per-issue budget)
    verified: int = 0  # candidates judged on the verify split (the Bonferroni count)
    outcome: str = "no_candidate"
    chosen: str | None = None


def treat_fact(run: TriageRun, fact: IssueFact, decision: Decision | None) -> dict[str, Any]:
    """Escalate through the candidates for one fact; on acceptance the treated copy becomes ``run.current``.

    ``decision`` is the rules' first answer for the fact (None: ask them). Returns the fact's entry
    of ``decision.json``'s ``treatments``.
    """
    esc = _Escalation(fact, acceptance_from_policy(run.policy, fact.label))
    while True:
        esc.attempt_no += 1
        if decision is None:
            found = run.decide_fn([fact], run.policy, run_id=run.run_id, context=run.context,
                                  exclude={fact.fact_id: set(esc.excluded)})
            decision = found[0] if found else None
        record = _decision_record(run, esc, decision)
        chosen = decision.chosen if decision is not None else None
        if chosen is None:
            esc.outcome = record["result"] = "exhausted" if esc.excluded else "no_candidate"
            esc.attempts.append(record)
            break
        stop = _stop_before_applying(run, esc, record, chosen)
        if stop is not None:
            esc.outcome = record["result"] = stop
            esc.attempts.append(record)
            if stop == "needs_approval":
                run.log("outcome", {"fact_id": fact.fact_id, "attempt": esc.attempt_no,
                                    "intervention": str(chosen.intervention), "outcome": "needs_approval"})
            break
        if _attempt(run, esc, record, str(chosen.intervention), float(chosen.cost)):
            break
        decision = None  # rejected or failed: ask the rules again without it
    return _treatment_entry(run, esc)


def _decision_record(run: TriageRun, esc: _Escalation, decision: Decision | None) -> dict[str, Any]:
    """The attempt's record as far as the rules' answer goes (logged as ``decision``)."""
    record: dict[str, Any] = {
        "attempt": esc.attempt_no,
        "excluded": sorted(esc.excluded),
        "candidates": candidates_sorted(decision.candidates or () if decision is not None else ()),
        "chosen": candidate_json(decision.chosen if decision is not None else None),
        "rationale": str(decision.rationale if decision is not None else "no decision returned by the rules"),
    }
    run.log("decision", {"fact_id": esc.fact.fact_id, **record})
    return record


def _stop_before_applying(run: TriageRun, esc: _Escalation, record: dict[str, Any], chosen: Candidate) -> str | None:
    """Why ``chosen`` is not applied (the fact's outcome), or None to apply it; notes the why in ``record``."""
    name, cost = str(chosen.intervention), float(chosen.cost)
    if name in esc.excluded:  # the rules ignored ``exclude``; never retry a rejected treatment
        record["error"] = f"the rules chose the excluded intervention {name!r} again"
        return "exhausted"
    budget = run.budget
    if not budget.allows(esc.tried, cost):
        record["budget"] = {"attempts_on_issue": esc.tried, "max_attempts_per_issue": budget.max_attempts_per_issue,
                            "cost_spent": budget.cost_spent, "max_total_cost": budget.max_total_cost,
                            "next_cost": cost}
        return "budget_exhausted"
    needs = bool(chosen.needs_approval)
    record["approval"] = {"required": needs, "granted": needs and name in run.approve}
    if needs and name not in run.approve:
        record["plan"] = {"intervention": name, "params": to_jsonable(run.policy.params_for(name, esc.fact.label)),
                          "cost": cost, "approve_with": f"--approve {name}"}
        return "needs_approval"
    if run.dry_run:
        record["plan"] = {"intervention": name, "params": to_jsonable(run.policy.params_for(name, esc.fact.label)),
                          "cost": cost}
        return "planned"
    if needs:
        run.log("approval", {"fact_id": esc.fact.fact_id, "attempt": esc.attempt_no, "intervention": name,
                             "approved_by": "--approve", "cost": cost})
    return None


def _attempt(run: TriageRun, esc: _Escalation, record: dict[str, Any], name: str, cost: float) -> bool:
    """Apply ``name`` to a copy, verify it, accept it (True) or reject it and exclude it (False)."""
    fact = esc.fact
    params = run.policy.params_for(name, fact.label)
    record["params"] = to_jsonable(params)
    ok, result, error = _apply_to_copy(run, name, fact, params)
    run.budget.charge(cost)
    esc.tried += 1
    if not ok:
        record["error"] = error
        run.log("intervention_applied", {"fact_id": fact.fact_id, "attempt": esc.attempt_no, "intervention": name,
                                         "status": "error", "error": error, "params": params,
                                         "model_hash_before": run.current.hash})
        return _give_up_on(esc, record, name, "error")
    assert result is not None
    run.log.walls[f"{fact.fact_id}/{esc.attempt_no}/{name}"] = result.wall_time_s
    record["changes"] = to_jsonable(result.changes)
    record["fit_metrics"] = to_jsonable(result.fit_metrics)
    record["classifier_only"] = bool(result.classifier_only)
    candidate_hash = result.bundle.content_hash()
    run.log("intervention_applied", {
        "fact_id": fact.fact_id, "attempt": esc.attempt_no, "intervention": name, "status": "ok", "params": params,
        "changes": result.changes, "fit_metrics": result.fit_metrics, "wall_time_s": result.wall_time_s,
        "classifier_only": result.classifier_only, "model_hash_before": run.current.hash,
        "model_hash_candidate": candidate_hash,
    })
    vr = _verify(run, esc, record, name, result, candidate_hash)
    if vr is None:  # the treated model could not produce the verify split's rows
        return _give_up_on(esc, record, name, "error")
    if vr.passed:
        record["result"] = "accepted"
        esc.attempts.append(record)
        _accept(run, result, candidate_hash)
        esc.outcome, esc.chosen = "treated", name
        run.log("outcome", {"fact_id": fact.fact_id, "attempt": esc.attempt_no, "intervention": name,
                            "outcome": "accepted", "model_hash_after": run.current.hash})
        return True
    failed = [c["name"] for c in vr.checks if not c["passed"]]
    if fact.kind == "reported_fp":
        _keep_candidate(run, esc, record, name, result)
    _give_up_on(esc, record, name, "rejected")
    run.log("outcome", {"fact_id": fact.fact_id, "attempt": esc.attempt_no, "intervention": name,
                        "outcome": "rejected", "failed_checks": failed, "rolled_back_to": run.current.hash})
    return False


def _keep_candidate(run: TriageRun, esc: _Escalation, record: dict[str, Any], name: str,
                    result: InterventionResult) -> None:
    """A rejected correction of a reader's report stays on disk for review (``candidates/``), never deployed."""
    path = run.out_dir / "candidates" / f"{esc.fact.fact_id}-{esc.attempt_no}-{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    record["candidate_file"] = {"path": str(path.relative_to(run.out_dir)), "sha256": save_bundle(result.bundle, path),
                                "deployed": False}


def _give_up_on(esc: _Escalation, record: dict[str, Any], name: str, result: str) -> bool:
    """Close the attempt as ``result`` and exclude ``name`` from the next decision; False (not accepted)."""
    record["result"] = result
    esc.attempts.append(record)
    esc.excluded.append(name)
    return False


def _verify(run: TriageRun, esc: _Escalation, record: dict[str, Any], name: str, result: InterventionResult,
            candidate_hash: str) -> VerifyResult | None:
    """Judge the treated copy on the held-out verify split; the verdict goes into ``record`` and the audit.

    None (the reason in ``record["error"]``) when the treated model cannot produce the verify split's rows.
    """
    fact, acceptance = esc.fact, esc.acceptance
    t = time.perf_counter()
    v_before, facts_before = run.verify_view()
    try:
        v_after = treated_features(result.bundle, result.classifier_only, v_before, run.verify_ds,
                                   use_cache=False, progress=run.stages("verify_features"))
    except InterventionError as exc:
        record["error"] = str(exc)
        return None
    esc.verified += 1
    vr = verify_treatment(fact=fact, intervention=name, before_bundle=run.current.bundle, after_bundle=result.bundle,
                          before=v_before, after=v_after, monitor_fn=run.monitor_fn, acceptance=acceptance,
                          parent=run.parent, parent_data=run.parent_verify, facts_before=facts_before,
                          seed=run.seed, candidate_k=esc.verified, cluster=_cluster_of(run, fact),
                          reported=_reported_views(run, fact, result))
    verify_wall = time.perf_counter() - t
    scores = _write_scores(run.out_dir, fact.fact_id, esc.attempt_no, v_before, v_after, result.bundle.labels)
    record["verify"] = to_jsonable({**vr.to_dict(), "scores": scores})
    record["acceptance"] = to_jsonable(acceptance)
    run.log("verification", {"fact_id": fact.fact_id, "attempt": esc.attempt_no, "intervention": name,
                             "passed": vr.passed, "checks": vr.checks, "before": vr.before, "after": vr.after,
                             "acceptance": acceptance, "scores": scores, "wall_time_s": verify_wall,
                             "model_hash_candidate": candidate_hash})
    return vr


def _reported_views(run: TriageRun, fact: IssueFact, result: InterventionResult) -> ReportedViews | None:
    """A ``reported_fp`` fact's images (from the whole audited set) and the fit split, before and after."""
    if fact.kind != "reported_fp":
        return None
    rows = reported_images(fact, run.current.data)
    rep_before, fit_before = run.current.data.subset(rows), run.current.data.subset(run.fit_idx)
    return ReportedViews(
        rep_before, treated_features(result.bundle, result.classifier_only, rep_before, run.dataset.subset(rows)),
        fit_before, treated_features(result.bundle, result.classifier_only, fit_before, run.fit_ds))


def _cluster_of(run: TriageRun, fact: IssueFact) -> IssueFact | None:
    """The run's FP-cluster fact on ``fact``'s label, when ``fact`` is another kind (a shortcut's symptom)."""
    if fact.kind == "fp_cluster" or fact.label is None:
        return None
    return next((f for f in run.facts if f.kind == "fp_cluster" and f.label == fact.label), None)


def _treatment_entry(run: TriageRun, esc: _Escalation) -> dict[str, Any]:
    """The fact's entry in ``decision.json``'s ``treatments`` (its final outcome is logged)."""
    fact = esc.fact
    rationale = _fact_rationale(esc.outcome, esc.attempts, esc.chosen)
    run.log("outcome", {"fact_id": fact.fact_id, "outcome": esc.outcome, "intervention": esc.chosen,
                        "rationale": rationale})
    return {"fact_id": fact.fact_id, "kind": fact.kind, "label": fact.label, "severity": fact.severity,
            "attempts": esc.attempts, "outcome": esc.outcome, "intervention": esc.chosen, "rationale": rationale}


def _write_scores(out_dir: Path, fact_id: str, attempt: int, before: FeatureSet, after: FeatureSet,
                  label_names: Sequence[str]) -> dict[str, str]:
    """Per-image verify-split labels and logits before/after, for ROC curves in the run report.

    Deterministic bytes (same run, same file); labels are given in the bundle's label order (zeros
    for an output without ground truth).
    """
    from safetensors.numpy import save

    truth = np.stack([before.labels[:, truth_index(n)] if n in CHEXNET_LABELS else np.zeros(len(before), np.uint8)
                      for n in label_names], axis=1)
    rel = f"{SCORES_DIR}/{fact_id}-{attempt}.safetensors"
    names = np.frombuffer(canonical_json(list(before.image_names)), dtype=np.uint8)
    # One metadata key only: safetensors writes a metadata map in no fixed order.
    data = save({"labels": truth.astype(np.uint8), "logits_before": before.logits.astype(np.float32),
                 "logits_after": after.logits.astype(np.float32), "image_names_json": names},
                metadata={"labels": canonical_json(list(label_names)).decode()})
    atomic_write_bytes(out_dir / rel, data)
    return {"file": rel, "sha256": sha256_bytes(data)}


def _apply_to_copy(run: TriageRun, name: str, fact: IssueFact,
                   params: dict[str, Any]) -> tuple[bool, InterventionResult | None, str | None]:
    """Run the plugin on the current model; ``(ok, result, error)``. The current model is never changed."""
    try:
        plugin = get_intervention(name)
    except InterventionError as exc:
        return False, None, str(exc)
    current = run.current
    # Interventions must treat a copy (the base class refuses a returned input). Rather than
    # deep-copying the whole model for every attempt, snapshot its tensors (a memcpy) and check
    # afterwards: a plugin that modified the current model anyway is rolled back and rejected.
    snapshot = {k: v.detach().clone() for k, v in current.bundle.model.state_dict().items()}
    meta_before = current.bundle.meta
    reported = current.data.subset(reported_images(fact, current.data)) if fact.kind == "reported_fp" else None
    ctx = TreatmentContext(bundle=current.bundle, fact=fact, fit=current.data.subset(run.fit_idx),
                           fit_dataset=run.fit_ds, params=params, seed=run.seed, parent=run.parent,
                           progress=run.stages(f"apply {name}"), reported=reported)
    ok, why = plugin.applicable(ctx)
    if not ok:
        outcome: tuple[bool, InterventionResult | None, str | None] = (False, None, f"not applicable: {why}")
    else:
        try:
            outcome = (True, plugin.apply(ctx), None)
        except (InterventionError, PolicyError, DataError) as exc:
            outcome = (False, None, f"{type(exc).__name__}: {exc}")
    state = current.bundle.model.state_dict()
    if current.bundle.meta is not meta_before or set(state) != set(snapshot) or any(
            not torch.equal(state[k], v) for k, v in snapshot.items()):
        current.bundle.model.load_state_dict(snapshot)
        current.bundle.meta = meta_before
        return False, None, (f"InterventionError: {name} modified the model it was given instead of a copy; "
                             "the change was rolled back (a plugin bug)")
    return outcome


def _accept(run: TriageRun, result: InterventionResult, new_hash: str) -> None:
    """Make the treated copy current and bring the whole-set view up to date."""
    current = run.current
    new = result.bundle
    new_wh = new.weights_hash()
    if new_wh == current.data.weights_hash:
        data = current.data
    elif result.classifier_only:
        data = dataclasses.replace(current.data.with_logits(head_logits(new, current.data.features)),
                                   weights_hash=new_wh)
    else:
        data = reorder_like(extract_features(new, run.dataset, progress=run.stages("features (treated)")),
                            current.data.image_names, "treated model")
    current.bundle, current.data, current.hash = new, data, new_hash
    current.version += 1


def _fact_rationale(outcome: str, attempts: list[dict[str, Any]], chosen: str | None) -> str:
    tried = [a for a in attempts if a.get("result") in ("rejected", "error")]
    history = "; ".join(
        f"{a['chosen']['intervention']} {a['result']}"
        + (f" ({', '.join(c['name'] for c in a['verify']['checks'] if not c['passed'])} failed)"
           if a.get("result") == "rejected" else "")
        + (f" ({a.get('error')})" if a.get("result") == "error" else "")
        for a in tried
    )
    prefix = f"tried first: {history}. " if history else ""
    if outcome == "treated":
        return f"{prefix}{chosen} passed every verification check on the held-out verify split and was accepted."
    if outcome == "needs_approval":
        plan = attempts[-1]["plan"]
        return (f"{prefix}next candidate {plan['intervention']} (cost {plan['cost']:g}) exceeds the automatic "
                f"approval ceiling; not applied — rerun with {plan['approve_with']} to allow it.")
    if outcome == "planned":
        plan = attempts[-1]["plan"]
        return f"dry run: would apply {plan['intervention']} (cost {plan['cost']:g}); nothing applied."
    if outcome == "exhausted":
        return f"{prefix}no candidate left; the issue remains untreated."
    if outcome == "budget_exhausted":
        return f"{prefix}the run's budget is spent; the issue remains untreated."
    return f"the rules propose no applicable intervention: {attempts[-1]['rationale'] if attempts else ''}"
