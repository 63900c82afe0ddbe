"""Statistically aware acceptance: the verify-split checks that ask whether a change is beyond noise.

``verify.py`` asks "is the issue gone, is anything else broken" on point estimates. A verify split
of 100-200 images with a handful of positives per label, which also chose among up to three
candidates, needs more; these checks add it, each with its interval (from :mod:`model.paired`,
seeded from the run seed and the fact id, so records stay byte-identical):

* **The target label's own operating point** (every treatment that moved its threshold or its
  logits): ``tp_lost`` (true positives lost, at most ``max_tp_lost``, whatever the issue kind) and
  ``target_sensitivity`` (Wilson interval of the treated sensitivity; fails when the whole interval
  lies below the policy's ``fixed_sensitivity`` target).
* **improvement_significant**: a per-kind paired statistic whose interval must exclude "no change"
  (lower bound of the gain > 0). The k-th candidate tried for an issue is judged at level
  ``1 - (1 - confidence) / k`` (Bonferroni over the candidates tried so far). Per kind:

  - ``auroc_drop``: the target AUROC change (paired bootstrap);
  - ``recall_collapse``: the sensitivity change over the same positives (paired bootstrap);
  - ``fp_cluster``: the share of the cluster's verify-split false positives removed (Wilson);
  - ``calibration_drift``: the measure the monitor fired on (``evidence.criteria``), the first of:
    ``threshold_displacement`` -> the reduction of the distance between the false-positive rate at
    the operating point and the reference's (over the negatives); ``operating_point`` (or a fact
    without criteria) -> the gain of Youden's J at the deployed threshold; ``ece`` -> the ECE
    reduction (plain ECE, both models on the same rows);
  - ``compression_fidelity``: deterministic (the treated model's logits against the parent's on
    the same images; nothing to resample), judged by the monitor's own criterion;
  - any other kind: no statistic defined; passes, recorded as such.

  A statistic over positives needs ``min_positives`` of them (the policy's
  ``monitors.min_comparison_positives``: a percentile bootstrap over two positives that both
  flipped claims certainty). Where it cannot be estimated the check fails as "cannot be shown":
  the change goes to a human instead of being accepted on noise.
* **other_labels_noninferior**: the pooled mean AUROC change over the other labels
  (``paired_mean_auroc_delta``) must have its lower bound >= -``max_other_auroc_change``. Labels
  whose logits are bit-identical contribute exactly 0.
* **Shortcuts** (``fp_cluster``): the cluster's members carry the artefact, so the verify images
  outside the cluster stand in for "without it": there the target AUROC change may not be
  significantly below -``max_other_auroc_change`` (``clean_target_auroc``) and specificity at the
  operating point may not fall significantly (``clean_target_specificity``: the paired change's
  upper bound < 0 fails), so a head that learned the artefact in reverse is rejected. A treatment
  of the shortcut's symptoms (another kind on a label with an FP cluster) gets the same two checks
  against that cluster (``verify_treatment(cluster=...)``).

Harm checks use the policy's ``confidence`` as it is (a wider interval would let more harm through);
only the improvement, where a wider interval is stricter, is corrected for the candidates tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.facts import IssueFact
from interventions.attribution import evidence_members, truth_index
from model.bundle import Bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.metrics import expected_calibration_error
from model.paired import (
    Interval,
    paired_auroc_delta,
    paired_mean_auroc_delta,
    paired_rate_delta,
    paired_statistic,
    paired_youden_delta,
    wilson_interval,
)

__all__ = [
    "Column",
    "PairedView",
    "candidate_level",
    "check",
    "clean_image_checks",
    "cluster_check",
    "improvement_check",
    "noninferiority_check",
    "operating_point_checks",
    "target_moved",
]


def check(name: str, value: Any, limit: Any, passed: bool, detail: str, **extra: Any) -> dict[str, Any]:
    """One verification check: ``{name, value, limit, passed, detail}`` (plus interval fields)."""
    return {"name": name, "value": value, "limit": limit, "passed": bool(passed), "detail": detail, **extra}


def _stat_check(name: str, iv: Interval, limit: Any, passed: bool, detail: str, **extra: Any) -> dict[str, Any]:
    """A check carrying its interval: estimate as ``value``, ``low``/``high`` at ``level``, ``n``,
    ``method`` and, when it cannot be estimated, the ``reason``."""
    return check(name, iv.estimate, limit, passed, detail, low=iv.low, high=iv.high, level=iv.level, n=iv.n,
                 method=iv.method, reason=iv.reason, **extra)


def candidate_level(confidence: float, k: int) -> float:
    """The level the k-th candidate tried for an issue is judged at (Bonferroni over the k tried)."""
    return round(1.0 - (1.0 - confidence) / max(int(k), 1), 12)


@dataclass(frozen=True)
class Column:
    """One label on the verify split, before and after: truth, probabilities, decisions at the thresholds."""

    y: np.ndarray  # bool
    p_before: np.ndarray
    p_after: np.ndarray
    pred_before: np.ndarray  # bool: probability >= threshold
    pred_after: np.ndarray

    def rows(self, idx: np.ndarray) -> Column:
        return Column(self.y[idx], self.p_before[idx], self.p_after[idx], self.pred_before[idx],
                      self.pred_after[idx])


@dataclass(frozen=True)
class PairedView:
    """The verify split under the current and the treated model, and the seed of the run."""

    before_bundle: Bundle
    after_bundle: Bundle
    before: FeatureSet
    after: FeatureSet
    seed: int = 0

    def column(self, label: str) -> Column | None:
        """``label``'s column (None: not an output of both models, or no ground truth for it)."""
        if label not in CHEXNET_LABELS or label not in self.before_bundle.labels or label not in self.after_bundle.labels:
            return None
        kb, ka = self.before_bundle.labels.index(label), self.after_bundle.labels.index(label)
        pb, pa = np.asarray(self.before.probs)[:, kb], np.asarray(self.after.probs)[:, ka]
        return Column(self.before.labels[:, truth_index(label)].astype(bool), pb, pa,
                      pb >= self.before_bundle.meta.thresholds[kb], pa >= self.after_bundle.meta.thresholds[ka])

    def seed_for(self, fact: IssueFact, stream: int) -> list[int]:
        """Resampling seed of one check: the run seed, the fact id, the check's stream."""
        return [int(self.seed), int(fact.fact_id, 16), int(stream)]


