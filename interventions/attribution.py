"""Classifier-channel attribution on cached pooled features.

A CheXNet-style head is one ``Linear`` on pooled, ReLU'd features, so a label's logit splits
exactly into per-channel contributions ``w_kc * f_c`` plus the bias. That decomposition is what
surgical zeroing searches over (which channels push a false-positive cluster over the threshold
but not the true positives?) and what reports quote as "channels behind this finding". Everything
here is numpy on the cached features: no backbone run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.core.errors import InterventionError
from model.bundle import Bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS

__all__ = [
    "classifier_layer",
    "output_index",
    "truth_index",
    "classifier_row",
    "contributions",
    "group_mean_contribution",
    "top_channels",
    "head_logits",
    "check_features_match",
    "evidence_channels",
    "evidence_members",
    "finite_or_none",
    "zero_row_weights",
]


def classifier_layer(bundle: Bundle) -> nn.Linear:
    """The bundle's linear head; every architecture in this project exposes one as ``.classifier``."""
    head = getattr(bundle.model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise InterventionError(
            f"the model of architecture {bundle.meta.arch!r} has no linear '.classifier' head "
            f"(found {type(head).__name__}); classifier-level interventions need one"
        )
    return head


def output_index(bundle: Bundle, label: str) -> int:
    """Column of ``label`` in the bundle's outputs (its classifier row)."""
    if label not in bundle.labels:
        raise InterventionError(f"label {label!r} is not an output of this model; outputs: {', '.join(bundle.labels)}")
    return bundle.labels.index(label)


def truth_index(label: str) -> int:
    """Column of ``label`` in a dataset's 14-label ground truth (CheXNet order)."""
    if label not in CHEXNET_LABELS:
        raise InterventionError(f"label {label!r} has no ground truth in NIH data; known: {', '.join(CHEXNET_LABELS)}")
    return CHEXNET_LABELS.index(label)


def classifier_row(bundle: Bundle, label: str) -> tuple[int, np.ndarray, float]:
    """``(row index, weight row (F,) float64, bias)`` of ``label``'s classifier output."""
    head = classifier_layer(bundle)
    k = output_index(bundle, label)
    w = head.weight.detach().cpu().to(torch.float64)[k].numpy().copy()
    b = float(head.bias.detach().cpu()[k]) if head.bias is not None else 0.0
    return k, w, b


def contributions(features: np.ndarray, weight_row: np.ndarray) -> np.ndarray:
    """Per-sample, per-channel contribution ``w_c * f_ic`` to one logit: ``(N, F)`` float64.

    The row sums plus the bias give the logits (up to float32 rounding of the model's own matmul).
    """
    features = np.asarray(features, dtype=np.float64)
    weight_row = np.asarray(weight_row, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != weight_row.shape[0]:
        raise InterventionError(
            f"features of shape {features.shape} do not match a classifier row of {weight_row.shape[0]} channels"
        )
    return features * weight_row[None, :]


def group_mean_contribution(contrib: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mean contribution of each channel over ``rows`` (zeros for an empty group)."""
    rows = np.asarray(rows, dtype=int)
    if rows.size == 0:
        return np.zeros(contrib.shape[1])
    return contrib[rows].mean(axis=0)


def top_channels(
    contrib: np.ndarray, rows: Sequence[int] | np.ndarray, k: int = 10,
    against: Sequence[int] | np.ndarray | None = None,
) -> list[dict[str, float | int]]:
    """The ``k`` channels contributing most to ``rows`` (minus their mean over ``against`` when given).

    Ties are broken by channel index so the list is deterministic.
    """
    score = group_mean_contribution(contrib, rows)
    base = group_mean_contribution(contrib, against) if against is not None else np.zeros_like(score)
    diff = score - base
    order = np.lexsort((np.arange(len(diff)), -diff))[:k]
    return [{"channel": int(c), "contribution": float(score[c]), "reference": float(base[c]),
             "difference": float(diff[c])} for c in order]


@torch.no_grad()
def head_logits(bundle: Bundle, features: np.ndarray) -> np.ndarray:
    """Logits of the bundle's classifier on cached pooled features (float32, like the model)."""
    head = classifier_layer(bundle)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return head(x.to(head.weight.device)).cpu().numpy()


def check_features_match(bundle: Bundle, fit: FeatureSet, *, tol: float = 1e-3) -> None:
    """Refuse features that were not computed by this bundle's backbone (a stale cache, a wrong model).

    The classifier applied to the cached features must reproduce the cached logits.
    """
    head = classifier_layer(bundle)
    if fit.features.ndim != 2 or fit.features.shape[1] != head.in_features:
        raise InterventionError(
            f"the fit split's features have shape {fit.features.shape}; the classifier expects "
            f"{head.in_features} channels — features from another model?"
        )
    if len(fit) == 0:
        raise InterventionError("the fit split is empty")
    logits = head_logits(bundle, fit.features)
    err = float(np.max(np.abs(logits - fit.logits) / (1.0 + np.abs(fit.logits))))
    if not err <= tol:
        raise InterventionError(
            f"the fit split's cached logits differ from the classifier applied to its features (max relative "
            f"error {err:.3g} > {tol}); the features were computed by another model"
        )


def evidence_channels(evidence: dict[str, Any]) -> list[int]:
    """Channel indices from a fact's ``evidence.channels`` (ints, or dicts with 'channel'/'index')."""
    out: list[int] = []
    for item in evidence.get("channels") or []:
        if isinstance(item, dict):
            item = item.get("channel", item.get("index"))
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            out.append(int(item))
    return out


def evidence_members(evidence: dict[str, Any]) -> set[str]:
    """Image ids of a fact's cluster (``evidence.member_ids``, or ``members``)."""
    items = evidence.get("member_ids") or evidence.get("members") or []
    return {str(m) for m in items}


def finite_or_none(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (records are canonical JSON, which forbids NaN)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def zero_row_weights(bundle: Bundle, k_out: int, chosen: list[int], w: np.ndarray,
                     baseline: np.ndarray) -> tuple[Bundle, list[float], float, float]:
    """A copy of ``bundle`` with ``chosen`` weights of row ``k_out`` zeroed and their baseline in the bias.

    Returns the copy, the old weights, and the bias before and after (as stored, float32).
    """
    new = bundle.copy()
    head = classifier_layer(new)
    old_values = [float(v) for v in head.weight.detach()[k_out, chosen].cpu()]
    bias_old = float(head.bias.detach()[k_out]) if head.bias is not None else 0.0
    bias_new = bias_old + float(np.dot(w[chosen], baseline[chosen]))
    with torch.no_grad():
        head.weight[k_out, chosen] = 0.0
        if head.bias is not None:
            head.bias[k_out] = bias_new
        elif bias_new != bias_old:
            raise InterventionError("zeroing: the classifier has no bias to take the channels' baseline; "
                                    "use compensate_bias: false")
    bias_new = float(head.bias.detach()[k_out]) if head.bias is not None else 0.0  # as stored (float32)
    return new, old_values, bias_old, bias_new
