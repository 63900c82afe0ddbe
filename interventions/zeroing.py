"""Surgical correction: zero a few classifier weights of ONE label to dissolve a false-positive cluster.

A shortcut (a chest tube, a scanner marker) makes some backbone channels fire on images that carry
the artefact; if the label's classifier row gives those channels positive weight, negatives with the
artefact cross the threshold and form a false-positive cluster. True positives do not need those
channels, so zeroing their weights in that label's row removes the cluster's push and leaves the
true positives where they were. Because only one row changes, every other label's logits stay
bit-identical, and the cached pooled features stay valid (classifier-only, seconds on CPU).

Mean ablation (``compensate_bias``, default on): a channel's pooled activation is never zero on
ordinary images, so plain zeroing lowers *every* image's logit by the channel's baseline share,
true positives included (measured on phantom shortcut models: a verify TP 0.15 logit above the
threshold fell below it). Instead the zeroed channels' mean contribution over the fit rows outside
the cluster goes into the same row's bias: only activity above the baseline (the artefact's) is
removed. Still one row, so the other labels stay bit-identical; ``compensate_bias: false`` is
plain zeroing.

Channel choice (greedy, on the fit split's cached features, contributions ``w_kc * (f_c - mean_c)``):
each step takes the channel with the largest *selective push* — its mean contribution to the
cluster's FPs still above threshold minus its mean (positive) contribution to the label's
positives — among those whose removal loses at most ``max_tp_lost`` true positives; it stops when
the cluster is below threshold, at ``max_channels``, or when no channel pushes the cluster more
than the positives. A backward pass then drops chosen channels that turned out not to be needed
(fewest channels). The result is refused when it removes less than ``min_fp_removed_share`` of the
cluster's FPs on the fit split.

The fact's ``evidence.member_ids`` (image ids; ``members`` is accepted too) name the cluster; the
fit split may hold only some of them. With fewer than ``min_cluster`` members present, the cluster
is widened on the fit split to the FPs driven by the fact's ``evidence.channels`` more than any
labelled positive is.

Measured (``bench/bench_interventions.py``): on phantom shortcut models the artefact is spread over
more channels than in the paper's DenseNet121 (5): a ``small`` DenseNet needed 18 of 193 channels
to clear 90 % of the cluster, so a cap of 10 refuses there; the cap is a policy decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from engine.core.errors import InterventionError
from interventions.attribution import (
    check_features_match, classifier_layer, classifier_row, contributions, evidence_channels, evidence_members,
    head_logits, output_index, truth_index, zero_row_weights,
)
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from interventions.zeroing_reported import correct_reported
from model.bundle import Bundle
from model.features import FeatureSet
from model.metrics import auroc, logit, sigmoid

__all__ = ["ZeroingIntervention", "ClusterOnFit", "resolve_cluster", "select_channels"]

@dataclass(frozen=True)
class ClusterOnFit:
    """The fact's FP cluster located on the fit split (row indices into ``ctx.fit``)."""

    rows: np.ndarray
    #: "members" (the fact's member ids) or "channels" (widened by the evidence channels).
    how: str
    n_members_present: int
    #: All false positives / true positives of the label on the fit split.
    fp_rows: np.ndarray
    tp_rows: np.ndarray


def resolve_cluster(ctx: TreatmentContext, min_cluster: int) -> ClusterOnFit:
    """Rows of the fit split that belong to the fact's FP cluster (see the module docstring)."""
    label = ctx.fact.label
    k_out, w, _ = classifier_row(ctx.bundle, label)
    y = ctx.fit.labels[:, truth_index(label)].astype(bool)
    probs = sigmoid(ctx.fit.logits[:, k_out].astype(np.float64))
    thr = float(ctx.bundle.meta.thresholds[k_out])
    predicted = probs >= thr
    fp_rows = np.flatnonzero(predicted & ~y)
    tp_rows = np.flatnonzero(predicted & y)
    members = evidence_members(ctx.fact.evidence)
    names = ctx.fit.image_names
    member_rows = np.array([i for i in fp_rows if names[i] in members], dtype=int)
    if len(member_rows) >= min_cluster:
        return ClusterOnFit(member_rows, "members", len(member_rows), fp_rows, tp_rows)
    channels = [c for c in evidence_channels(ctx.fact.evidence) if 0 <= c < len(w)]
    if channels and len(fp_rows):
        contrib = contributions(ctx.fit.features[:, channels], w[channels]).sum(axis=1)
        positives = np.flatnonzero(y)
        cutoff = float(contrib[positives].max()) if len(positives) else 0.0
        driven = fp_rows[contrib[fp_rows] > cutoff]
        rows = np.union1d(member_rows, driven).astype(int)
        return ClusterOnFit(rows, "channels", len(member_rows), fp_rows, tp_rows)
    return ClusterOnFit(member_rows, "members", len(member_rows), fp_rows, tp_rows)


