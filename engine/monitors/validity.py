"""Degenerate inputs as facts: non-finite model outputs, and labels that cannot be assessed.

Runs before every other monitor. The others skip the rows and labels reported here, so a NaN
logit or a label without positives yields one explicit fact instead of a crash or a silent gap:

* ``invalid_output`` (critical, model-wide): rows with NaN/inf logits or features, by image id;
* ``cannot_assess`` (low): a label with fewer than ``min_positives`` positives or no negatives,
  without a ground-truth column, or without reference metrics; every label monitor skips it, except
  that calibration_drift still checks where the threshold sits among the negatives when only
  positives are missing (``evidence.skipped`` lists what is skipped then);
* ``cannot_assess`` (info): a label whose sensitivity/AUROC rest on fewer than
  ``min_comparison_positives`` positives (here or in the reference); only recall_collapse,
  auroc_drop and "ranking intact" skip it, calibration is still checked.
"""

from __future__ import annotations

import numpy as np

from engine.core.facts import IssueFact
from engine.monitors.base import (
    Monitor,
    MonitorContext,
    comparison_problem,
    finite_rows,
    label_gate,
    sample_ids,
)
from model.labels import CHEXNET_LABELS
from rules.policy.monitors import MonitorConfig

__all__ = ["NEGATIVES_ONLY_SKIPPED", "ValidityMonitor"]

#: What a label with too few positives (but negatives and a reference) skips: every per-label
#: check except calibration_drift's threshold displacement, which reads the negatives only.
NEGATIVES_ONLY_SKIPPED = ["recall_collapse", "auroc_drop", "fp_cluster",
                          "calibration_drift.ece", "calibration_drift.operating_point"]


class ValidityMonitor(Monitor):
    """``invalid_output`` for rows with NaN/inf logits or features; ``cannot_assess`` per skipped label."""

    name = "validity"
    kinds = ("invalid_output", "cannot_assess")

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        facts: list[IssueFact] = []
        data = ctx.data
        valid = finite_rows(data)
        logits = np.asarray(data.logits)
        if not valid.all():
            bad = np.flatnonzero(~valid)
            per_label = {name: int((~np.isfinite(logits[:, k])).sum()) for k, name in enumerate(ctx.bundle.labels)}
            feats = np.asarray(data.features)
            bad_features = int((~np.isfinite(feats).all(axis=1)).sum()) if feats.ndim == 2 and feats.shape[1] else 0
            facts.append(self.fact(
                "invalid_output",
                label=None,
                severity="critical",
                message=f"{len(bad)} of {len(data)} images give non-finite outputs (NaN/inf logits or features); "
                        "they are excluded from every other monitor.",
                measured={"n_invalid": len(bad), "n": len(data), "n_invalid_features": bad_features},
                evidence={"sample_ids": sample_ids(data.image_names, bad, config.max_evidence_ids),
                          "non_finite_logits_per_label": {k: v for k, v in per_label.items() if v}},
            ))
        labels = np.asarray(data.labels)
        for k, name in enumerate(ctx.bundle.labels):
            reason = label_gate(ctx, config, k, valid)
            cfg = config.for_label(name)
            ref = ctx.bundle.meta.reference_metrics.get(name) or {}
            if reason is None:
                positives = int(labels[valid, CHEXNET_LABELS.index(name)].sum())
                problem = comparison_problem(ref, positives, config, name)
                if problem is not None:
                    facts.append(self.fact(
                        "cannot_assess",
                        label=name,
                        severity="info",
                        message=f"{name}: recall and AUROC not compared: {problem}; calibration still checked.",
                        measured={"positives": positives, "reference_positives": ref.get("positives")},
                        threshold={"min_comparison_positives": cfg.min_comparison_positives},
                        evidence={"reason": problem, "skipped": ["recall_collapse", "auroc_drop",
                                                                 "calibration_drift.auroc_intact"]},
                    ))
                continue
            measured: dict[str, float | int | None] = {"n": int(valid.sum())}
            threshold: dict[str, float | int] = {}
            if name in CHEXNET_LABELS:
                y = labels[valid, CHEXNET_LABELS.index(name)]
                measured.update(positives=int(y.sum()), negatives=int(len(y) - y.sum()))
                if int(y.sum()) < cfg.min_positives:
                    threshold["min_positives"] = cfg.min_positives
            evidence: dict[str, object] = {"reason": reason}
            message = f"{name}: cannot assess: {reason}."
            if label_gate(ctx, config, k, valid, need_positives=False) is None:
                # Too few positives, but negatives and a reference: the threshold displacement
                # (calibration_drift) needs nothing else, so it still runs; everything else is skipped.
                evidence["skipped"] = NEGATIVES_ONLY_SKIPPED
                message = (f"{name}: cannot assess: {reason}; only where the threshold sits among the negatives "
                           "is still checked (calibration_drift).")
            facts.append(self.fact(
                "cannot_assess",
                label=name,
                severity="low",
                message=message,
                measured=measured,
                threshold=threshold,
                evidence=evidence,
            ))
        return facts
