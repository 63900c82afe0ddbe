"""Operating-threshold recalibration: the cheapest treatment when ranking is intact.

A scanner or population shift often moves the logits of a label without changing their order
(AUROC intact, sensitivity/specificity at the stored threshold off). Re-fitting the label's
probability threshold on the *fit* split restores the operating point in well under a second,
and touches no weight, so cached features stay valid. Three ways to choose the point:

* ``youden`` (default): maximise sensitivity + specificity - 1;
* ``fixed_sensitivity`` with ``target`` in (0, 1]: the highest threshold whose sensitivity on the
  fit split is at least ``target`` (screening use);
* ``cost_weighted`` with ``fn_cost``/``fp_cost`` > 0: minimise ``fn_cost*FN + fp_cost*FP``.

``scope: label`` (default) changes only the fact's label; ``scope: all`` refits every label that
has both classes in the fit split.

Intercept recalibration. A scanner shift moves a label's logits; the calibration-drift monitor
then fires on the operating point *and* on the ECE. A new threshold alone restores the decisions
but leaves the displayed probabilities wrong, so the monitor would keep firing and the fix would
fail verification. When the fact says the probabilities drifted (its fired keys include
``calibration_drift.ece_increase``), the fact's label also gets a logit offset ``delta`` — the
maximum-likelihood intercept with the slope fixed at 1 on the fit split (mean predicted
probability = observed prevalence) — added to that label's classifier bias. One number per label,
monotone (ranking and AUROC unchanged), features untouched; the threshold is then chosen on the
recalibrated probabilities. Both steps are in the bundle's history (``shift_logit``,
``set_threshold``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from engine.core.errors import InterventionError
from engine.core.validation import LocatedError
from interventions.attribution import truth_index
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from model.labels import CHEXNET_LABELS
from model.metrics import confusion_at, expected_calibration_error, sigmoid, youden_threshold

__all__ = ["ThresholdIntervention", "fit_threshold", "fit_logit_offset", "METHODS", "ECE_KEY"]

METHODS = ("youden", "fixed_sensitivity", "cost_weighted")
#: The policy key a calibration-drift fact names when its probabilities (not only its operating
#: point) drifted; such facts also get an intercept recalibration.
ECE_KEY = "calibration_drift.ece_increase"
_EPS = 1e-6
#: Fewer fit-split positives than this make a fitted operating point (Youden, a fixed sensitivity or
#: a cost trade-off) a guess: it is set by a handful of ranks. A calibration-drift fact that reports
#: the reference false-positive rate then gets, whatever the method, the
#: threshold that restores that rate on the fit split's negatives alone: a scanner change moves
#: every score, and the negatives (the large class) show where the old operating point went.
MIN_YOUDEN_POSITIVES = 10


def reference_fp_rate(fact: Any, label: str) -> float | None:
    """The reference false-positive rate a calibration-drift fact on ``label`` reports, if any."""
    if fact.label != label:
        return None
    value = fact.measured.get("reference_fp_rate")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        return None
    return float(value)


def negatives_threshold(probs_negatives: np.ndarray, fp_rate: float) -> float:
    """Smallest threshold whose false-positive rate on these negatives is at most ``fp_rate``."""
    neg = np.sort(np.asarray(probs_negatives, dtype=np.float64))[::-1]
    allowed = int(math.floor(fp_rate * len(neg) + 1e-9))  # negatives that may stay at or above it
    if allowed >= len(neg):
        return _clip(float(neg[-1]))
    return _clip(float(np.nextafter(neg[allowed], np.inf)))


def fit_logit_offset(y: np.ndarray, logits: np.ndarray, *, max_iter: int = 100) -> float:
    """Maximum-likelihood ``delta`` of ``P(y) = sigmoid(logit + delta)`` (slope fixed at 1).

    At the optimum the mean predicted probability equals the prevalence. Newton's method on a
    strictly concave 1-D likelihood; needs both classes (else the optimum is at infinity).
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    if y.min() == y.max():
        raise InterventionError("a logit offset needs both positives and negatives in the fit split")
    delta = 0.0
    for _ in range(max_iter):
        p = sigmoid(x + delta)
        grad = float((p - y).sum())
        hess = float((p * (1 - p)).sum())
        if hess <= 1e-12:
            break
        step = max(-5.0, min(5.0, grad / hess))
        delta -= step
        if abs(step) < 1e-10:
            break
    return float(delta)