def select_channels(
    contrib_c: np.ndarray, logit_c: np.ndarray, contrib_tp: np.ndarray, logit_tp: np.ndarray,
    contrib_pos: np.ndarray, tau: float, *, max_channels: int, max_tp_lost: int,
    tp_margin: float = 0.0,
) -> tuple[list[int], list[dict[str, float]], str]:
    """Greedy + backward selection of channels to zero (see the module docstring).

    ``contrib_c`` (cluster FPs x F), ``contrib_tp`` (true positives x F) and ``contrib_pos`` (all
    labelled positives x F) are contributions; ``logit_*`` the current logits; ``tau`` the logit
    threshold. Returns the channels, a per-step trace and why the search stopped.
    """
    tp_floor = tau + tp_margin
    pos_cost = np.clip(contrib_pos, 0.0, None).mean(axis=0) if len(contrib_pos) else np.zeros(contrib_c.shape[1])

    def state(chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return (logit_c - contrib_c[:, chosen].sum(axis=1), logit_tp - contrib_tp[:, chosen].sum(axis=1))

    def counts(chosen: list[int]) -> tuple[int, int]:
        lc, lt = state(chosen)
        return int((lc < tau).sum()), int(((lt < tp_floor) & (lt < logit_tp)).sum())

    chosen: list[int] = []
    trace: list[dict[str, float]] = []
    cur_c, cur_tp = logit_c.copy(), logit_tp.copy()
    stop = "the cluster is below the threshold"
    while (cur_c >= tau).any():
        if len(chosen) >= max_channels:
            stop = f"max_channels ({max_channels}) reached"
            break
        remaining = cur_c >= tau
        gain = contrib_c[remaining].mean(axis=0)  # push on the cluster's FPs still above threshold
        score = gain - pos_cost
        new_tp = cur_tp[:, None] - contrib_tp
        lost = ((new_tp < tp_floor) & (new_tp < logit_tp[:, None])).sum(axis=0)
        helpful = (gain > 0) & (score > 0)
        helpful[chosen] = False
        ok = helpful & (lost <= max_tp_lost)
        if not ok.any():
            stop = ("every remaining channel that pushes the cluster more than the label's positives would lose "
                    f"more than {max_tp_lost} true positive(s)" if helpful.any() else
                    "no remaining channel pushes the cluster more than it pushes the label's positives")
            break
        masked = np.where(ok, score, -np.inf)
        c = int(np.argmax(masked))  # first maximum: deterministic
        chosen.append(c)
        cur_c, cur_tp = cur_c - contrib_c[:, c], cur_tp - contrib_tp[:, c]
        trace.append({"channel": c, "selective_push": float(score[c]), "cluster_push": float(gain[c]),
                      "positive_cost": float(pos_cost[c]), "fp_removed": int((cur_c < tau).sum()),
                      "tp_lost": int(lost[c])})
    removed, _ = counts(chosen)
    for c in list(reversed(chosen)) if removed else []:  # fewest channels: drop any that is not needed
        trial = [x for x in chosen if x != c]
        r, lost = counts(trial)
        if r >= removed and lost <= max_tp_lost:
            chosen = trial
    return chosen, trace, stop


def _label_auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    value = auroc(y.astype(int), scores)
    return None if np.isnan(value) else float(value)


@dataclass(frozen=True)
class _Effect:
    """What the zeroed copy does to the label on the fit split (probabilities before/after)."""

    before: np.ndarray  # logits, all outputs
    after: np.ndarray
    p_before: np.ndarray  # probabilities of the label
    p_after: np.ndarray
    removed: int  # cluster FPs now below the threshold
    tp_lost: int
    share: float


def _baseline(features: np.ndarray, reference: np.ndarray, compensate_bias: bool) -> np.ndarray:
    """Mean ablation: each channel's mean over the fit rows outside the cluster (zeros for plain zeroing).

    A zeroed channel's baseline contribution moves into the bias, so only activity ABOVE the baseline is
    removed and images without the artefact keep their logits on average.
    """
    if compensate_bias and len(reference):
        return features[reference].astype(np.float64).mean(axis=0)
    return np.zeros(features.shape[1])


def _effect(ctx: TreatmentContext, new: Bundle, k_out: int, cluster: ClusterOnFit, thr: float) -> _Effect:
    """Logits and label probabilities before/after on the fit split; other labels must be bit-identical."""
    feats = ctx.fit.features
    before = ctx.fit.logits
    after = head_logits(new, feats)
    others = [j for j in range(before.shape[1]) if j != k_out]
    if not np.array_equal(head_logits(ctx.bundle, feats)[:, others], after[:, others]):
        raise InterventionError("zeroing: other labels' logits changed; the classifier is not a plain Linear")
    p_before, p_after = sigmoid(before[:, k_out].astype(np.float64)), sigmoid(after[:, k_out].astype(np.float64))
    removed = int((p_after[cluster.rows] < thr).sum())
    tp_lost = int((p_after[cluster.tp_rows] < thr).sum())
    return _Effect(before, after, p_before, p_after, removed, tp_lost, removed / len(cluster.rows))


def _fit_metrics(label: str, y: np.ndarray, k_out: int, cluster: ClusterOnFit, effect: _Effect,
                 thr: float) -> dict[str, Any]:
    c_rows, tp_rows = cluster.rows, cluster.tp_rows
    p_before, p_after = effect.p_before, effect.p_after
    return {
        label: {
            "cluster_fp": {"before": int(len(c_rows)), "after": int(len(c_rows) - effect.removed)},
            "cluster_fp_removed_share": effect.share,
            "cluster_mean_delta_prob": float((p_after[c_rows] - p_before[c_rows]).mean()),
            "fp": {"before": int(len(cluster.fp_rows)), "after": int(((p_after >= thr) & ~y).sum())},
            "tp": {"before": int(len(tp_rows)), "after": int(len(tp_rows) - effect.tp_lost)},
            "tp_mean_delta_prob": float((p_after[tp_rows] - p_before[tp_rows]).mean()) if len(tp_rows) else 0.0,
            "auroc": {"before": _label_auroc(y, effect.before[:, k_out]),
                      "after": _label_auroc(y, effect.after[:, k_out])},
        },
        "other_labels_logits_identical": True,
    }


class ZeroingIntervention(Intervention):
    """Zero the few classifier weights of one label that drive a false-positive cluster."""

    name = "zeroing"
    treats = ("fp_cluster", "reported_fp")
    expected_time_s = 2.0
    classifier_only = True

    class Params(InterventionParams):
        """``params.zeroing`` (``max_channels`` defaults to ``conditions.zeroing.max_channels``, see the policy)."""

        max_channels: int = Field(10, ge=1, le=4096)
        min_fp_removed_share: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
        max_tp_lost: int = Field(0, ge=0)
        #: A true positive counts as lost when zeroing pushes its logit below threshold + tp_margin.
        tp_margin: float = Field(0.0, ge=0.0, allow_inf_nan=False)
        min_cluster: int = Field(3, ge=1)
        #: Mean ablation (see _apply): fold the zeroed channels' baseline contribution into the bias.
        compensate_bias: bool = True

    def _applicable(self, ctx: TreatmentContext, params: ZeroingIntervention.Params) -> tuple[bool, str]:
        label = ctx.fact.label
        if label is None:
            return False, "the fact names no label; zeroing changes one label's classifier row"
        try:
            output_index(ctx.bundle, label)
            truth_index(label)
            classifier_layer(ctx.bundle)
        except InterventionError as exc:
            return False, str(exc)
        if ctx.fact.kind == "reported_fp":
            return _reported_applicable(ctx)
        ev = ctx.fact.evidence
        if not evidence_members(ev) and not evidence_channels(ev):
            return False, "the fact carries neither cluster members nor classifier channels as evidence"
        if ctx.fit.features.ndim != 2 or ctx.fit.features.shape[1] != classifier_layer(ctx.bundle).in_features:
            return False, f"the fit split's features (shape {ctx.fit.features.shape}) do not fit the classifier"
        cluster = resolve_cluster(ctx, params.min_cluster)
        if len(cluster.rows) == 0:
            return False, (f"the fit split has none of the cluster's false positives of {label} "
                           f"({len(cluster.fp_rows)} FPs of {label} in the fit split)")
        return True, (f"zeroing searches {label}'s classifier row for the channels behind {len(cluster.rows)} "
                      f"cluster false positives on the fit split")

    def _choose(self, ctx: TreatmentContext, params: ZeroingIntervention.Params, cluster: ClusterOnFit,
                w: np.ndarray, b: float, baseline: np.ndarray, tau: float) -> tuple[list[int], list[dict], str]:
        """:func:`select_channels` on the fit split's contributions, centred on ``baseline``."""
        feats = ctx.fit.features
        y = ctx.fit.labels[:, truth_index(ctx.fact.label)].astype(bool)
        logit64 = contributions(feats, w).sum(axis=1) + b
        positives = np.flatnonzero(y)
        centred = feats.astype(np.float64) - baseline
        return select_channels(
            contributions(centred[cluster.rows], w), logit64[cluster.rows],
            contributions(centred[cluster.tp_rows], w), logit64[cluster.tp_rows],
            contributions(centred[positives], w), tau,
            max_channels=params.max_channels, max_tp_lost=params.max_tp_lost, tp_margin=params.tp_margin,
        )

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        check_features_match(ctx.bundle, ctx.fit)
        if ctx.fact.kind == "reported_fp":
            return _apply_reported(ctx, params)
        label = ctx.fact.label
        k_out, w, b = classifier_row(ctx.bundle, label)
        y = ctx.fit.labels[:, truth_index(label)].astype(bool)
        thr = float(ctx.bundle.meta.thresholds[k_out])
        tau = logit(thr)  # the logit at which sigmoid(logit) == thr (predictions are prob >= thr)
        cluster = resolve_cluster(ctx, params.min_cluster)
        if len(cluster.rows) == 0:
            raise InterventionError(f"zeroing: no false positive of the {label} cluster in the fit split")
        reference = np.setdiff1d(np.arange(len(ctx.fit.features)), cluster.rows)
        baseline = _baseline(ctx.fit.features, reference, params.compensate_bias)
        chosen, trace, stop = self._choose(ctx, params, cluster, w, b, baseline, tau)
        if not chosen:
            raise InterventionError(
                f"zeroing: no channel of {label}'s classifier row can be zeroed for the cluster's "
                f"{len(cluster.rows)} false positives on the fit split: {stop}"
            )
        chosen = sorted(chosen)
        new, old_values, bias_old, bias_new = zero_row_weights(ctx.bundle, k_out, chosen, w, baseline)
        effect = _effect(ctx, new, k_out, cluster, thr)
        if effect.tp_lost > params.max_tp_lost:
            raise InterventionError(f"zeroing: {effect.tp_lost} true positives of {label} lost on the fit split "
                                    f"(allowed {params.max_tp_lost})")
        if effect.share < params.min_fp_removed_share:
            raise InterventionError(
                f"zeroing: the best {len(chosen)} channel(s) remove only {effect.removed}/{len(cluster.rows)} "
                f"({effect.share:.0%}) of the {label} cluster's false positives on the fit split without losing "
                f"more than {params.max_tp_lost} true positive(s) (search stopped: {stop}); the policy asks for at "
                f"least {params.min_fp_removed_share:.0%}"
            )
        op = {"op": "zero_classifier_weights", "label": label, "row": k_out, "channels": chosen,
              "old_values": old_values, "value": 0.0, "bias_old": bias_old, "bias_new": bias_new,
              "baseline": (f"mean of the zeroed channels over {len(reference)} fit rows outside the cluster"
                           if params.compensate_bias else "none (plain zeroing)")}
        history = list(ctx.bundle.meta.history) + [op]
        new = new.with_meta(history=history, parent_hash=ctx.bundle.content_hash())
        changes = {
            **op,
            "n_channels": len(chosen),
            "selection": trace,
            "stopped": stop,
            "cluster": {"how": cluster.how, "n_fit_rows": int(len(cluster.rows)),
                        "n_members_present": cluster.n_members_present,
                        "evidence_channels_chosen": sorted(set(chosen) & set(evidence_channels(ctx.fact.evidence)))},
            "params": params.model_dump(),
        }
        return InterventionResult(bundle=new, changes=changes, fit_metrics=_fit_metrics(label, y, k_out, cluster,
                                                                                        effect, thr),
                                  classifier_only=True)


def _still_positive(ctx: TreatmentContext) -> FeatureSet | None:
    """The reported images the current model still predicts positive for the fact's label (None: none given)."""
    if ctx.reported is None or len(ctx.reported) == 0:
        return None
    k = output_index(ctx.bundle, ctx.fact.label)
    probs = sigmoid(ctx.reported.logits[:, k].astype(np.float64))
    return ctx.reported.subset(np.flatnonzero(probs >= float(ctx.bundle.meta.thresholds[k])))


def _reported_applicable(ctx: TreatmentContext) -> tuple[bool, str]:
    positive = _still_positive(ctx)
    if positive is None:
        return False, "the reported images' features were not given (ctx.reported)"
    if len(positive) == 0:
        return False, f"every reported image is already below the {ctx.fact.label} threshold"
    return True, (f"zeroing searches {ctx.fact.label}'s classifier row for the channels behind "
                  f"{len(positive)} reported false positive(s)")


def _apply_reported(ctx: TreatmentContext, params: ZeroingIntervention.Params) -> InterventionResult:
    """Zeroing for a ``reported_fp`` fact (:mod:`interventions.zeroing_reported`)."""
    label = ctx.fact.label
    positive = _still_positive(ctx)
    if positive is None or len(positive) == 0:
        raise InterventionError(f"zeroing: no reported image is predicted {label}")
    fix = correct_reported(ctx.bundle, ctx.fit, positive, label, max_channels=params.max_channels,
                           max_tp_lost=params.max_tp_lost, tp_margin=params.tp_margin,
                           compensate_bias=params.compensate_bias)
    if fix.tp_lost > params.max_tp_lost:
        raise InterventionError(f"zeroing: {fix.tp_lost} true positives of {label} lost on the fit split "
                                f"(allowed {params.max_tp_lost})")
    reports = [r for r in ctx.fact.evidence.get("reports") or [] if r.get("image") in set(positive.image_names)]
    op = {"op": "zero_classifier_weights", "label": label, "row": fix.row, "channels": fix.channels,
          "old_values": fix.old_values, "value": 0.0, "bias_old": fix.bias_old, "bias_new": fix.bias_new,
          "baseline": (f"mean of the zeroed channels over the {fix.tp_before} true positives of {label} on the fit "
                       "split" if params.compensate_bias else "none (plain zeroing)"),
          "reason": "reported_fp", "reports": reports, "reported_images": fix.images,
          "other_labels_logits_identical": {"identical": True, "images_checked": fix.n_checked,
                                            "on": "the fit split and the reported images"}}
    new = fix.bundle.with_meta(history=list(ctx.bundle.meta.history) + [op], parent_hash=ctx.bundle.content_hash())
    changes = {**op, "n_channels": len(fix.channels), "selection": fix.trace, "stopped": fix.stop,
               "all_crossed": fix.all_crossed, "params": params.model_dump()}
    fit_metrics = {label: {"tp": {"before": fix.tp_before, "after": fix.tp_after}, "tp_lost": fix.tp_lost,
                           "auroc": {"before": fix.auroc_before, "after": fix.auroc_after},
                           "reported_images": fix.images},
                   "other_labels_logits_identical": True}
    return InterventionResult(bundle=new, changes=changes, fit_metrics=fit_metrics, classifier_only=True)
