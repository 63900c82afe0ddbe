"""Verification of a correction of reported false positives (``reported_fp`` facts).

Beyond the checks every treatment gets (the issue gone, true positives lost on the verify split,
other labels' AUROC, new issues), a correction answers a reader's report, so the record says, per
reported image, how far its probability moved and whether it crossed below the threshold, and adds:

* ``reported_prob_fell``: every reported image's probability fell (recorded per image);
* ``fit_tp_lost``: true positives lost on the fit split (the treatment learnt there; a fix that buys
  the report with a real finding is refused there as well as on the verify split);
* ``target_auroc_change``: the label's verify AUROC may not fall by more than ``max_other_auroc_change``;
* ``other_labels_logits_identical``: every other label's logits bit-identical on every verify image
  and every reported image — computed (``np.array_equal`` per label), not assumed from the
  intervention's kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.facts import IssueFact
from engine.triage.acceptance import PairedView, check
from interventions.attribution import evidence_members, head_logits
from model.features import FeatureSet
from model.metrics import auroc

__all__ = ["ReportedViews", "reported_checks", "reported_images"]


@dataclass(frozen=True)
class ReportedViews:
    """The reported images and the fit split under the current and the treated model."""

    reported_before: FeatureSet
    reported_after: FeatureSet
    fit_before: FeatureSet
    fit_after: FeatureSet


def reported_images(fact: IssueFact, data: FeatureSet) -> np.ndarray:
    """Rows of ``data`` holding the images ``fact`` reports as still positive (its ``member_ids``)."""
    members = evidence_members(fact.evidence)
    return np.array([i for i, n in enumerate(data.image_names) if n in members], dtype=int)


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    value = auroc(y.astype(int), p)
    return None if np.isnan(value) else float(value)


def _images_check(label: str, rep: PairedView) -> dict[str, Any]:
    col = rep.column(label)
    kb = rep.before_bundle.labels.index(label)
    ka = rep.after_bundle.labels.index(label)
    thr_b, thr_a = float(rep.before_bundle.meta.thresholds[kb]), float(rep.after_bundle.meta.thresholds[ka])
    images = [{"image": n, "prob_before": float(pb), "prob_after": float(pa), "delta_prob": float(pa - pb),
               "threshold_before": thr_b, "threshold_after": thr_a, "crossed": bool(pb >= thr_b and pa < thr_a)}
              for n, pb, pa in zip(rep.before.image_names, col.p_before, col.p_after, strict=True)]
    crossed = sum(img["crossed"] for img in images)
    fell = all(img["delta_prob"] < 0 or img["crossed"] for img in images)
    detail = "; ".join(f"{img['image']}: {img['prob_before']:.4f} -> {img['prob_after']:.4f} "
                       f"(Δ {img['delta_prob']:+.4f}, {'below' if img['crossed'] else 'not below'} the threshold "
                       f"{thr_a:.4f})" for img in images)
    return check("reported_prob_fell", crossed, len(images), fell and bool(images),
                 f"{label}: {crossed} of {len(images)} reported image(s) crossed below the threshold; {detail}",
                 images=images)


def reported_checks(fact: IssueFact, view: PairedView, views: ReportedViews, acceptance: Any) -> list[dict[str, Any]]:
    """The checks of the module docstring, for ``fact``'s label."""
    label = fact.label or ""
    before_b, after_b = view.before_bundle, view.after_bundle
    rep = PairedView(before_b, after_b, views.reported_before, views.reported_after, view.seed)
    fit = PairedView(before_b, after_b, views.fit_before, views.fit_after, view.seed)
    checks = [_images_check(label, rep)] if len(views.reported_before) else [
        check("reported_prob_fell", 0, 0, False, f"{label}: no reported image to judge")]
    fcol = fit.column(label)
    tp_b, tp_a = int((fcol.pred_before & fcol.y).sum()), int((fcol.pred_after & fcol.y).sum())
    checks.append(check("fit_tp_lost", tp_b - tp_a, acceptance.max_tp_lost, tp_b - tp_a <= acceptance.max_tp_lost,
                        f"{label}: true positives {tp_b} -> {tp_a} on the fit split"))
    vcol = view.column(label)
    a_b, a_a = _auroc(vcol.y, vcol.p_before), _auroc(vcol.y, vcol.p_after)
    if a_b is None or a_a is None:
        checks.append(check("target_auroc_change", None, -acceptance.max_other_auroc_change, True,
                            f"{label}: AUROC cannot be estimated on the verify split (one class); not judged",
                            reason="one class"))
    else:
        change = round(a_a - a_b, 12)
        checks.append(check("target_auroc_change", change, -acceptance.max_other_auroc_change,
                            change >= -acceptance.max_other_auroc_change - 1e-12,
                            f"{label}: verify AUROC {a_b:.4f} -> {a_a:.4f} ({change:+.4f}; tolerance "
                            f"{acceptance.max_other_auroc_change:g})"))
    checks.append(_identical_check(label, view, rep))
    return checks


def _logit_pair(v: PairedView) -> tuple[np.ndarray, np.ndarray]:
    """Both models' logits on the same rows by the same computation: over the same cached features, both
    heads (the cache's logits came from a full forward pass, whose float rounding may differ); otherwise
    the two views' own logits."""
    if len(v.before) and np.array_equal(v.before.features, v.after.features):
        return head_logits(v.before_bundle, v.before.features), head_logits(v.after_bundle, v.after.features)
    return v.before.logits, v.after.logits


def _identical_check(label: str, view: PairedView, rep: PairedView) -> dict[str, Any]:
    """Every other label's logits, compared bit for bit on the verify images and the reported ones."""
    changed: list[str] = []
    n_images = len(view.before) + len(rep.before)
    pairs = [_logit_pair(v) for v in (view, rep)]
    for name in view.before_bundle.labels:
        if name == label:
            continue
        if name not in view.after_bundle.labels:
            changed.append(name)
            continue
        kb, ka = view.before_bundle.labels.index(name), view.after_bundle.labels.index(name)
        same = all(np.array_equal(lb[:, kb], la[:, ka]) for lb, la in pairs)
        if not same or view.before_bundle.meta.thresholds[kb] != view.after_bundle.meta.thresholds[ka]:
            changed.append(name)
    n_other = len(view.before_bundle.labels) - 1
    detail = (f"checked: the logits and thresholds of all {n_other} other labels are bit-identical on {n_images} "
              "image(s) (the verify split and the reported images)" if not changed else
              f"other labels changed: {', '.join(changed)}")
    return check("other_labels_logits_identical", len(changed), 0, not changed, detail, images_checked=n_images,
                 labels_checked=n_other)
