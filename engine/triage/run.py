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
   approval, or the policy's budget is spent (:mod:`engine.triage.treat`);
5. ``decision.json`` (byte-identical for the same model, data, policy, seed and approvals: no
   times in it; :mod:`engine.triage.decision`) and, when anything changed, the treated bundle are
   written; every step is appended to the audit store with its wall times.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.audit import AuditStore
from engine.core.facts import IssueFact
from engine.core.storage import atomic_write_json, sha256_file
from engine.monitors.reported_fp import Report, ReportedMonitor, with_reports
from engine.triage.decision import (
    DECISION_FILE,
    MODEL_FILE,
    TriageOutcome,
    decision_document,
    fact_json,
    policy_ident,
    run_id_for,
    run_outcome,
)
from engine.triage.state import Budget, CurrentModel, DecideFn, RunLog, StageProgress, Stages, TriageRun, reorder_like
from engine.triage.treat import SCORES_DIR, treat_fact
from engine.triage.verify import MonitorFn, fact_key
from model.bundle import TOOL_VERSION, Bundle, save_bundle
from model.data import NIHDataset, patient_disjoint_split
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from rules.policy import MonitorConfig, Policy

__all__ = [
    "SEVERITY_ORDER",
    "CAUSE_KINDS",
    "sort_facts",
    "default_monitor_fn",
    "default_decide_fn",
    "run_triage",
]

SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")

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


# --------------------------------------------------------------------------------------------
# The monitors and the rules (replaceable: tests, other engines)


def _label_restricted(config: MonitorConfig, keep: Sequence[str], all_labels: Sequence[str]) -> MonitorConfig:
    """``config`` with every per-label monitor section switched off for labels not in ``keep``.

    Used to re-check only the labels whose outputs a treatment changed: the facts of an unchanged
    label cannot change, so skipping them is exact (and a monitor that ignores the switch merely
    repeats its unchanged facts).
    """
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


def default_monitor_fn(policy: Policy) -> MonitorFn:
    """The policy's monitors through ``engine.monitors.run_monitors``.

    ``only`` runs just the named monitors; ``labels`` limits per-label checks to those labels.
    """
    from engine.monitors import MonitorContext, run_monitors

    config = policy.monitors
    restricted: dict[tuple[tuple[str, ...], tuple[str, ...]], MonitorConfig] = {}

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
# The run