def _clip(t: float) -> float:
    return float(min(max(t, _EPS), 1.0 - _EPS))


def fit_threshold(y: np.ndarray, probs: np.ndarray, method: str = "youden", **params: Any) -> float:
    """Probability threshold for one label (predict positive when ``prob >= threshold``)."""
    y = np.asarray(y).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if y.all() or not y.any():
        raise InterventionError("a threshold needs both positives and negatives in the fit split")
    if method == "youden":
        return _clip(youden_threshold(y.astype(int), probs))
    if method == "fixed_sensitivity":
        target = float(params["target"])
        pos = np.sort(probs[y])[::-1]
        k = max(1, math.ceil(target * len(pos) - 1e-9))
        return _clip(float(pos[min(k, len(pos)) - 1]))
    if method == "cost_weighted":
        fn_cost, fp_cost = float(params["fn_cost"]), float(params["fp_cost"])
        order = np.argsort(-probs, kind="stable")
        p_sorted, y_sorted = probs[order], y[order]
        # Candidate thresholds: each distinct score (predict positive at and above it), plus "above all".
        last_of_run = np.r_[p_sorted[1:] != p_sorted[:-1], True]
        tp = np.cumsum(y_sorted)[last_of_run]
        fp = np.cumsum(~y_sorted)[last_of_run]
        thresholds = p_sorted[last_of_run]
        n_pos = int(y.sum())
        cost = fn_cost * (n_pos - tp) + fp_cost * fp
        cost_none = fn_cost * n_pos  # threshold above every score
        best = int(np.argmin(cost))  # first minimum = highest threshold among ties
        if cost_none <= cost[best]:
            return _clip(float(np.nextafter(p_sorted[0], np.inf)))
        return _clip(float(thresholds[best]))
    raise InterventionError(f"The 'method' parameter of threshold must be one of {', '.join(METHODS)}. "
                            f"Got {method!r} instead.")


