"""Compression fidelity: the compressed model no longer reproduces its parent on the audited images.

Needs the parent's logits on the same images (``MonitorContext.parent_data``); without them there
is nothing to compare and the monitor is silent. One model-wide fact (``label=None``) with the
per-label maximum |delta logit| and the decisions that flip at the deployed thresholds.
"""

from __future__ import annotations

import numpy as np

from engine.core.facts import IssueFact
from engine.monitors.base import Monitor, MonitorContext, finite_rows, sample_ids
from model.metrics import sigmoid
from rules.policy.monitors import MonitorConfig

__all__ = ["CompressionFidelityMonitor"]

_SECTION = "compression_fidelity"


class CompressionFidelityMonitor(Monitor):
    name = "compression_fidelity"
    kinds = ("compression_fidelity", "cannot_assess")
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        cfg = config.compression_fidelity
        if not cfg.enabled or ctx.parent_data is None:
            return []
        data, pdata = ctx.data, ctx.parent_data
        parent_labels = ctx.parent.labels if ctx.parent is not None else ctx.bundle.labels
        if pdata.logits.shape[1] != len(parent_labels):
            return [self._cannot(f"parent logits have {pdata.logits.shape[1]} columns for {len(parent_labels)} labels")]
        common = [name for name in ctx.bundle.labels if name in parent_labels]
        prow = {name: i for i, name in enumerate(pdata.image_names)}
        valid, pvalid = finite_rows(data), finite_rows(pdata)
        rows = np.array([i for i, name in enumerate(data.image_names)
                         if valid[i] and name in prow and pvalid[prow[name]]], dtype=int)
        if not common or not len(rows):
            return [self._cannot("no images or labels in common with the parent's outputs")]
        cols = [ctx.bundle.labels.index(n) for n in common]
        pcols = [parent_labels.index(n) for n in common]
        z = np.asarray(data.logits, dtype=np.float64)[np.ix_(rows, cols)]
        pz = np.asarray(pdata.logits, dtype=np.float64)[np.ix_([prow[data.image_names[i]] for i in rows], pcols)]
        delta = np.abs(z - pz)
        max_delta = float(delta.max())
        if not max_delta > cfg.max_logit_delta:
            return []
        thr = np.asarray(ctx.bundle.meta.thresholds, dtype=np.float64)[cols]
        pthr = np.asarray((ctx.parent.meta.thresholds if ctx.parent is not None else ctx.bundle.meta.thresholds),
                          dtype=np.float64)[pcols]
        flips = (sigmoid(z) >= thr) != (sigmoid(pz) >= pthr)
        flip_rate = float(flips.mean())
        worst = rows[np.argsort(-delta.max(axis=1), kind="stable")]
        return [self.fact(
            "compression_fidelity",
            label=None,
            severity="high" if flip_rate > cfg.max_flip_rate else "medium",
            message=f"compressed model departs from its parent: max |delta logit| {max_delta:.3g} "
                    f"(tolerance {cfg.max_logit_delta:g}), {int(flips.sum())} decision flip(s) "
                    f"({flip_rate:.2%} of image-label pairs).",
            measured={"max_logit_delta": max_delta, "mean_logit_delta": float(delta.mean()),
                      "flip_rate": flip_rate, "n_flips": int(flips.sum()), "n": int(len(rows))},
            reference={"max_logit_delta": 0.0},
            threshold={f"{_SECTION}.max_logit_delta": cfg.max_logit_delta},
            evidence={
                "per_label_max_delta": {n: float(delta[:, j].max()) for j, n in enumerate(common)},
                "per_label_flips": {n: int(flips[:, j].sum()) for j, n in enumerate(common) if flips[:, j].any()},
                "worst_ids": sample_ids(data.image_names, worst, config.max_evidence_ids),
                "parent_weights_hash": pdata.weights_hash,
            },
        )]

    def _cannot(self, reason: str) -> IssueFact:
        return self.fact("cannot_assess", label=None, severity="low",
                         message=f"compression fidelity cannot be assessed: {reason}.", evidence={"reason": reason})
