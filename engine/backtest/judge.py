"""Judge one treated model on the holdout part triage never saw: detected, healed, harmed.

Definitions (the backtest report quotes them):

* **detected** — a fact on the AUDIT part whose kind and label match the fault's ground truth
  (``fault.json`` ``expected_issues``).
* **healed** — the model changed; every ground-truth fact that the policy's own monitors raise on
  the faulted HOLDOUT under the untreated model is gone under the treated one; and on the same
  holdout images without the fault the treated model is not worse (below). Where no ground-truth
  fact fires on the holdout before treatment, healing cannot be shown: False, with that reason.
* **harmed** — on the faulted holdout, some label's AUROC fell by more than the policy's
  ``max_other_auroc_change`` *and* its paired-bootstrap interval lies below zero (material and
  beyond noise); or a treated label got worse at its operating point: its Youden's J fell with
  the interval below zero, or — where the policy sets the label a sensitivity target
  (``fixed_sensitivity``) — its sensitivity fell beyond noise to below that target (the Wilson
  interval of the new sensitivity lies under it). A drift that inflated the scores inflated the
  sensitivity too, so a lost true positive alone is not harm: the trade is judged on J.
* **worse on clean images** — the same AUROC test on the clean holdout for every fault; for faults
  that touch only some images or only labels (a shortcut's artefact, label noise) also the treated
  labels' operating point (J), since there clean images are the population the model must serve.
  A scanner shift or blur touches every image: there the clean view checks ranking only.

Every interval is paired (same images under both models) from :mod:`model.paired`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.core.facts import IssueFact
from engine.triage.run import default_monitor_fn
from engine.triage.verify import treated_features
from interventions.attribution import truth_index
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from model.metrics import sigmoid
from model.paired import (
    Interval,
    paired_auroc_delta,
    paired_rate_delta,
    paired_youden_delta,
    wilson_interval,
)
from rules.policy import Policy

__all__ = ["OPERATING_POINT_ON_CLEAN", "HoldoutViews", "ground_truth_facts", "holdout_views", "judge"]

#: Fault families whose clean images are part of the served population (operating point judged there too).
OPERATING_POINT_ON_CLEAN = ("shortcut", "label_noise", "prevalence")


@dataclass(frozen=True)
class HoldoutViews:
    """One model's outputs on the faulted and the clean holdout (same image order as the untreated views)."""

    faulted: FeatureSet
    clean: FeatureSet


def _same_backbone(a: Bundle, b: Bundle) -> bool:
    """Only the classifier differs (cached features stay valid)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    if set(sa) != set(sb):
        return False
    return all(k.startswith("classifier") or torch.equal(sa[k], sb[k]) for k in sa)


def _view(after: Bundle, before: Bundle, before_fs: FeatureSet, ds: NIHDataset) -> FeatureSet:
    """``before_fs``'s rows under ``after`` (the verification's own route: cached features where they hold)."""
    return treated_features(after, _same_backbone(after, before), before_fs, ds)


def holdout_views(after: Bundle, before: Bundle, before_views: HoldoutViews | None, holdout: NIHDataset,
                  holdout_clean: NIHDataset) -> HoldoutViews:
    """``after``'s views of both holdouts; ``before_views`` None computes the untreated model's own."""
    if before_views is None:
        return HoldoutViews(extract_features(after, holdout), extract_features(after, holdout_clean))
    return HoldoutViews(_view(after, before, before_views.faulted, holdout),
                        _view(after, before, before_views.clean, holdout_clean))


def ground_truth_facts(facts: Sequence[IssueFact], expected: Sequence[dict[str, Any]]) -> list[IssueFact]:
    """The facts whose kind and label the fault's ``expected_issues`` name."""
    wanted = {(e["kind"], lbl) for e in expected for lbl in e.get("labels", [])}
    return [f for f in facts if (f.kind, f.label) in wanted]


def _key(f: IssueFact) -> str:
    return f"{f.kind}:{f.label or '-'}"


def _seed(*parts: str) -> list[int]:
    return [zlib.crc32(p.encode()) for p in parts]


def _label_rows(bundle: Bundle) -> list[tuple[int, str, int]]:
    return [(k, n, truth_index(n)) for k, n in enumerate(bundle.labels) if n in CHEXNET_LABELS]


def _iv(iv: Interval) -> dict[str, Any]:
    return iv.to_dict()


def _significantly_below(iv: Interval, margin: float) -> bool:
    return iv.estimable and iv.high is not None and iv.high < 0 and iv.estimate < -margin  # type: ignore[operator]


def _where(tag: str) -> str:
    return "holdout" if tag == "holdout" else f"{tag} holdout"


def _sensitivity_target(policy: Policy, label: str) -> float | None:
    """The label's sensitivity target where its threshold policy sets one (``fixed_sensitivity``)."""
    params = policy.params_for("threshold", label)
    if params.get("method") == "fixed_sensitivity" and params.get("target") is not None:
        return float(params["target"])
    return None


def _auroc_changes(before: Bundle, after: Bundle, fb: FeatureSet, fa: FeatureSet, policy: Policy, tag: str,
                   n_boot: int) -> tuple[dict[str, Any], list[str]]:
    """Per-label paired AUROC change; the labels whose drop is material and beyond noise."""
    rows, worse = {}, []
    for k, name, t in _label_rows(before):
        ka = after.labels.index(name)
        iv = paired_auroc_delta(fb.labels[:, t], fb.logits[:, k], fa.logits[:, ka], n_boot=n_boot,
                                seed=_seed(tag, name))
        tol = float(policy.acceptance_for(name).max_other_auroc_change)
        rows[name] = {"auroc_delta": _iv(iv), "tolerance": tol}
        if _significantly_below(iv, tol):
            worse.append(f"{name} AUROC {iv.text()} on the {_where(tag)} (tolerance {tol:g})")
    return rows, worse