class ThresholdIntervention(Intervention):
    """Refit per-label operating thresholds on the fit split (no weight changes)."""

    name = "threshold"
    treats = ("calibration_drift", "recall_collapse", "reported_fp")
    expected_time_s = 0.5
    classifier_only = True

    class Params(InterventionParams):
        """``params.threshold``: how the operating point is chosen (see the module docstring)."""

        method: Literal["youden", "fixed_sensitivity", "cost_weighted"] = "youden"
        target: float | None = Field(None, gt=0, le=1)
        fn_cost: float | None = Field(None, gt=0)
        fp_cost: float | None = Field(None, gt=0)
        scope: Literal["label", "all"] = "label"
        #: ``reported_fp`` only: fit-split true positives the new threshold (just above the reported
        #: images) may lose; more refuses the change before it reaches verification.
        max_tp_lost: int = Field(0, ge=0)

        @model_validator(mode="after")
        def _method_needs(self) -> ThresholdIntervention.Params:
            if self.method == "fixed_sensitivity" and self.target is None:
                why = "required when method is fixed_sensitivity (a sensitivity in (0, 1])"
                raise LocatedError([(("target",), why)])
            if self.method == "cost_weighted":
                missing = [k for k in ("fn_cost", "fp_cost") if getattr(self, k) is None]
                if missing:
                    raise LocatedError([((k,), "required when method is cost_weighted (a positive number)")
                                        for k in missing])
            return self

        def method_args(self) -> dict[str, float]:
            """The arguments :func:`fit_threshold` takes for ``method`` (recorded with the change)."""
            if self.method == "fixed_sensitivity":
                return {"target": float(self.target)}
            if self.method == "cost_weighted":
                return {"fn_cost": float(self.fn_cost), "fp_cost": float(self.fp_cost)}
            return {}

    def _targets(self, ctx: TreatmentContext, scope: str) -> list[str]:
        if scope == "all":
            return [name for name in ctx.bundle.labels if name in CHEXNET_LABELS]
        return [ctx.fact.label] if ctx.fact.label is not None else []

    def _applicable(self, ctx: TreatmentContext, params: ThresholdIntervention.Params) -> tuple[bool, str]:
        if ctx.fact.kind == "reported_fp":
            if ctx.reported is None or len(ctx.reported) == 0 or ctx.fact.label not in ctx.bundle.labels:
                return False, "the reported images' features were not given (ctx.reported)"
            return True, f"threshold moves {ctx.fact.label}'s operating point just above the reported image(s)"
        targets = self._targets(ctx, params.scope)
        if not targets:
            return False, "the fact names no label and scope is 'label'"
        for label in targets:
            if label not in ctx.bundle.labels or label not in CHEXNET_LABELS:
                return False, f"label {label!r} is not an output of this model with ground truth in the data"
        if params.scope == "label":
            y = ctx.fit.labels[:, truth_index(targets[0])]
            negatives_only = reference_fp_rate(ctx.fact, targets[0]) is not None
            if y.all() or not (y.any() or negatives_only):
                return False, f"the fit split has only one class for {targets[0]} ({int(y.sum())}/{len(y)} positive)"
        return True, f"threshold refits the {params.method} operating point of {', '.join(targets)} on the fit split"

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        if ctx.fact.kind == "reported_fp":
            return _reported_threshold(ctx, params)
        method = params.method
        extra = params.method_args()
        logits = np.asarray(ctx.fit.logits, dtype=np.float64).copy()
        thresholds = list(ctx.bundle.meta.thresholds)
        history = list(ctx.bundle.meta.history)
        new_bundle = ctx.bundle.copy()
        shifts: list[dict[str, Any]] = []
        if ECE_KEY in ctx.fact.threshold and ctx.fact.label is not None:
            label = ctx.fact.label
            k_out = ctx.bundle.labels.index(label)
            before_logits = logits[:, k_out].copy()
            y_fit = ctx.fit.labels[:, truth_index(label)]
            # with no positive on the fit split the likelihood has no finite optimum: no intercept shift
            delta = fit_logit_offset(y_fit, before_logits) if y_fit.any() else 0.0
            with torch.no_grad():
                new_bundle.model.classifier.bias[k_out] += delta
            logits[:, k_out] = before_logits + delta
            entry = {"op": "shift_logit", "label": label, "delta": delta, "reason": ECE_KEY}
            history.append(entry)
            shifts.append({"label": label, "delta": delta})
        probs = sigmoid(logits)
        old_probs = sigmoid(np.asarray(ctx.fit.logits, dtype=np.float64))
        changed: list[dict[str, Any]] = []
        fit_metrics: dict[str, Any] = {}
        skipped: list[str] = []
        for label in self._targets(ctx, params.scope):
            k_out = ctx.bundle.labels.index(label)
            y = ctx.fit.labels[:, truth_index(label)]
            ref_fp = reference_fp_rate(ctx.fact, label)
            few = ref_fp is not None and int(y.sum()) < MIN_YOUDEN_POSITIVES
            if y.all() or not (y.any() or few):
                if params.scope == "label":
                    raise InterventionError(f"threshold: the fit split has only one class for {label}")
                skipped.append(label)
                continue
            old = float(thresholds[k_out])
            if few:
                new = negatives_threshold(probs[~y.astype(bool), k_out], ref_fp)
                used, used_extra = "reference_fp_rate", {"target_fp_rate": ref_fp, "fit_positives": int(y.sum())}
            else:
                new = fit_threshold(y, probs[:, k_out], method, **extra)
                used, used_extra = method, extra
            thresholds[k_out] = new
            entry = {"op": "set_threshold", "label": label, "old": old, "new": new, "method": used, **used_extra}
            history.append(entry)
            changed.append({"label": label, "old": old, "new": new, "method": used})
            before = confusion_at(y, old_probs[:, k_out], old)
            after = confusion_at(y, probs[:, k_out], new)
            fit_metrics[label] = {
                "before": {"sensitivity": before["sensitivity"], "specificity": before["specificity"],
                           "ece": expected_calibration_error(y, old_probs[:, k_out])},
                "after": {"sensitivity": after["sensitivity"], "specificity": after["specificity"],
                          "ece": expected_calibration_error(y, probs[:, k_out])},
            }
        if not changed:
            raise InterventionError("threshold: no label had both classes in the fit split; nothing to refit")
        new_bundle = new_bundle.with_meta(thresholds=thresholds, history=history,
                                          parent_hash=ctx.bundle.content_hash())
        changes = {"op": "set_threshold", "method": method, "scope": params.scope, **extra,
                   "thresholds": changed, "logit_shifts": shifts, "skipped_single_class": skipped}
        return InterventionResult(bundle=new_bundle, changes=changes, fit_metrics=fit_metrics, classifier_only=True)


