"""Verification of a treated model on the held-out verify split: accept, or roll back.

A treatment is judged on data it never saw (the verify split is patient-disjoint from the fit
split the intervention used). Three questions, each a named check with its value and limit so the
audit can show exactly why a change was accepted or rejected:

1. Did the issue go away? The monitor that raised the fact is re-run on the verify split with the
   treated model, restricted to the fact's label and kind; the issue must be gone, or (when the
   policy sets a least improvement) its distance from the reference must shrink by that fraction.
2. Is the improvement, and the target label's own operating point, beyond noise? The checks of
   :mod:`engine.triage.acceptance`: true positives lost and sensitivity against the policy's target
   for every treatment that moved the label's operating point, a per-kind paired statistic whose
   interval must exclude "no change" (Bonferroni over the candidates tried), and for a shortcut
   the label judged on the images without the artefact.
3. What else did it break? Per-label AUROC of the other labels may not fall by more than the
   policy allows, their pooled AUROC change must be non-inferior within that tolerance, and the
   treatment may not raise new actionable issues on other labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from engine.triage.acceptance import (
    PairedView,
    clean_image_checks,
    cluster_check,
    improvement_check,
    noninferiority_check,
    operating_point_checks,
    target_moved,
)
from engine.triage.acceptance import check as _check
from engine.triage.correction import ReportedViews, reported_checks
from interventions.attribution import head_logits, truth_index
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, confusion_at, expected_calibration_error, one_class_reason, sigmoid

__all__ = [
    "MonitorFn",
    "Acceptance",
    "VerifyResult",
    "treated_features",
    "split_metrics",
    "fact_key",
    "changed_labels",
    "issue_distance",
    "verify_treatment",
]


class MonitorFn(Protocol):
    """Runs the policy's monitors on one view of the data (model + rows).

    ``only`` names the monitors to run (None: all); ``labels`` limits per-label checks to those
    labels (None: all). Both are optimisations: an implementation may ignore them and run more.
    """

    def __call__(self, bundle: Bundle, data: FeatureSet, parent: Bundle | None = None,
                 parent_data: FeatureSet | None = None, *, only: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None) -> list[IssueFact]: ...


@dataclass(frozen=True)
class Acceptance:
    """The limits a treatment must meet on the verify split (from the policy's acceptance section)."""

    #: Largest allowed AUROC *drop* on any label other than the treated one.
    max_other_auroc_change: float = 0.02
    #: Most true positives the treated label may lose on the verify split (every treatment that moves
    #: its operating point).
    max_tp_lost: int = 0
    #: When the issue is still detected: least relative improvement of its distance from reference
    #: that still counts (None: the issue must be gone).
    min_improvement: float | None = None
    #: New actionable issues on other labels that a treatment may introduce.
    max_new_issues: int = 0
    #: FP-cluster treatments: least share of the cluster's false positives present on the verify
    #: split that must no longer be predicted positive (None: not checked).
    min_fp_removed_share: float | None = 0.5
    #: Confidence of every interval; the k-th candidate's improvement is judged at 1 - (1 - c) / k.
    confidence: float = 0.95
    #: Paired-bootstrap resamples per interval.
    bootstrap_resamples: int = 1000
    #: The label's sensitivity target (``params.threshold.method: fixed_sensitivity``), None: none.
    sensitivity_target: float | None = None
    #: Positives a statistic over positives needs for a bootstrap interval (the policy's
    #: ``monitors.min_comparison_positives``, the monitors' floor for the same comparisons).
    min_positives: int = 10


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification. ``checks`` are ``{name, value, limit, passed, detail}``."""

    passed: bool
    checks: list[dict[str, Any]]
    before: dict[str, dict[str, float | int | None]]
    after: dict[str, dict[str, float | int | None]]
    facts_before: list[dict[str, Any]] = field(default_factory=list)
    facts_after: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def treated_features(
    after: Bundle,
    classifier_only: bool,
    data: FeatureSet,
    dataset: NIHDataset,
    *,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """``data``'s rows (the current model's view) under the treated model ``after``.

    Same weights (thresholds changed): the same logits. Classifier-only change: cached features
    through the new classifier. Otherwise the backbone runs again on ``dataset`` (same rows).
    """
    new_hash = after.weights_hash()
    if new_hash == data.weights_hash:
        return dataclasses.replace(data, weights_hash=new_hash)
    if classifier_only:
        return dataclasses.replace(data.with_logits(head_logits(after, data.features)), weights_hash=new_hash)
    fs = extract_features(after, dataset, use_cache=use_cache, progress=progress)
    if fs.image_names != data.image_names:
        order = {name: i for i, name in enumerate(fs.image_names)}
        missing = [n for n in data.image_names if n not in order]
        if missing:
            raise InterventionError(f"treated model could not read {len(missing)} image(s), e.g. {missing[0]!r}")
        fs = fs.subset(np.array([order[n] for n in data.image_names]))
    return fs


def split_metrics(bundle: Bundle, data: FeatureSet, labels: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-label AUROC, ECE and the operating point (sensitivity, specificity, TP, FP) at the bundle thresholds."""
    probs = sigmoid(data.logits)
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(bundle.labels):
        if labels is not None and name not in labels:
            continue
        if name not in CHEXNET_LABELS:  # no ground truth for this output
            continue
        y = data.labels[:, truth_index(name)]
        conf = confusion_at(y, probs[:, k], float(bundle.meta.thresholds[k]))
        out[name] = {
            "n": int(len(y)),
            "positives": int(y.sum()),
            "auroc": _finite(auroc(y, probs[:, k])),
            "ece": _finite(expected_calibration_error(y, probs[:, k])),
            "threshold": float(bundle.meta.thresholds[k]),
            "sensitivity": _finite(conf["sensitivity"]),
            "specificity": _finite(conf["specificity"]),
            "tp": conf["tp"],
            "fp": conf["fp"],
        }
        # a value that cannot be estimated is None with its reason (the evaluate JSON's convention)
        why = {"auroc": one_class_reason(y), "ece": "no images", "sensitivity": "no positives",
               "specificity": "no negatives"}
        out[name].update({f"{key}_reason": reason for key, reason in why.items() if out[name][key] is None})
    return out