def target_moved(view: PairedView, label: str | None) -> bool:
    """Whether the treatment moved ``label``'s operating point (its threshold, or its logits here)."""
    if label is None or label not in view.before_bundle.labels or label not in view.after_bundle.labels:
        return False
    kb, ka = view.before_bundle.labels.index(label), view.after_bundle.labels.index(label)
    return (view.before_bundle.meta.thresholds[kb] != view.after_bundle.meta.thresholds[ka]
            or not np.array_equal(view.before.logits[:, kb], view.after.logits[:, ka]))


# ------------------------------------------------------------------------------------------------
# The target label's operating point


def operating_point_checks(view: PairedView, label: str, acceptance: Any) -> list[dict[str, Any]]:
    """``tp_lost`` and ``target_sensitivity`` of the treated label on the verify split."""
    col = view.column(label)
    if col is None:
        return []
    tp_b, tp_a = int((col.pred_before & col.y).sum()), int((col.pred_after & col.y).sum())
    lost = tp_b - tp_a
    checks = [check("tp_lost", lost, acceptance.max_tp_lost, lost <= acceptance.max_tp_lost,
                    f"{label}: true positives {tp_b} -> {tp_a} on the verify split")]
    target = acceptance.sensitivity_target
    n_pos = int(col.y.sum())
    iv = wilson_interval(tp_a, n_pos, acceptance.confidence)
    if target is None:
        detail, passed = (f"{label}: no sensitivity target in the policy (threshold method is not fixed_sensitivity); "
                          f"treated sensitivity {iv.text()} on {n_pos} positive(s), recorded"), True
    elif not iv.estimable:
        detail, passed = f"{label}: no positives on the verify split, sensitivity cannot be estimated", True
    else:
        passed = iv.high >= target
        detail = (f"{label}: treated sensitivity {tp_a}/{n_pos} = {iv.text()} (Wilson, {acceptance.confidence:.0%}); "
                  + (f"the interval reaches the target {target:g}" if passed
                     else f"the whole interval lies below the target {target:g}"))
    checks.append(_stat_check("target_sensitivity", iv, target, passed, detail, positives=n_pos))
    return checks