def _operating_point(before: Bundle, after: Bundle, fb: FeatureSet, fa: FeatureSet, labels: Sequence[str],
                     policy: Policy, tag: str, n_boot: int, *, sensitivity: bool) -> tuple[dict[str, Any], list[str]]:
    """Youden J (and, where no true positive may go, sensitivity) of the treated labels at their thresholds."""
    rows, worse = {}, []
    pb, pa = sigmoid(fb.logits), sigmoid(fa.logits)
    for name in labels:
        if name not in CHEXNET_LABELS or name not in before.labels:
            continue
        k, ka, t = before.labels.index(name), after.labels.index(name), truth_index(name)
        y = fb.labels[:, t].astype(bool)
        dec_b = pb[:, k] >= before.meta.thresholds[k]
        dec_a = pa[:, ka] >= after.meta.thresholds[ka]
        j = paired_youden_delta(y, dec_b, dec_a, n_boot=n_boot, seed=_seed(tag, name, "j"))
        sens = paired_rate_delta(dec_b[y], dec_a[y], n_boot=n_boot, seed=_seed(tag, name, "sens"))
        row = {"youden_delta": _iv(j), "sensitivity_delta": _iv(sens),
               "tp": [int((dec_b & y).sum()), int((dec_a & y).sum())],
               "fp": [int((dec_b & ~y).sum()), int((dec_a & ~y).sum())], "positives": int(y.sum())}
        rows[name] = row
        if _significantly_below(j, 0.0):
            worse.append(f"{name} Youden J {j.text()} at its operating point on the {_where(tag)}")
        target = _sensitivity_target(policy, name)
        if sensitivity and target is not None and _significantly_below(sens, 0.0):
            now = wilson_interval(int((dec_a & y).sum()), int(y.sum()))
            row["sensitivity_after"], row["sensitivity_target"] = now.to_dict(), target
            if now.high is not None and now.high < target:
                worse.append(f"{name} sensitivity fell to {now.text()} on the {_where(tag)}, below the policy's "
                             f"target {target:g} (TP {row['tp'][0]} -> {row['tp'][1]})")
    return rows, worse


def judge(*, before: Bundle, after: Bundle, fault_kind: str, expected: Sequence[dict[str, Any]],
          audit_facts: Sequence[IssueFact], treated_labels: Sequence[str], before_views: HoldoutViews,
          after_views: HoldoutViews, policy: Policy, n_boot: int = 1000) -> dict[str, Any]:
    """The verdict of one (scenario, policy) on the holdout; see the module docstring."""
    changed = after.content_hash() != before.content_hash()
    detected = ground_truth_facts(audit_facts, expected)
    out: dict[str, Any] = {"changed": changed, "detected": bool(detected),
                           "detected_facts": sorted({_key(f) for f in detected}), "treated_labels": list(treated_labels)}
    monitors = default_monitor_fn(policy)
    fired_before = sorted({_key(f) for f in ground_truth_facts(monitors(before, before_views.faulted), expected)})
    fired_after = (sorted({_key(f) for f in ground_truth_facts(monitors(after, after_views.faulted), expected)})
                   if changed else fired_before)
    auroc_rows, harm = _auroc_changes(before, after, before_views.faulted, after_views.faulted, policy, "holdout", n_boot)
    op_rows, op_harm = _operating_point(before, after, before_views.faulted, after_views.faulted, treated_labels,
                                        policy, "holdout", n_boot, sensitivity=True)
    clean_rows, clean_worse = _auroc_changes(before, after, before_views.clean, after_views.clean, policy, "clean",
                                             n_boot)
    clean_op: dict[str, Any] = {}
    if fault_kind in OPERATING_POINT_ON_CLEAN:
        clean_op, worse_op = _operating_point(before, after, before_views.clean, after_views.clean, treated_labels,
                                              policy, "clean", n_boot, sensitivity=False)
        clean_worse += worse_op
    harm_reasons = harm + op_harm
    out["harmed"] = bool(changed and harm_reasons)
    out["harm_reasons"] = harm_reasons if changed else []
    out["fault_facts_on_holdout"] = {"before": fired_before, "after": fired_after}
    if not expected:
        out["healed"], out["heal_reason"] = None, "clean control: nothing to heal"
    elif not changed:
        out["healed"], out["heal_reason"] = False, "the model did not change"
    elif not fired_before:
        out["healed"], out["heal_reason"] = False, "no ground-truth fact fires on the holdout before treatment"
    elif fired_after:
        out["healed"], out["heal_reason"] = False, f"still fires on the holdout: {', '.join(fired_after)}"
    elif clean_worse:
        out["healed"], out["heal_reason"] = False, "worse on clean holdout images: " + "; ".join(clean_worse)
    else:
        out["healed"], out["heal_reason"] = True, "the fault's facts are gone on the holdout and clean images are not worse"
    out["healed_share"] = (None if not fired_before else
                           round(1 - len(set(fired_after) & set(fired_before)) / len(fired_before), 6))
    out["holdout"] = {"n_faulted": len(before_views.faulted), "n_clean": len(before_views.clean),
                      "auroc": auroc_rows, "operating_point": op_rows,
                      "clean_auroc": clean_rows, "clean_operating_point": clean_op, "clean_worse": clean_worse}
    return out