def changed_labels(before_bundle: Bundle, after_bundle: Bundle, before: FeatureSet, after: FeatureSet) -> list[str] | None:
    """Labels whose logits or threshold differ between the two views; None when the features differ
    (then every label's facts may change, e.g. input drift or feature-based clusters)."""
    if before.features is not after.features and not np.array_equal(before.features, after.features):
        return None
    if list(before_bundle.labels) != list(after_bundle.labels):
        return None
    out = []
    for k, name in enumerate(after_bundle.labels):
        same_logits = np.array_equal(before.logits[:, k], after.logits[:, k])
        if not same_logits or before_bundle.meta.thresholds[k] != after_bundle.meta.thresholds[k]:
            out.append(name)
    return out


def fact_key(fact: IssueFact) -> tuple[str, str, str]:
    """What identifies "the same issue" across models and splits: monitor, kind, label."""
    return (fact.monitor, fact.kind, fact.label or "")


def issue_distance(fact: IssueFact) -> float | None:
    """Mean |measured - reference| over the numeric keys a fact reports on both sides (None: none)."""
    gaps = []
    for key, value in fact.measured.items():
        ref = fact.reference.get(key)
        if isinstance(value, bool) or isinstance(ref, bool):
            continue
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)) and math.isfinite(value) and math.isfinite(ref):
            gaps.append(abs(float(value) - float(ref)))
    return float(np.mean(gaps)) if gaps else None


def _blocks(cannot: IssueFact, fact: IssueFact) -> bool:
    """Whether a ``cannot_assess`` fact on the treated label makes ``fact`` unverifiable.

    The validity monitor's informational kind lists what it skipped (``evidence.skipped``: e.g.
    recall and AUROC comparisons with too few positives, "calibration still checked"; or, without
    positives, everything but the threshold displacement); it blocks only those, and a fact that
    fired on a skipped criterion. A ``cannot_assess`` without that list (no negatives) blocks all.
    """
    skipped = cannot.evidence.get("skipped")
    if not isinstance(skipped, list):
        return True
    if fact.kind in skipped or fact.monitor in skipped:
        return True
    # A criterion the verify split cannot re-check (e.g. ECE without positives) blocks the fact.
    criteria = fact.evidence.get("criteria")
    return isinstance(criteria, list) and any(f"{fact.kind}.{c}" in skipped for c in criteria)