# ------------------------------------------------------------------------------------------------
# FP clusters


def _cluster_counts(fact: IssueFact, view: PairedView) -> tuple[int, int] | str:
    """(false positives of the cluster on the verify split before, of them no longer positive), or why none."""
    label = fact.label or ""
    members = evidence_members(fact.evidence)
    rows = [i for i, n in enumerate(view.before.image_names) if n in members]
    if label in CHEXNET_LABELS:  # only the members that are true negatives can be false positives
        truth = truth_index(label)
        rows = [i for i in rows if view.before.labels[i, truth] == 0]
    if not rows:
        return f"{label}: none of the cluster's listed members is on the verify split"
    idx = np.asarray(rows)
    kb, ka = view.before_bundle.labels.index(label), view.after_bundle.labels.index(label)
    fp_before = np.asarray(view.before.probs)[idx, kb] >= view.before_bundle.meta.thresholds[kb]
    fp_after = np.asarray(view.after.probs)[idx, ka] >= view.after_bundle.meta.thresholds[ka]
    if not fp_before.any():
        return f"{label}: the cluster's members on the verify split are not false positives here"
    return int(fp_before.sum()), int((fp_before & ~fp_after).sum())


def cluster_check(fact: IssueFact, view: PairedView, min_share: float) -> dict[str, Any]:
    """Share of the FP cluster's members on the verify split that the treatment turned negative.

    The monitor named the cluster's images on the audited data (``evidence.member_ids``); those on
    the verify split were never seen by the treatment. Re-detecting the cluster on the verify half
    alone is no substitute: with few true positives there the monitor may not assess it at all.
    """
    counts = _cluster_counts(fact, view)
    if isinstance(counts, str):
        return check("cluster_fps_removed", None, min_share, True, counts)
    n_before, removed = counts
    share = removed / n_before
    return check("cluster_fps_removed", round(share, 6), min_share, share >= min_share,
                 f"{fact.label}: {removed} of the cluster's {n_before} false positives on the verify split are no "
                 f"longer predicted positive ({share:.0%}; at least {min_share:.0%} required)")


# ------------------------------------------------------------------------------------------------
# The improvement


def _too_few(n_pos: int, need: int, level: float, n: int, method: str) -> Interval | None:
    if n_pos >= need:
        return None
    return Interval(None, None, None, level, n, method,
                    f"{n_pos} positive(s) on the verify split; a bootstrap interval needs at least {need}")


def _youden(y: np.ndarray, pred: np.ndarray) -> float:
    """Youden's J of boolean decisions (for the record's text; the interval is ``paired_youden_delta``'s)."""
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    return float((pred & y).sum() / pos + (~pred & ~y).sum() / neg - 1.0)


_Gain = Callable[[IssueFact, Column, Any, float, list[int]], tuple[Interval, str]]


def _auroc_gain(fact: IssueFact, col: Column, acc: Any, level: float, seed: list[int]) -> tuple[Interval, str]:
    n_pos = int(col.y.sum())
    iv = _too_few(n_pos, acc.min_positives, level, len(col.y), "paired_bootstrap") or paired_auroc_delta(
        col.y, col.p_before, col.p_after, level=level, n_boot=acc.bootstrap_resamples, seed=seed)
    return iv, f"{fact.label} AUROC change (paired bootstrap, {n_pos} positives)"


def _sensitivity_gain(fact: IssueFact, col: Column, acc: Any, level: float, seed: list[int]) -> tuple[Interval, str]:
    pos = col.y
    n_pos = int(pos.sum())
    iv = _too_few(n_pos, acc.min_positives, level, n_pos, "paired_bootstrap") or paired_rate_delta(
        col.pred_before[pos], col.pred_after[pos], level=level, n_boot=acc.bootstrap_resamples, seed=seed)
    return iv, (f"{fact.label} sensitivity change over the same {n_pos} positives "
                f"({int(col.pred_before[pos].sum())} -> {int(col.pred_after[pos].sum())} detected)")