def run_triage(
    bundle: Bundle,
    dataset: NIHDataset,
    policy: Policy,
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
    model_path: str | Path | None = None,
    parent_path: str | Path | None = None,
    reports: Sequence[Report] = (),
    policy_monitors: bool = True,
) -> TriageOutcome:
    """Run one triage of ``bundle`` on ``dataset`` under ``policy``; see the module docstring.

    ``approve`` names interventions a human approved for this run; a chosen candidate that needs
    approval and is not named is written as a plan and not applied. ``monitor_fn``/``decide_fn``
    replace the policy's monitors and the rules engine (tests, other engines). ``model_path`` /
    ``parent_path`` (the files the bundles came from) are recorded so ``audit verify`` can re-hash them.
    ``reports`` (readers' false-positive reports) add ``reported_fp`` facts; with ``policy_monitors``
    false they are the only facts (``cli.py correct``).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    approve = tuple(sorted(set(approve)))
    monitor_fn = monitor_fn or default_monitor_fn(policy)
    decide_fn = decide_fn or default_decide_fn()
    model_hash = bundle.content_hash()
    parent_hash = parent.content_hash() if parent is not None else None
    manifest_hash = dataset.manifest_hash()
    report_rows = [r.to_json() for r in reports]
    if not policy_monitors and not reports:
        raise ValueError("run_triage: policy_monitors=False needs reports (they are then the only facts)")
    log = RunLog(run_id_for(model_hash, manifest_hash, policy.content_hash, seed, approve, dry_run, report_rows,
                            policy_monitors), audit)
    log("run_started", {
        "policy": policy_ident(policy), "model_hash": model_hash, "parent_hash": parent_hash,
        "data_manifest_hash": manifest_hash, "data_root": str(dataset.root), "split": dataset.split,
        "n_images": len(dataset), "seed": seed, "approve": list(approve), "dry_run": dry_run,
        "out_dir": str(out_dir.resolve()), "tool_version": TOOL_VERSION,
        **({"reports": report_rows, "policy_monitors": policy_monitors} if reports else {}),
        # where the audited files live, so `audit verify` can tell when one is edited in place later
        **({"model_path": str(Path(model_path).resolve())} if model_path is not None else {}),
        **({"parent_path": str(Path(parent_path).resolve())} if parent_path is not None else {}),
    })
    try:
        run = _prepare(bundle, dataset, policy, seed=seed, approve=approve, dry_run=dry_run, parent=parent,
                       out_dir=out_dir, monitor_fn=monitor_fn, decide_fn=decide_fn, log=log,
                       stages=Stages(progress), model_hash=model_hash, parent_hash=parent_hash,
                       manifest_hash=manifest_hash, skip_bad=skip_bad)
        if reports:
            run.reports, run.policy_monitors = report_rows, policy_monitors
            run.monitor_fn = with_reports(run.monitor_fn, ReportedMonitor(reports, bundle, run.data),
                                          policy_monitors=policy_monitors)
        result = _triage(run)
    except BaseException as exc:
        # Ctrl-C or SIGTERM (engine.commands.dispatch turns it into Terminated): the run closes as interrupted
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
        log("run_finished", {"status": status, "error": f"{type(exc).__name__}: {exc}",
                             "wall_times_s": log.walls, "wall_time_s": time.perf_counter() - t_start})
        raise
    result.wall_time_s = time.perf_counter() - t_start
    log("run_finished", {
        "status": "ok", "outcome": result.outcome, "exit_code": result.exit_code,
        "model_hash_before": model_hash, "model_hash_after": result.model_hash_after,
        "decision_sha256": sha256_file(result.decision_path),
        "model_path": str(result.model_path) if result.model_path else None,
        "wall_times_s": log.walls, "wall_time_s": result.wall_time_s,
    })
    return result


def _has_compression_history(bundle: Bundle) -> bool:
    """The bundle is a compressed model (pruned architecture or a compression step in its history)."""
    if bundle.meta.arch != "densenet":
        return True
    return any(any(word in str(h.get("op", "")) for word in ("prune", "compress")) for h in bundle.meta.history)


def _align(dataset: NIHDataset, fs: FeatureSet) -> NIHDataset:
    """The dataset rows the feature set covers (``skip_bad`` may have dropped unreadable images)."""
    if list(fs.image_names) == dataset.image_names:
        return dataset
    index = {name: i for i, name in enumerate(dataset.image_names)}
    return dataset.subset([index[n] for n in fs.image_names])


def _split_info(fit_ds: NIHDataset, verify_ds: NIHDataset) -> dict[str, Any]:
    return {
        "fit": {"n_images": int(len(fit_ds)), "n_patients": int(len(set(fit_ds.patient_ids.tolist()))),
                "manifest_hash": fit_ds.manifest_hash()},
        "verify": {"n_images": int(len(verify_ds)), "n_patients": int(len(set(verify_ds.patient_ids.tolist()))),
                   "manifest_hash": verify_ds.manifest_hash()},
    }


def _fit_counts(fit_ds: NIHDataset) -> dict[str, dict[str, int]]:
    """Per-label positives and negatives of the fit half: what a retraining will learn from.

    The rules read them (``partial_retrain`` needs ``min_positives`` of each there), so they do not
    propose a retraining that the plugin then refuses because the whole set had enough and the fit
    half does not.
    """
    y = fit_ds.labels
    pos = [int(v) for v in y.sum(axis=0, dtype=np.int64)]
    return {"fit_positives": dict(zip(CHEXNET_LABELS, pos, strict=True)),
            "fit_negatives": {name: len(y) - p for name, p in zip(CHEXNET_LABELS, pos, strict=True)}}


def _prepare(bundle: Bundle, dataset: NIHDataset, policy: Policy, *, seed: int, approve: tuple[str, ...],
             dry_run: bool, parent: Bundle | None, out_dir: Path, monitor_fn: MonitorFn, decide_fn: DecideFn,
             log: RunLog, stages: Stages, model_hash: str, parent_hash: str | None, manifest_hash: str,
             skip_bad: bool) -> TriageRun:
    """The run folder, the features of the whole set (and of the parent) and the fit/verify split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / SCORES_DIR, out_dir / "candidates"):
        if stale.is_dir():  # a previous run's files in this folder would mislead the report
            for old in stale.glob("*.safetensors"):
                old.unlink()
    with log.timed("features"):
        data = extract_features(bundle, dataset, skip_bad=skip_bad, progress=stages("features"))
        dataset = _align(dataset, data)
        parent_data = None
        if parent is not None:
            parent_data = reorder_like(extract_features(parent, dataset, skip_bad=skip_bad,
                                                        progress=stages("parent_features")),
                                       data.image_names, "parent model")

    fit_idx, verify_idx = patient_disjoint_split(dataset, policy.verification.verify_fraction, seed)
    fit_ds, verify_ds = dataset.subset(fit_idx), dataset.subset(verify_idx)
    return TriageRun(
        policy=policy, seed=seed, approve=approve, dry_run=dry_run, out_dir=out_dir, monitor_fn=monitor_fn,
        decide_fn=decide_fn, log=log, stages=stages,
        bundle=bundle, model_hash=model_hash, parent=parent, parent_hash=parent_hash,
        dataset=dataset, manifest_hash=manifest_hash, data=data, parent_data=parent_data,
        fit_idx=fit_idx, verify_idx=verify_idx, fit_ds=fit_ds, verify_ds=verify_ds,
        parent_verify=parent_data.subset(verify_idx) if parent_data is not None else None,
        split_info=_split_info(fit_ds, verify_ds),
        context={"has_compression_history": _has_compression_history(bundle), "has_parent": parent is not None,
                 **_fit_counts(fit_ds)},
        budget=Budget(policy.budget.max_attempts_per_issue, policy.budget.max_total_cost),
        current=CurrentModel(bundle=bundle, data=data, hash=model_hash),
    )