def verify_treatment(
    *,
    fact: IssueFact,
    intervention: str,
    before_bundle: Bundle,
    after_bundle: Bundle,
    before: FeatureSet,
    after: FeatureSet,
    monitor_fn: MonitorFn,
    acceptance: Acceptance,
    parent: Bundle | None = None,
    parent_data: FeatureSet | None = None,
    facts_before: list[IssueFact] | None = None,
    seed: int = 0,
    candidate_k: int = 1,
    cluster: IssueFact | None = None,
    reported: ReportedViews | None = None,
) -> VerifyResult:
    """Judge ``after_bundle`` against ``before_bundle`` on the verify split (``before``/``after`` rows).

    ``facts_before`` (all monitors on the verify split under the current model) may be passed in
    when the caller already has them; it is the baseline for "new issues". ``cluster`` is an FP-cluster
    fact on the same label (a shortcut whose symptom ``fact`` is): the treatment is then judged on the
    images outside the cluster as well. ``reported`` (a ``reported_fp`` fact: the reported images and the
    fit split under both models) adds :func:`engine.triage.correction.reported_checks`. ``seed`` (the run's) and
    the fact id seed the intervals; ``candidate_k`` counts the candidates verified for the issue so
    far, this one included (its improvement is judged at the Bonferroni level).
    """
    if facts_before is None:
        facts_before = monitor_fn(before_bundle, before, parent, parent_data)
    facts_after = _facts_after(fact, before_bundle, after_bundle, before, after, monitor_fn, parent, parent_data,
                               facts_before)
    key = fact_key(fact)
    same_before = [f for f in facts_before if fact_key(f) == key]
    same_after = [f for f in facts_after if fact_key(f) == key]

    view = PairedView(before_bundle, after_bundle, before, after, seed)
    # (a) the issue itself, and whether its improvement is beyond noise
    checks = [_issue_check(fact, facts_after, same_before, same_after, acceptance),
              improvement_check(fact, view, acceptance, candidate_k)]
    # (b) the target label's own operating point
    if fact.label is not None and (target_moved(view, fact.label) or fact.kind in ("fp_cluster", "reported_fp")
                                   or intervention == "zeroing"):
        checks += operating_point_checks(view, fact.label, acceptance)
    if fact.kind == "fp_cluster" and fact.label is not None:
        if acceptance.min_fp_removed_share is not None:
            checks.append(cluster_check(fact, view, acceptance.min_fp_removed_share))
        checks += clean_image_checks(fact, view, acceptance)
    elif cluster is not None:  # a symptom of a shortcut: its treatment must not learn the artefact either
        checks += clean_image_checks(cluster, view, acceptance)
    if fact.kind == "reported_fp" and fact.label is not None and reported is not None:
        checks += reported_checks(fact, view, reported, acceptance)
    # (c) collateral damage
    m_before = split_metrics(before_bundle, before)
    m_after = split_metrics(after_bundle, after)
    checks.append(_other_labels_check(fact, m_before, m_after, acceptance))
    checks.append(noninferiority_check(fact, view, acceptance))
    checks.append(_new_issues_check(key, facts_before, facts_after, acceptance))

    return VerifyResult(
        passed=all(c["passed"] for c in checks),
        checks=checks,
        before=m_before,
        after=m_after,
        facts_before=[dict(f.model_dump(mode="json"), fact_id=f.fact_id) for f in same_before],
        facts_after=[dict(f.model_dump(mode="json"), fact_id=f.fact_id) for f in same_after],
    )