def _calibration_gain(fact: IssueFact, col: Column, acc: Any, level: float, seed: list[int]) -> tuple[Interval, str]:
    criteria = fact.evidence.get("criteria")
    criteria = criteria if isinstance(criteria, list) else []
    ref = fact.measured.get("reference_fp_rate")
    y, n_boot = col.y, acc.bootstrap_resamples
    if "threshold_displacement" in criteria and isinstance(ref, (int, float)):
        neg = ~y
        fb, fa = col.pred_before[neg].astype(np.float64), col.pred_after[neg].astype(np.float64)
        iv = paired_statistic(lambda r: abs(fb[r].mean() - ref) - abs(fa[r].mean() - ref), len(fb), level=level,
                              n_boot=n_boot, seed=seed)
        return iv, (f"{fact.label}: reduction of the false-positive rate's distance from the reference rate "
                    f"{ref:.3f} (threshold displacement; FP rate {fb.mean():.3f} -> {fa.mean():.3f} on "
                    f"{len(fb)} negatives, paired bootstrap)")
    if criteria == ["ece"]:
        pb, pa = col.p_before, col.p_after
        iv = paired_statistic(lambda r: expected_calibration_error(y[r], pb[r]) - expected_calibration_error(y[r], pa[r]),
                              len(y), level=level, n_boot=n_boot, seed=seed)
        return iv, f"{fact.label}: ECE reduction (paired bootstrap over {len(y)} images)"
    n_pos = int(y.sum())
    iv = _too_few(n_pos, acc.min_positives, level, len(y), "paired_bootstrap") or paired_youden_delta(
        y, col.pred_before, col.pred_after, level=level, n_boot=n_boot, seed=seed)
    return iv, (f"{fact.label}: gain of Youden's J at the deployed threshold (operating point; "
                f"{_youden(y, col.pred_before):.3f} -> {_youden(y, col.pred_after):.3f}, {n_pos} positives, "
                "paired bootstrap)")


_GAINS: dict[str, _Gain] = {"auroc_drop": _auroc_gain, "recall_collapse": _sensitivity_gain,
                            "calibration_drift": _calibration_gain}


def improvement_check(fact: IssueFact, view: PairedView, acceptance: Any, candidate_k: int) -> dict[str, Any]:
    """``improvement_significant``: the fact's per-kind statistic, its gain's interval excluding 0."""
    level = candidate_level(acceptance.confidence, candidate_k)
    extra = {"candidate_k": int(candidate_k)}
    where = f"{fact.kind} on {fact.label or 'the model'}"
    if fact.kind == "compression_fidelity":
        iv = Interval(None, None, None, level, len(view.before), "deterministic",
                      "the treated model's logits are compared with the parent's on the same images")
        return _stat_check("improvement_significant", iv, 0, True,
                           f"{where}: deterministic (logits against the parent's on the same images, nothing to "
                           "resample); judged by the monitor's own criterion", **extra)
    if fact.kind == "fp_cluster":
        counts = _cluster_counts(fact, view)
        if isinstance(counts, str):
            iv = Interval(None, None, None, level, 0, "wilson", counts)
            what = f"{fact.label}: share of the cluster's verify-split false positives removed (Wilson)"
        else:
            iv = wilson_interval(counts[1], counts[0], level)
            what = (f"{fact.label}: share of the cluster's {counts[0]} verify-split false positives removed "
                    f"({counts[1]}; Wilson)")
    else:
        gain = _GAINS.get(fact.kind)
        col = view.column(fact.label) if fact.label is not None else None
        if gain is None or col is None:
            iv = Interval(None, None, None, level, len(view.before), "none", f"no statistic defined for {fact.kind}")
            return _stat_check("improvement_significant", iv, 0, True,
                               f"{where}: no improvement statistic is defined for this kind; judged by the "
                               "monitor's own criterion, recorded", **extra)
        iv, what = gain(fact, col, acceptance, level, view.seed_for(fact, 1))
    return _judge_gain(iv, what, level, candidate_k, extra)


