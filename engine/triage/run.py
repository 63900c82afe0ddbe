"""The verify-or-escalate decision loop: monitor → decide → apply to a copy → verify → accept or escalate.

One call of :func:`run_triage` is one auditable run:

1. features of the validation set are extracted once (cached per model and data);
2. the set is split patient-disjoint into a FIT half (what interventions may learn from) and a
   VERIFY half (what judges them);
3. the policy's monitors run on the whole set (the audit's view) and emit issue facts;
4. for each actionable fact, in a fixed order (severity, causes before symptoms, kind, label), the rules choose the cheapest
   candidate; it is applied to a copy of the current model, verified on the VERIFY half and
   accepted (the copy becomes the current model) or rejected, in which case the rules are asked
   again without it — until one is accepted, candidates run out, a candidate needs a human's
   approval, or the policy's budget is spent;
5. ``decision.json`` (byte-identical for the same model, data, policy, seed and approvals: no
   times in it) and, when anything changed, the treated bundle are written; every step is
   appended to the audit store with its wall times.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.audit import AuditStore, to_jsonable
from engine.core.errors import EXIT_NEEDS_APPROVAL, EXIT_UNTREATED, DataError, InterventionError, PolicyError
from engine.core.facts import IssueFact
from engine.core.storage import atomic_write_bytes, atomic_write_json, canonical_json, sha256_bytes, sha256_file
from engine.verify import (
    Acceptance,
    MonitorFn,
    classifier_logits,
    fact_key,
    treated_features,
    verify_treatment,
)
from interventions.base import InterventionResult, TreatmentContext, get_intervention
from model.bundle import TOOL_VERSION, Bundle, save_bundle
from model.data import NIHDataset, patient_disjoint_split
from model.features import FeatureSet, extract_features

__all__ = [
    "EXIT_UNTREATED",
    "SEVERITY_ORDER",
    "DECISION_FILE",
    "MODEL_FILE",
    "DecideFn",
    "StageProgress",
    "TriageOutcome",
    "run_id_for",
    "sort_facts",
    "acceptance_from_policy",
    "default_monitor_fn",
    "default_decide_fn",
    "run_triage",
]

SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")
DECISION_FILE = "decision.json"
MODEL_FILE = "model.safetensors"
DECISION_FORMAT = "cxr-triage-decision"

DecideFn = Callable[..., list[Any]]
#: ``progress(stage, done, total)``; stages: features, parent_features, monitor, triage, final_monitor.
StageProgress = Callable[[str, int, int], None]

_UNTREATED = ("exhausted", "no_candidate", "budget_exhausted")


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


# --------------------------------------------------------------------------------------------
# Identity and ordering


def run_id_for(model_hash: str, manifest_hash: str, policy_hash: str, seed: int, approve: Iterable[str],
               dry_run: bool) -> str:
    """Deterministic run id: the same inputs name the same run (16 hex digits)."""
    ident = {"model": model_hash, "data": manifest_hash, "policy": policy_hash, "seed": int(seed),
             "approve": sorted(set(approve)), "dry_run": bool(dry_run)}
    return sha256_bytes(canonical_json(ident))[:16]


#: Kinds that name a cause rather than a symptom. At equal severity they are treated first: a
#: shortcut's FP cluster also shows as calibration drift and an AUROC drop on the same label, and
#: treating the symptom first (e.g. retraining the head against the drift) hides the cause without
#: the treatment aimed at it; fixing the cause re-examines the symptoms ("resolved earlier").
CAUSE_KINDS = ("fp_cluster", "compression_fidelity")


def sort_facts(facts: Iterable[IssueFact]) -> list[IssueFact]:
    """Most severe first, causes before symptoms, then kind, label and monitor; the fact id breaks ties."""
    rank = {s: i for i, s in enumerate(SEVERITY_ORDER)}
    return sorted(facts, key=lambda f: (rank.get(f.severity, len(rank)), f.kind not in CAUSE_KINDS, f.kind,
                                        f.label or "", f.monitor, f.fact_id))


def _fact_json(fact: IssueFact) -> dict[str, Any]:
    return to_jsonable({**fact.model_dump(mode="json"), "fact_id": fact.fact_id})


def _candidate_json(candidate: Any) -> dict[str, Any] | None:
    return None if candidate is None else to_jsonable(candidate)


def _candidates_sorted(candidates: Iterable[Any]) -> list[dict[str, Any]]:
    rows = [_candidate_json(c) for c in candidates]
    return sorted(rows, key=lambda c: (float(c.get("cost") or 0.0), float(c.get("expected_time_s") or 0.0),
                                       str(c.get("intervention")), str(c.get("rule")), canonical_json(c)))


# --------------------------------------------------------------------------------------------
# The policy seam (rules/policy.py); small accessors so the loop states which keys it reads


def _policy_ident(policy: Any) -> dict[str, str]:
    return {"name": str(getattr(policy, "name", "?")), "content_hash": str(getattr(policy, "content_hash", "?"))}


def _first_attr(obj: Any, names: Sequence[str], default: Any = None) -> Any:
    for name in names:
        if obj is not None and getattr(obj, name, None) is not None:
            return getattr(obj, name)
        if isinstance(obj, dict) and obj.get(name) is not None:
            return obj[name]
    return default


def acceptance_from_policy(policy: Any, label: str | None) -> Acceptance:
    """The verify-split limits for ``label`` from ``policy.acceptance_for(label)``."""
    acc = policy.acceptance_for(label) if hasattr(policy, "acceptance_for") else None
    if acc is not None and hasattr(acc, "to_verify"):
        return acc.to_verify()
    base = Acceptance()
    return Acceptance(
        max_other_auroc_change=float(_first_attr(acc, ("max_other_auroc_change",), base.max_other_auroc_change)),
        max_tp_lost=int(_first_attr(acc, ("max_tp_lost",), base.max_tp_lost)),
        min_improvement=_first_attr(acc, ("min_improvement",), base.min_improvement),
        max_new_issues=int(_first_attr(acc, ("max_new_issues",), base.max_new_issues)),
    )


def _budget(policy: Any) -> tuple[int | None, float | None]:
    """(max attempts per issue, max total cost of the run) from ``policy.budget``; None: unlimited."""
    holder = getattr(policy, "budget", None)
    attempts = _first_attr(holder, ("max_attempts_per_issue",))
    cost = _first_attr(holder, ("max_total_cost",))
    return (None if attempts is None else int(attempts), None if cost is None else float(cost))


def _has_compression_history(bundle: Bundle) -> bool:
    """The bundle is a compressed model (pruned architecture or a compression step in its history)."""
    if bundle.meta.arch != "densenet":
        return True
    return any(any(word in str(h.get("op", "")) for word in ("prune", "compress")) for h in bundle.meta.history)


def _verify_fraction(policy: Any) -> float:
    value = _first_attr(getattr(policy, "verification", None), ("verify_fraction",), None)
    if value is None:
        value = _first_attr(policy, ("verify_fraction",), 0.5)
    return float(value)


def _params_for(policy: Any, intervention: str, label: str | None) -> dict[str, Any]:
    if not hasattr(policy, "params_for"):
        return {}
    params = policy.params_for(intervention, label)
    return dict(params or {})


def _label_restricted(config: Any, keep: Sequence[str], all_labels: Sequence[str]) -> Any:
    """``config`` with every per-label monitor section switched off for labels not in ``keep``.

    Used to re-check only the labels whose outputs a treatment changed: the facts of an unchanged
    label cannot change, so skipping them is exact (and a monitor that ignores the switch merely
    repeats its unchanged facts).
    """
    from rules.policy.monitors import MonitorConfig

    sections = [name for name in type(config).model_fields if hasattr(getattr(config, name), "enabled")]
    data = config.model_dump()
    overrides = {k: dict(v) for k, v in (data.get("overrides") or {}).items()}
    for label in all_labels:
        if label in keep:
            continue
        change = overrides.setdefault(label, {})
        for section in sections:
            change[section] = {**dict(change.get(section) or {}), "enabled": False}
    data["overrides"] = overrides
    return MonitorConfig.model_validate(data)


def default_monitor_fn(policy: Any) -> MonitorFn:
    """The policy's monitors through ``engine.monitors.run_monitors``.

    ``only`` runs just the named monitors; ``labels`` limits per-label checks to those labels.
    """
    from engine.monitors import MonitorContext, run_monitors

    config = policy.monitors
    restricted: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}

    def monitor(bundle: Bundle, data: FeatureSet, parent: Bundle | None = None,
                parent_data: FeatureSet | None = None, *, only: Sequence[str] | None = None,
                labels: Sequence[str] | None = None) -> list[IssueFact]:
        cfg = config
        if labels is not None:
            key = (tuple(sorted(labels)), tuple(bundle.labels))
            if key not in restricted:
                restricted[key] = _label_restricted(config, key[0], key[1])
            cfg = restricted[key]
        ctx = MonitorContext(bundle, data, parent=parent, parent_data=parent_data)
        return list(run_monitors(ctx, cfg, names=list(only) if only is not None else None))

    return monitor


def default_decide_fn() -> DecideFn:
    from rules.decide import decide

    return decide


# --------------------------------------------------------------------------------------------
# The loop


class _Stages:
    """Forwards ``progress(done, total)`` of one stage to the caller's stage-aware callback."""

    def __init__(self, progress: StageProgress | None) -> None:
        self._progress = progress

    def __call__(self, stage: str) -> Callable[[int, int], None] | None:
        if self._progress is None:
            return None
        return lambda done, total=None: self._progress(stage, int(done), int(total or 0))

    def tick(self, stage: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(stage, done, total)


def _align(dataset: NIHDataset, fs: FeatureSet) -> NIHDataset:
    """The dataset rows the feature set covers (``skip_bad`` may have dropped unreadable images)."""
    if list(fs.image_names) == dataset.image_names:
        return dataset
    index = {name: i for i, name in enumerate(dataset.image_names)}
    return dataset.subset([index[n] for n in fs.image_names])


def _reorder_like(fs: FeatureSet, names: Sequence[str], what: str) -> FeatureSet:
    if tuple(fs.image_names) == tuple(names):
        return fs
    index = {n: i for i, n in enumerate(fs.image_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"{what}: {len(missing)} image(s) could not be read, e.g. {missing[0]!r}")
    return fs.subset(np.array([index[n] for n in names]))


@dataclass
class _State:
    """The current (accepted) model and its view of the data."""

    bundle: Bundle
    data: FeatureSet  # whole set, row-aligned with the dataset
    hash: str
    version: int = 0  # increments on every accepted treatment


def run_triage(
    bundle: Bundle,
    dataset: NIHDataset,
    policy: Any,
    *,
    seed: int = 0,
    approve: Iterable[str] = (),
    dry_run: bool = False,
    parent: Bundle | None = None,
    audit: AuditStore | None = None,
    out_dir: str | Path,
    progress: StageProgress | None = None,
    skip_bad: bool = False,
    monitor_fn: MonitorFn | None = None,
    decide_fn: DecideFn | None = None,
) -> TriageOutcome:
    """Run one triage of ``bundle`` on ``dataset`` under ``policy``; see the module docstring.

    ``approve`` names interventions a human approved for this run; a chosen candidate that needs
    approval and is not named is written as a plan and not applied. ``monitor_fn``/``decide_fn``
    replace the policy's monitors and the rules engine (tests, other engines).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    approve = tuple(sorted(set(approve)))
    monitor_fn = monitor_fn or default_monitor_fn(policy)
    decide_fn = decide_fn or default_decide_fn()
    stages = _Stages(progress)
    policy_id = _policy_ident(policy)
    model_hash = bundle.content_hash()
    parent_hash = parent.content_hash() if parent is not None else None
    manifest_hash = dataset.manifest_hash()
    run_id = run_id_for(model_hash, manifest_hash, policy_id["content_hash"], seed, approve, dry_run)
    walls: dict[str, float] = {}

    def log(kind: str, payload: dict[str, Any]) -> None:
        if audit is not None:
            audit.append(run_id, kind, payload)

    log("run_started", {
        "policy": policy_id, "model_hash": model_hash, "parent_hash": parent_hash,
        "data_manifest_hash": manifest_hash, "data_root": str(dataset.root), "split": dataset.split,
        "n_images": len(dataset), "seed": seed, "approve": list(approve), "dry_run": dry_run,
        "out_dir": str(out_dir.resolve()), "tool_version": TOOL_VERSION,
    })
    try:
        result = _run(bundle, dataset, policy, seed=seed, approve=approve, dry_run=dry_run, parent=parent,
                      out_dir=out_dir, stages=stages, monitor_fn=monitor_fn, decide_fn=decide_fn, run_id=run_id,
                      model_hash=model_hash, parent_hash=parent_hash, manifest_hash=manifest_hash,
                      policy_id=policy_id, log=log, walls=walls, skip_bad=skip_bad)
    except BaseException as exc:
        log("run_finished", {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                             "wall_times_s": walls, "wall_time_s": time.perf_counter() - t_start})
        raise
    result.wall_time_s = time.perf_counter() - t_start
    log("run_finished", {
        "status": "ok", "outcome": result.outcome, "exit_code": result.exit_code,
        "model_hash_before": model_hash, "model_hash_after": result.model_hash_after,
        "decision_sha256": sha256_file(result.decision_path),
        "model_path": str(result.model_path) if result.model_path else None,
        "wall_times_s": walls, "wall_time_s": result.wall_time_s,
    })
    return result


def _run(
    bundle: Bundle, dataset: NIHDataset, policy: Any, *, seed: int, approve: tuple[str, ...], dry_run: bool,
    parent: Bundle | None, out_dir: Path, stages: _Stages, monitor_fn: MonitorFn, decide_fn: DecideFn,
    run_id: str, model_hash: str, parent_hash: str | None, manifest_hash: str, policy_id: dict[str, str],
    log: Callable[[str, dict[str, Any]], None], walls: dict[str, float], skip_bad: bool,
) -> TriageOutcome:
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / SCORES_DIR
    if stale.is_dir():  # a previous run's files in this folder would mislead the report
        for old in stale.glob("*.safetensors"):
            old.unlink()
    t = time.perf_counter()
    data = extract_features(bundle, dataset, skip_bad=skip_bad, progress=stages("features"))
    dataset = _align(dataset, data)
    parent_data = None
    if parent is not None:
        parent_data = _reorder_like(extract_features(parent, dataset, skip_bad=skip_bad,
                                                     progress=stages("parent_features")),
                                    data.image_names, "parent model")
    walls["features"] = time.perf_counter() - t

    fit_idx, verify_idx = patient_disjoint_split(dataset, _verify_fraction(policy), seed)
    fit_ds, verify_ds = dataset.subset(fit_idx), dataset.subset(verify_idx)
    parent_verify = parent_data.subset(verify_idx) if parent_data is not None else None
    split_info = {
        "fit": {"n_images": int(len(fit_idx)), "n_patients": int(len(set(fit_ds.patient_ids.tolist()))),
                "manifest_hash": fit_ds.manifest_hash()},
        "verify": {"n_images": int(len(verify_idx)), "n_patients": int(len(set(verify_ds.patient_ids.tolist()))),
                   "manifest_hash": verify_ds.manifest_hash()},
    }

    # -- monitor (whole set) ---------------------------------------------------------------------
    t = time.perf_counter()
    stages.tick("monitor", 0, 1)
    facts = sort_facts(monitor_fn(bundle, data, parent, parent_data))
    stages.tick("monitor", 1, 1)
    walls["monitor"] = time.perf_counter() - t
    log("facts", {"facts": [_fact_json(f) for f in facts], "split": split_info})
    actionable = [f for f in facts if f.actionable]

    state = _State(bundle=bundle, data=data, hash=model_hash)
    max_attempts, max_cost = _budget(policy)
    spent = {"attempts": 0, "cost": 0.0}
    context = {"has_compression_history": _has_compression_history(bundle), "has_parent": parent is not None}
    treatments: list[dict[str, Any]] = []

    t = time.perf_counter()
    initial: dict[str, Any] = {}
    if actionable:
        for d in decide_fn(actionable, policy, run_id=run_id, context=context, exclude=None):
            initial[d.fact.fact_id] = d
    walls["decide"] = time.perf_counter() - t

    # Current model's monitor view of the verify split (cached per accepted model version).
    verify_cache: dict[int, tuple[FeatureSet, list[IssueFact]]] = {}
    live: dict[tuple[int, str], set[tuple[str, str, str]]] = {}

    for i, fact in enumerate(actionable):
        stages.tick("triage", i, len(actionable))
        # An earlier accepted treatment may have fixed this issue too: look again with the current model.
        if state.version > 0:  # re-run only this fact's monitor on the treated model (whole set)
            cache_key = (state.version, fact.monitor)
            if cache_key not in live:
                current = monitor_fn(state.bundle, state.data, parent, parent_data, only=[fact.monitor])
                live[cache_key] = {fact_key(f) for f in current if f.actionable}
            still_there = fact_key(fact) in live[cache_key]
        else:
            still_there = True
        if not still_there:
            treatments.append({"fact_id": fact.fact_id, "kind": fact.kind, "label": fact.label,
                               "severity": fact.severity, "attempts": [], "outcome": "resolved_earlier",
                               "intervention": None,
                               "rationale": "no longer detected after an earlier accepted treatment in this run"})
            log("outcome", {"fact_id": fact.fact_id, "outcome": "resolved_earlier"})
            continue
        entry = _treat_fact(
            fact, initial.get(fact.fact_id), state=state, policy=policy, approve=approve, dry_run=dry_run,
            parent=parent, parent_verify=parent_verify, fit_idx=fit_idx, verify_idx=verify_idx, fit_ds=fit_ds,
            verify_ds=verify_ds, seed=seed, monitor_fn=monitor_fn, decide_fn=decide_fn, run_id=run_id,
            context=context, budget=(max_attempts, max_cost), spent=spent, verify_cache=verify_cache, log=log,
            walls=walls, dataset=dataset, stages=stages, out_dir=out_dir,
        )
        treatments.append(entry)
    stages.tick("triage", len(actionable), len(actionable))

    # -- final view -----------------------------------------------------------------------------
    t = time.perf_counter()
    if state.version > 0:
        stages.tick("final_monitor", 0, 1)
        remaining = sort_facts(monitor_fn(state.bundle, state.data, parent, parent_data))
        stages.tick("final_monitor", 1, 1)
    else:
        remaining = facts
    walls["final_monitor"] = time.perf_counter() - t
    remaining_actionable = [f for f in remaining if f.actionable]

    outcomes = [tr["outcome"] for tr in treatments]
    if any(o in _UNTREATED for o in outcomes):
        run_outcome, exit_code = "untreated", EXIT_UNTREATED
    elif "needs_approval" in outcomes:
        run_outcome, exit_code = "needs_approval", EXIT_NEEDS_APPROVAL
    elif not actionable:
        run_outcome, exit_code = "healthy", 0
    elif dry_run:
        run_outcome, exit_code = "planned", 0
    else:
        run_outcome, exit_code = "treated", 0

    # -- outputs --------------------------------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path: Path | None = out_dir / MODEL_FILE
    final_bundle = state.bundle
    if state.version > 0 and not dry_run:
        # The saved bundle names the model this run started from as its parent, whatever the
        # number of treatments; its history lists every accepted change in order.
        final_bundle = final_bundle.with_meta(parent_hash=model_hash)
        model_hash_after = save_bundle(final_bundle, model_path)
    else:
        model_hash_after = model_hash
        if model_path.exists():  # a previous run's output in this folder would mislead
            model_path.unlink()
        model_path = None

    decision = {
        "format": DECISION_FORMAT,
        "format_version": 1,
        "tool_version": TOOL_VERSION,
        "run_id": run_id,
        "policy": policy_id,
        "model": {"before": model_hash, "after": model_hash_after, "changed": model_hash_after != model_hash,
                  "parent": parent_hash, "file": MODEL_FILE if model_path else None},
        "data": {"manifest_hash": manifest_hash, "split": dataset.split, "n_images": len(dataset),
                 "skipped": len(dataset.skipped), **split_info},
        "seed": seed,
        "approve": list(approve),
        "dry_run": dry_run,
        "facts": [_fact_json(f) for f in facts],
        "treatments": treatments,
        "remaining_facts": [_fact_json(f) for f in remaining_actionable],
        "budget": {"max_attempts_per_issue": max_attempts, "max_total_cost": max_cost,
                   "attempts_used": spent["attempts"],
                   "cost_spent": spent["cost"]},
        "outcome": run_outcome,
        "exit_code": exit_code,
    }
    decision = to_jsonable(decision)
    decision_path = atomic_write_json(out_dir / DECISION_FILE, decision)
    return TriageOutcome(
        run_id=run_id, outcome=run_outcome, exit_code=exit_code, decision=decision, bundle=final_bundle,
        model_hash_before=model_hash, model_hash_after=model_hash_after, decision_path=decision_path,
        model_path=model_path, facts=facts, remaining=remaining_actionable,
    )


def _treat_fact(
    fact: IssueFact, decision: Any, *, state: _State, policy: Any, approve: tuple[str, ...], dry_run: bool,
    parent: Bundle | None, parent_verify: FeatureSet | None, fit_idx: np.ndarray, verify_idx: np.ndarray,
    fit_ds: NIHDataset, verify_ds: NIHDataset, seed: int, monitor_fn: MonitorFn, decide_fn: DecideFn, run_id: str,
    context: dict[str, Any], budget: tuple[int | None, float | None], spent: dict[str, Any],
    verify_cache: dict[int, tuple[FeatureSet, list[IssueFact]]], log: Callable[[str, dict[str, Any]], None],
    walls: dict[str, float], dataset: NIHDataset, stages: _Stages, out_dir: Path,
) -> dict[str, Any]:
    """Escalate through the candidates for one fact; mutates ``state`` on acceptance."""
    acceptance = acceptance_from_policy(policy, fact.label)
    excluded: list[str] = []
    attempts: list[dict[str, Any]] = []
    outcome, chosen_name = "no_candidate", None
    max_attempts, max_cost = budget
    attempt_no = 0
    tried = 0  # interventions actually run for this issue (the per-issue budget)
    while True:
        attempt_no += 1
        if decision is None:
            found = decide_fn([fact], policy, run_id=run_id, context=context, exclude={fact.fact_id: set(excluded)})
            decision = found[0] if found else None
        chosen = getattr(decision, "chosen", None)
        record: dict[str, Any] = {
            "attempt": attempt_no,
            "excluded": sorted(excluded),
            "candidates": _candidates_sorted(getattr(decision, "candidates", ()) or ()),
            "chosen": _candidate_json(chosen),
            "rationale": str(getattr(decision, "rationale", "no decision returned by the rules")),
        }
        log("decision", {"fact_id": fact.fact_id, **record})
        if chosen is None:
            outcome = "exhausted" if excluded else "no_candidate"
            record["result"] = outcome
            attempts.append(record)
            break
        name = str(chosen.intervention)
        cost = float(chosen.cost)
        if name in excluded:  # the rules ignored ``exclude``; never retry a rejected treatment
            outcome = record["result"] = "exhausted"
            record["error"] = f"the rules chose the excluded intervention {name!r} again"
            attempts.append(record)
            break
        if max_attempts is not None and tried >= max_attempts or \
                max_cost is not None and spent["cost"] + cost > max_cost + 1e-12:
            outcome = record["result"] = "budget_exhausted"
            record["budget"] = {"attempts_on_issue": tried, "max_attempts_per_issue": max_attempts,
                                "cost_spent": spent["cost"], "max_total_cost": max_cost, "next_cost": cost}
            attempts.append(record)
            break
        needs = bool(getattr(chosen, "needs_approval", False))
        record["approval"] = {"required": needs, "granted": needs and name in approve}
        if needs and name not in approve:
            outcome = record["result"] = "needs_approval"
            record["plan"] = {"intervention": name, "params": to_jsonable(_params_for(policy, name, fact.label)),
                              "cost": cost, "approve_with": f"--approve {name}"}
            attempts.append(record)
            log("outcome", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                            "outcome": "needs_approval"})
            break
        if dry_run:
            outcome = record["result"] = "planned"
            record["plan"] = {"intervention": name, "params": to_jsonable(_params_for(policy, name, fact.label)),
                              "cost": cost}
            attempts.append(record)
            break
        if needs:
            log("approval", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                             "approved_by": "--approve", "cost": cost})

        # -- apply to a copy --------------------------------------------------------------------
        params = _params_for(policy, name, fact.label)
        record["params"] = to_jsonable(params)
        ok, result, error = _apply(name, fact, state, params, fit_idx, fit_ds, parent, seed, stages)
        spent["attempts"] += 1
        spent["cost"] += cost
        tried += 1
        if not ok:
            record["result"] = "error"
            record["error"] = error
            log("intervention_applied", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                                         "status": "error", "error": error, "params": params,
                                         "model_hash_before": state.hash})
            attempts.append(record)
            excluded.append(name)
            decision = None
            continue
        assert result is not None
        walls[f"{fact.fact_id}/{attempt_no}/{name}"] = result.wall_time_s
        record["changes"] = to_jsonable(result.changes)
        record["fit_metrics"] = to_jsonable(result.fit_metrics)
        record["classifier_only"] = bool(result.classifier_only)
        candidate_hash = result.bundle.content_hash()
        log("intervention_applied", {
            "fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name, "status": "ok", "params": params,
            "changes": result.changes, "fit_metrics": result.fit_metrics, "wall_time_s": result.wall_time_s,
            "classifier_only": result.classifier_only, "model_hash_before": state.hash,
            "model_hash_candidate": candidate_hash,
        })

        # -- verify on the held-out split -------------------------------------------------------
        t = time.perf_counter()
        if state.version not in verify_cache:
            v_before = state.data.subset(verify_idx)
            verify_cache[state.version] = (v_before, monitor_fn(state.bundle, v_before, parent, parent_verify))
        v_before, facts_before = verify_cache[state.version]
        try:
            v_after = treated_features(result.bundle, result.classifier_only, v_before, verify_ds,
                                       use_cache=False, progress=stages("verify_features"))
        except InterventionError as exc:
            record["result"], record["error"] = "error", str(exc)
            attempts.append(record)
            excluded.append(name)
            decision = None
            continue
        vr = verify_treatment(fact=fact, intervention=name, before_bundle=state.bundle, after_bundle=result.bundle,
                              before=v_before, after=v_after, monitor_fn=monitor_fn, acceptance=acceptance,
                              parent=parent, parent_data=parent_verify, facts_before=facts_before)
        verify_wall = time.perf_counter() - t
        scores = _write_scores(out_dir, fact.fact_id, attempt_no, v_before, v_after, result.bundle.labels)
        record["verify"] = to_jsonable({**vr.to_dict(), "scores": scores})
        record["acceptance"] = to_jsonable(acceptance)
        log("verification", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                             "passed": vr.passed, "checks": vr.checks, "before": vr.before, "after": vr.after,
                             "acceptance": acceptance, "scores": scores, "wall_time_s": verify_wall,
                             "model_hash_candidate": candidate_hash})
        if vr.passed:
            record["result"] = "accepted"
            attempts.append(record)
            _accept(state, result, candidate_hash, dataset, stages)
            outcome, chosen_name = "treated", name
            log("outcome", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                            "outcome": "accepted", "model_hash_after": state.hash})
            break
        record["result"] = "rejected"
        attempts.append(record)
        failed = [c["name"] for c in vr.checks if not c["passed"]]
        log("outcome", {"fact_id": fact.fact_id, "attempt": attempt_no, "intervention": name,
                        "outcome": "rejected", "failed_checks": failed, "rolled_back_to": state.hash})
        excluded.append(name)
        decision = None

    rationale = _fact_rationale(outcome, attempts, chosen_name)
    log("outcome", {"fact_id": fact.fact_id, "outcome": outcome, "intervention": chosen_name,
                    "rationale": rationale})
    return {"fact_id": fact.fact_id, "kind": fact.kind, "label": fact.label, "severity": fact.severity,
            "attempts": attempts, "outcome": outcome, "intervention": chosen_name, "rationale": rationale}


SCORES_DIR = "verify_scores"


def _write_scores(out_dir: Path, fact_id: str, attempt: int, before: FeatureSet, after: FeatureSet,
                  label_names: Sequence[str]) -> dict[str, str]:
    """Per-image verify-split labels and logits before/after, for ROC curves in the run report.

    Deterministic bytes (same run, same file); labels are given in the bundle's label order.
    """
    from safetensors.numpy import save

    from model.labels import CHEXNET_LABELS

    cols = [CHEXNET_LABELS.index(n) if n in CHEXNET_LABELS else -1 for n in label_names]
    truth = np.stack([before.labels[:, c] if c >= 0 else np.zeros(len(before), np.uint8) for c in cols], axis=1)
    rel = f"{SCORES_DIR}/{fact_id}-{attempt}.safetensors"
    names = np.frombuffer(canonical_json(list(before.image_names)), dtype=np.uint8)
    # One metadata key only: safetensors writes a metadata map in no fixed order.
    data = save({"labels": truth.astype(np.uint8), "logits_before": before.logits.astype(np.float32),
                 "logits_after": after.logits.astype(np.float32), "image_names_json": names},
                metadata={"labels": canonical_json(list(label_names)).decode()})
    atomic_write_bytes(out_dir / rel, data)
    return {"file": rel, "sha256": sha256_bytes(data)}


def _apply(name: str, fact: IssueFact, state: _State, params: dict[str, Any], fit_idx: np.ndarray,
           fit_ds: NIHDataset, parent: Bundle | None, seed: int,
           stages: _Stages) -> tuple[bool, InterventionResult | None, str | None]:
    try:
        plugin = get_intervention(name)
    except InterventionError as exc:
        return False, None, str(exc)
    # Interventions must treat a copy (the base class refuses a returned input). Rather than
    # deep-copying the whole model for every attempt, snapshot its tensors (a memcpy) and check
    # afterwards: a plugin that modified the current model anyway is rolled back and rejected.
    snapshot = {k: v.detach().clone() for k, v in state.bundle.model.state_dict().items()}
    meta_before = state.bundle.meta
    ctx = TreatmentContext(bundle=state.bundle, fact=fact, fit=state.data.subset(fit_idx), fit_dataset=fit_ds,
                           params=params, seed=seed, parent=parent, progress=stages(f"apply {name}"))
    ok, why = plugin.applicable(ctx)
    if not ok:
        outcome: tuple[bool, InterventionResult | None, str | None] = (False, None, f"not applicable: {why}")
    else:
        try:
            outcome = (True, plugin.apply(ctx), None)
        except (InterventionError, PolicyError, DataError) as exc:
            outcome = (False, None, f"{type(exc).__name__}: {exc}")
    current = state.bundle.model.state_dict()
    if state.bundle.meta is not meta_before or set(current) != set(snapshot) or any(
            not torch.equal(current[k], v) for k, v in snapshot.items()):
        state.bundle.model.load_state_dict(snapshot)
        state.bundle.meta = meta_before
        return False, None, (f"InterventionError: {name} modified the model it was given instead of a copy; "
                             "the change was rolled back (a plugin bug)")
    return outcome


def _accept(state: _State, result: InterventionResult, new_hash: str, dataset: NIHDataset, stages: _Stages) -> None:
    """Make the treated copy current and bring the whole-set view up to date."""
    new = result.bundle
    new_wh = new.weights_hash()
    if new_wh == state.data.weights_hash:
        data = state.data
    elif result.classifier_only:
        data = dataclasses.replace(state.data.with_logits(classifier_logits(new, state.data.features)),
                                   weights_hash=new_wh)
    else:
        data = _reorder_like(extract_features(new, dataset, progress=stages("features (treated)")),
                             state.data.image_names, "treated model")
    state.bundle, state.data, state.hash = new, data, new_hash
    state.version += 1


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