def _facts_after(fact: IssueFact, before_bundle: Bundle, after_bundle: Bundle, before: FeatureSet, after: FeatureSet,
                 monitor_fn: MonitorFn, parent: Bundle | None, parent_data: FeatureSet | None,
                 facts_before: list[IssueFact]) -> list[IssueFact]:
    """All monitors' facts on the verify split under the treated model.

    Only labels whose outputs changed can have new facts; the treated label is always re-checked.
    """
    changed = changed_labels(before_bundle, after_bundle, before, after)
    if changed is None:
        return monitor_fn(after_bundle, after, parent, parent_data)
    keep = sorted(set(changed) | ({fact.label} if fact.label else set()))
    facts_after = monitor_fn(after_bundle, after, parent, parent_data, labels=keep)
    # Unchanged labels keep their facts (identical inputs give identical facts).
    redo = set(keep)
    return [f for f in facts_after if f.label is None or f.label in redo] + \
           [f for f in facts_before if f.label is not None and f.label not in redo]


def _issue_check(fact: IssueFact, facts_after: list[IssueFact], same_before: list[IssueFact],
                 same_after: list[IssueFact], acceptance: Acceptance) -> dict[str, Any]:
    """Whether the issue went away (or improved enough). "Not detected" only counts where the label
    can be assessed at all."""
    where = f"{fact.kind} ({fact.monitor}) on {fact.label or 'the model'}"
    unassessable = [f for f in facts_after if f.kind == "cannot_assess" and fact.label is not None
                    and f.label == fact.label and _blocks(f, fact)]
    if unassessable:
        return _check("issue_assessable", False, True, False,
                      f"{where} cannot be verified on the verify split: {unassessable[0].message}")
    if not same_after:
        return _check("issue_gone", 0, 0, True, f"{where} is no longer detected on the verify split")
    if acceptance.min_improvement is None:
        return _check("issue_gone", len(same_after), 0, False,
                      f"{where} is still detected on the verify split: {same_after[0].message}")
    d_before = issue_distance(same_before[0]) if same_before else None
    d_after = issue_distance(same_after[0])
    if d_before is None or d_after is None or d_before <= 0:
        improvement = None
        detail = (f"{where} is still detected and its improvement cannot be measured "
                  f"(distance before {d_before}, after {d_after})")
    else:
        improvement = 1.0 - d_after / d_before
        detail = (f"{where} is still detected; distance from reference {d_before:.4g} -> {d_after:.4g} "
                  f"({improvement:+.1%})")
    ok = improvement is not None and improvement >= acceptance.min_improvement
    return _check("issue_improved", improvement, acceptance.min_improvement, ok, detail)


def _other_labels_check(fact: IssueFact, m_before: dict[str, dict[str, Any]], m_after: dict[str, dict[str, Any]],
                        acceptance: Acceptance) -> dict[str, Any]:
    """The largest AUROC drop on a label other than the treated one."""
    worst_label, worst_drop = None, 0.0
    for name, row in m_before.items():
        if name == fact.label:
            continue
        a, b = row["auroc"], m_after.get(name, {}).get("auroc")
        if a is None or b is None:
            continue
        drop = a - b
        if worst_label is None or drop > worst_drop:
            worst_label, worst_drop = name, drop
    if worst_label is None:
        return _check("other_labels_auroc_drop", None, acceptance.max_other_auroc_change, True,
                      "no other label has an assessable AUROC on the verify split")
    return _check(
        "other_labels_auroc_drop", round(float(worst_drop), 12), acceptance.max_other_auroc_change,
        worst_drop <= acceptance.max_other_auroc_change + 1e-12,
        f"largest AUROC drop on another label: {worst_label} {m_before[worst_label]['auroc']:.4f} -> "
        f"{m_after[worst_label]['auroc']:.4f}")


def _new_issues_check(key: tuple[str, str, str], facts_before: list[IssueFact], facts_after: list[IssueFact],
                      acceptance: Acceptance) -> dict[str, Any]:
    """Actionable issues the treatment raised that were not there before (the treated issue aside)."""
    before_keys = {fact_key(f) for f in facts_before if f.actionable}
    new = sorted({fact_key(f) for f in facts_after if f.actionable and fact_key(f) not in before_keys and fact_key(f) != key})
    return _check("new_issues", len(new), acceptance.max_new_issues, len(new) <= acceptance.max_new_issues,
                  "new actionable issues: " + (", ".join(f"{k}/{lbl or 'model'}" for _, k, lbl in new) or "none"))