def _judge_gain(iv: Interval, what: str, level: float, k: int, extra: dict[str, Any]) -> dict[str, Any]:
    bonferroni = f"level {level:.4g}: candidate {k} for this issue, Bonferroni over the {k} tried"
    if not iv.estimable:
        return _stat_check("improvement_significant", iv, 0, False,
                           f"{what}: the improvement cannot be shown on the verify split ({iv.reason}); "
                           "left to a human rather than accepted on noise", **extra)
    passed = iv.low is not None and iv.low > 0
    return _stat_check("improvement_significant", iv, 0, passed,
                       f"{what}: {iv.text(4)} ({bonferroni}); "
                       + ("the interval excludes no change" if passed else "the interval does not exclude no change"),
                       **extra)


# ------------------------------------------------------------------------------------------------
# Collateral and shortcuts


def noninferiority_check(fact: IssueFact, view: PairedView, acceptance: Any) -> dict[str, Any]:
    """``other_labels_noninferior``: pooled mean AUROC change of the other labels, lower bound >= -margin."""
    names = [n for n in view.after_bundle.labels if n != fact.label and view.column(n) is not None]
    margin = acceptance.max_other_auroc_change
    cols = [view.column(n) for n in names]
    if cols:
        y = np.stack([c.y for c in cols], axis=1)  # type: ignore[union-attr]
        iv = paired_mean_auroc_delta(y, np.stack([c.p_before for c in cols], axis=1),  # type: ignore[union-attr]
                                     np.stack([c.p_after for c in cols], axis=1),  # type: ignore[union-attr]
                                     level=acceptance.confidence, n_boot=acceptance.bootstrap_resamples,
                                     seed=view.seed_for(fact, 2))
    else:
        iv = Interval(None, None, None, acceptance.confidence, len(view.before), "paired_bootstrap_mean",
                      "no other label")
    if not iv.estimable:
        return _stat_check("other_labels_noninferior", iv, -margin, True,
                           f"pooled AUROC change of the other labels cannot be estimated ({iv.reason}); nothing to compare")
    passed = iv.low is not None and iv.low >= -margin - 1e-12
    return _stat_check("other_labels_noninferior", iv, -margin, passed,
                       f"mean AUROC change over the {len(names)} other labels: {iv.text(4)}; lower bound "
                       + (f"within the tolerance -{margin:g}" if passed else f"below the tolerance -{margin:g}"))


def clean_image_checks(fact: IssueFact, view: PairedView, acceptance: Any) -> list[dict[str, Any]]:
    """The target label on the verify images outside the FP cluster (those without the shortcut's artefact)."""
    col = view.column(fact.label) if fact.label is not None else None
    if col is None:
        return []
    members = evidence_members(fact.evidence)
    rows = np.array([i for i, n in enumerate(view.before.image_names) if n not in members], dtype=np.int64)
    where = (f"{len(rows)} verify images outside the cluster" if members
             else f"all {len(rows)} verify images (the fact lists no cluster members)")
    clean = col.rows(rows)
    margin, conf, n_boot = acceptance.max_other_auroc_change, acceptance.confidence, acceptance.bootstrap_resamples
    iv = paired_auroc_delta(clean.y, clean.p_before, clean.p_after, level=conf, n_boot=n_boot,
                            seed=view.seed_for(fact, 3))
    ok = not iv.estimable or (iv.high is not None and iv.high >= -margin - 1e-12)
    auroc = _stat_check("clean_target_auroc", iv, -margin, ok,
                        f"{fact.label} AUROC change on {where}: {iv.text(4)}; "
                        + ("not significantly below" if ok else "significantly below") + f" -{margin:g}")
    neg = ~clean.y
    spec = paired_rate_delta(~clean.pred_before[neg], ~clean.pred_after[neg], level=conf, n_boot=n_boot,
                             seed=view.seed_for(fact, 4))
    ok = not spec.estimable or (spec.high is not None and spec.high >= 0)
    sb, sa = float((~clean.pred_before[neg]).mean()) if neg.any() else None, \
        float((~clean.pred_after[neg]).mean()) if neg.any() else None
    before_after = "" if sb is None or sa is None else f" ({sb:.3f} -> {sa:.3f})"
    specificity = _stat_check("clean_target_specificity", spec, 0, ok,
                              f"{fact.label} specificity change on the {int(neg.sum())} negatives among {where}"
                              f"{before_after}: {spec.text(4)}; " + ("not a significant fall" if ok else "a significant fall"))
    return [auroc, specificity]
