"""Zeroing for a reported false positive: the fewest channels of one label's row behind the reported image(s).

A reader says "image X is not a pneumothorax". The label's logit on X splits into per-channel
contributions; against the label's true positives the attribution of channel c is
``a_c = w_kc * (f_c - baseline_c)``, with ``baseline`` the mean pooled feature over the label's TRUE
POSITIVES on the fit split. Zeroing c with mean ablation (its baseline share ``w_kc * baseline_c``
moved into the row's bias) lowers X's logit by exactly ``a_c`` and a true positive j's by
``w_kc * (f_jc - baseline_c)``, which is zero on average over the fit true positives: the channels
chosen are those where X is more active than the label's real findings are.

Greedy: each step takes the channel with the largest summed attribution over the reported images
still at or above the threshold, among those whose removal (with the ones already chosen) drops no
fit-split true positive below the threshold (``max_tp_lost``, default 0); it stops when every
reported image is below the threshold, at ``max_channels`` (default 10), or when no channel pushes
the images up without costing a true positive. Where the cap cannot bring every image below, the
greedy set is the largest decrease it found; where it can, a backward pass drops channels that are not
needed (fewest channels). Only row ``k`` and its bias change, so every other label's logits stay
bit-identical; that is computed on the fit split and the reported images, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.errors import InterventionError
from interventions.attribution import classifier_row, contributions, head_logits, truth_index, zero_row_weights
from model.bundle import Bundle
from model.features import FeatureSet
from model.metrics import auroc, logit, sigmoid

__all__ = ["ReportedCorrection", "correct_reported", "true_positive_rows", "select_reported_channels"]


def select_reported_channels(
    contrib_r: np.ndarray, logit_r: np.ndarray, contrib_tp: np.ndarray, logit_tp: np.ndarray, tau: float, *,
    max_channels: int, max_tp_lost: int = 0, tp_margin: float = 0.0,
) -> tuple[list[int], list[dict[str, float]], str]:
    """Greedy (+ backward when every image crosses) choice of channels; see the module docstring.

    ``contrib_r`` (reported images x F) and ``contrib_tp`` (fit true positives x F) are centred
    contributions, ``logit_*`` the current logits, ``tau`` the logit threshold. Returns the channels,
    a per-step trace and why the search stopped.
    """
    floor = tau + tp_margin

    def lost_after(tp_logits: np.ndarray) -> np.ndarray:
        return ((tp_logits < floor) & (tp_logits < logit_tp[:, None])).sum(axis=0)

    chosen: list[int] = []
    trace: list[dict[str, float]] = []
    cur_r, cur_tp = logit_r.astype(np.float64).copy(), logit_tp.astype(np.float64).copy()
    stop = "every reported image is below the threshold"
    while (cur_r >= tau).any():
        if len(chosen) >= max_channels:
            stop = f"max_channels ({max_channels}) reached"
            break
        gain = contrib_r[cur_r >= tau].sum(axis=0)
        lost = lost_after(cur_tp[:, None] - contrib_tp) if len(cur_tp) else np.zeros(len(gain), dtype=int)
        ok = (gain > 0) & (lost <= max_tp_lost)
        ok[chosen] = False
        if not ok.any():
            stop = ("no remaining channel pushes the reported image(s) up without losing more than "
                    f"{max_tp_lost} fit-split true positive(s)")
            break
        c = int(np.argmax(np.where(ok, gain, -np.inf)))  # first maximum: deterministic
        chosen.append(c)
        cur_r, cur_tp = cur_r - contrib_r[:, c], cur_tp - contrib_tp[:, c]
        trace.append({"channel": c, "attribution": float(gain[c]), "still_above": int((cur_r >= tau).sum()),
                      "tp_lost": int(lost[c])})
    if chosen and not (cur_r >= tau).any():  # fewest channels: drop any that is not needed
        for c in list(reversed(chosen)):
            trial = [x for x in chosen if x != c]
            r = logit_r - contrib_r[:, trial].sum(axis=1)
            t = logit_tp - contrib_tp[:, trial].sum(axis=1)
            if not (r >= tau).any() and int(lost_after(t[:, None]).sum()) <= max_tp_lost:
                chosen = trial
    return chosen, trace, stop


def true_positive_rows(fit: FeatureSet, logits_k: np.ndarray, y: np.ndarray, thr: float) -> np.ndarray:
    """Fit-split true positives of the label (predicted at ``thr`` and labelled)."""
    return np.flatnonzero((sigmoid(logits_k.astype(np.float64)) >= thr) & y)


@dataclass(frozen=True)
class ReportedCorrection:
    """A zeroed copy and what it did: channels, old weights, bias, the reported images, the fit TPs."""

    bundle: Bundle
    label: str
    row: int
    channels: list[int]
    old_values: list[float]
    bias_old: float
    bias_new: float
    images: list[dict[str, Any]]
    tp_before: int
    tp_after: int
    auroc_before: float | None
    auroc_after: float | None
    n_checked: int
    trace: list[dict[str, float]]
    stop: str

    @property
    def tp_lost(self) -> int:
        return self.tp_before - self.tp_after

    @property
    def all_crossed(self) -> bool:
        return all(img["crossed"] for img in self.images)


def _auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    value = auroc(y.astype(int), scores)
    return None if np.isnan(value) else float(value)


def correct_reported(bundle: Bundle, fit: FeatureSet, reported: FeatureSet, label: str, *, max_channels: int,
                     max_tp_lost: int = 0, tp_margin: float = 0.0, compensate_bias: bool = True) -> ReportedCorrection:
    """Choose and zero the channels of ``label``'s row behind the ``reported`` images (see the module docstring).

    Raises :class:`InterventionError` when no channel can be chosen or the other labels' logits moved.
    """
    k, w, b = classifier_row(bundle, label)
    thr = float(bundle.meta.thresholds[k])
    tau = logit(thr)
    y = fit.labels[:, truth_index(label)].astype(bool)
    tp_rows = true_positive_rows(fit, fit.logits[:, k], y, thr)
    if len(tp_rows) == 0:
        raise InterventionError(f"zeroing: the fit split has no true positive of {label} to attribute against")
    baseline = fit.features[tp_rows].astype(np.float64).mean(axis=0)
    logit_r = contributions(reported.features, w).sum(axis=1) + b
    logit_tp = contributions(fit.features[tp_rows], w).sum(axis=1) + b
    centred_r = contributions(reported.features.astype(np.float64) - baseline, w)
    centred_tp = contributions(fit.features[tp_rows].astype(np.float64) - baseline, w)
    chosen, trace, stop = select_reported_channels(centred_r, logit_r, centred_tp, logit_tp, tau,
                                                   max_channels=max_channels, max_tp_lost=max_tp_lost,
                                                   tp_margin=tp_margin)
    if not chosen:
        raise InterventionError(f"zeroing: no channel of {label}'s row can lower the reported image(s): {stop}")
    chosen = sorted(chosen)
    ablate = baseline if compensate_bias else np.zeros_like(baseline)
    new, old_values, bias_old, bias_new = zero_row_weights(bundle, k, chosen, w, ablate)
    fit_after, rep_after = head_logits(new, fit.features), head_logits(new, reported.features)
    others = [j for j in range(fit_after.shape[1]) if j != k]
    same = (np.array_equal(head_logits(bundle, fit.features)[:, others], fit_after[:, others])
            and np.array_equal(head_logits(bundle, reported.features)[:, others], rep_after[:, others]))
    if not same:
        raise InterventionError("zeroing: other labels' logits changed; the classifier is not a plain Linear")
    p_before = sigmoid(reported.logits[:, k].astype(np.float64))
    p_after = sigmoid(rep_after[:, k].astype(np.float64))
    images = [{"image": name, "prob_before": float(pb), "prob_after": float(pa), "delta_prob": float(pa - pb),
               "threshold": thr, "crossed": bool(pb >= thr > pa)}
              for name, pb, pa in zip(reported.image_names, p_before, p_after, strict=True)]
    tp_after = int((sigmoid(fit_after[tp_rows, k].astype(np.float64)) >= thr).sum())
    return ReportedCorrection(
        bundle=new, label=label, row=k, channels=chosen, old_values=old_values, bias_old=bias_old,
        bias_new=bias_new, images=images, tp_before=len(tp_rows), tp_after=tp_after,
        auroc_before=_auroc(y, fit.logits[:, k]), auroc_after=_auroc(y, fit_after[:, k]),
        n_checked=len(fit) + len(reported), trace=trace, stop=stop)