def _triage(run: TriageRun) -> TriageOutcome:
    """Monitor the whole set, treat its actionable facts in order, look again, write the outputs."""
    facts = _monitor(run)
    actionable = [f for f in facts if f.actionable]
    with run.log.timed("decide"):
        initial: dict[str, Any] = {}
        if actionable:
            for d in run.decide_fn(actionable, run.policy, run_id=run.run_id, context=run.context, exclude=None):
                initial[d.fact.fact_id] = d
    treatments = _treat_in_order(run, actionable, initial)
    remaining = [f for f in _final_view(run, facts) if f.actionable]
    outcome, exit_code = run_outcome([tr["outcome"] for tr in treatments], bool(actionable), run.dry_run)
    final_bundle, model_hash_after, model_path = _write_model(run)
    decision = decision_document(run, facts=facts, treatments=treatments, remaining=remaining,
                                 model_hash_after=model_hash_after, model_file=MODEL_FILE if model_path else None,
                                 outcome=outcome, exit_code=exit_code)
    decision_path = atomic_write_json(run.out_dir / DECISION_FILE, decision)
    return TriageOutcome(
        run_id=run.run_id, outcome=outcome, exit_code=exit_code, decision=decision, bundle=final_bundle,
        model_hash_before=run.model_hash, model_hash_after=model_hash_after, decision_path=decision_path,
        model_path=model_path, facts=facts, remaining=remaining,
    )


def _monitor(run: TriageRun) -> list[IssueFact]:
    """The policy's monitors on the whole set under the model the run started from (sorted)."""
    with run.log.timed("monitor"):
        run.stages.tick("monitor", 0, 1)
        facts = sort_facts(run.monitor_fn(run.bundle, run.data, run.parent, run.parent_data))
        run.facts = facts
        run.stages.tick("monitor", 1, 1)
    # the rules' context goes into the record too, so `policy replay` can re-decide from it alone
    run.log("facts", {"facts": [fact_json(f) for f in facts], "split": run.split_info, "context": run.context})
    return facts


def _treat_in_order(run: TriageRun, actionable: list[IssueFact], initial: dict[str, Any]) -> list[dict[str, Any]]:
    """Each actionable fact's treatment, in order; a fact an earlier treatment fixed is not treated again."""
    treatments: list[dict[str, Any]] = []
    live: dict[tuple[int, str], set[tuple[str, str, str]]] = {}  # (model version, monitor) -> actionable facts
    for i, fact in enumerate(actionable):
        run.stages.tick("triage", i, len(actionable))
        if not _still_there(run, fact, live):
            treatments.append({"fact_id": fact.fact_id, "kind": fact.kind, "label": fact.label,
                               "severity": fact.severity, "attempts": [], "outcome": "resolved_earlier",
                               "intervention": None,
                               "rationale": "no longer detected after an earlier accepted treatment in this run"})
            run.log("outcome", {"fact_id": fact.fact_id, "outcome": "resolved_earlier"})
            continue
        treatments.append(treat_fact(run, fact, initial.get(fact.fact_id)))
    run.stages.tick("triage", len(actionable), len(actionable))
    return treatments


def _still_there(run: TriageRun, fact: IssueFact, live: dict[tuple[int, str], set[tuple[str, str, str]]]) -> bool:
    """Whether ``fact`` is still detected on the whole set under the current model.

    An earlier accepted treatment may have fixed this issue too: only this fact's monitor is run
    again, once per accepted model.
    """
    current = run.current
    if current.version == 0:
        return True
    cache_key = (current.version, fact.monitor)
    if cache_key not in live:
        found = run.monitor_fn(current.bundle, current.data, run.parent, run.parent_data, only=[fact.monitor])
        live[cache_key] = {fact_key(f) for f in found if f.actionable}
    return fact_key(fact) in live[cache_key]


def _final_view(run: TriageRun, facts: list[IssueFact]) -> list[IssueFact]:
    """Every monitor on the whole set under the final model (``facts`` again when nothing was accepted)."""
    with run.log.timed("final_monitor"):
        if run.current.version == 0:
            return facts
        run.stages.tick("final_monitor", 0, 1)
        remaining = sort_facts(run.monitor_fn(run.current.bundle, run.current.data, run.parent, run.parent_data))
        run.stages.tick("final_monitor", 1, 1)
        return remaining


def _write_model(run: TriageRun) -> tuple[Bundle, str, Path | None]:
    """``(final bundle, its hash, its file)``: the treated bundle is saved when any treatment was accepted
    (and not a dry run); otherwise a previous run's model file in the folder is removed (file None)."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = run.out_dir / MODEL_FILE
    final_bundle = run.current.bundle
    if run.current.version > 0 and not run.dry_run:
        # The saved bundle names the model this run started from as its parent, whatever the
        # number of treatments; its history lists every accepted change in order.
        final_bundle = final_bundle.with_meta(parent_hash=run.model_hash)
        return final_bundle, save_bundle(final_bundle, model_path), model_path
    if model_path.exists():  # a previous run's output in this folder would mislead
        model_path.unlink()
    return final_bundle, run.model_hash, None