def _reported_threshold(ctx: TreatmentContext, params: ThresholdIntervention.Params) -> InterventionResult:
    """``reported_fp``: the lowest threshold above every reported image's probability, refused when it
    loses more than ``max_tp_lost`` true positives on the fit split (shown, not assumed)."""
    label = ctx.fact.label
    k = ctx.bundle.labels.index(label)
    old = float(ctx.bundle.meta.thresholds[k])
    p_rep = sigmoid(np.asarray(ctx.reported.logits[:, k], dtype=np.float64))
    new = float(np.nextafter(max(float(p_rep.max()), old), 1.0))
    y = ctx.fit.labels[:, truth_index(label)].astype(bool)
    p_fit = sigmoid(np.asarray(ctx.fit.logits[:, k], dtype=np.float64))
    tp_before, tp_after = int(((p_fit >= old) & y).sum()), int(((p_fit >= new) & y).sum())
    if tp_before - tp_after > params.max_tp_lost:
        raise InterventionError(
            f"threshold: {old:.4g} -> {new:.4g} (just above the reported image(s)) loses {tp_before - tp_after} of "
            f"{tp_before} true positives of {label} on the fit split (allowed {params.max_tp_lost})")
    thresholds = list(ctx.bundle.meta.thresholds)
    thresholds[k] = new
    entry = {"op": "set_threshold", "label": label, "old": old, "new": new, "method": "above_reported",
             "reason": "reported_fp"}
    images = [{"image": n, "prob": float(p), "crossed": bool(p < new)} for n, p in zip(ctx.reported.image_names, p_rep)]
    new_bundle = ctx.bundle.copy().with_meta(thresholds=thresholds, history=list(ctx.bundle.meta.history) + [entry],
                                             parent_hash=ctx.bundle.content_hash())
    fp = {"before": int(((p_fit >= old) & ~y).sum()), "after": int(((p_fit >= new) & ~y).sum())}
    fit_metrics = {label: {"tp": {"before": tp_before, "after": tp_after}, "tp_lost": tp_before - tp_after, "fp": fp}}
    changes = {"op": "set_threshold", "method": "above_reported", "thresholds": [{"label": label, "old": old,
               "new": new, "method": "above_reported"}], "reported_images": images}
    return InterventionResult(bundle=new_bundle, changes=changes, fit_metrics=fit_metrics, classifier_only=True)
