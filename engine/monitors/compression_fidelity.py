"""Compression fidelity: the compressed model departs from its parent more than it was accepted with.

Needs the parent's logits on the same images (``MonitorContext.parent_data``); without them there
is nothing to compare and the monitor is silent. A lossy compression never reproduces its parent
exactly, so the question is not "is there a difference" but "is it worse than when the compression
was accepted": the bundle carries that record (``model.compression.accepted``: mean |Δlogit| and
decision flip rate at the thresholds, model-wide and per label, with intervals, measured on the
calibration holdout). Criteria, each named in the fact:

- ``flip_rate`` / ``mean_logit_delta`` (model-wide) and ``label_flip_rate`` / ``label_mean_logit_delta``
  (per label: pruning hurts rare findings first): the audited interval's lower bound lies above
  ``min_ratio`` x the accepted interval's upper bound (per-label intervals, audited and accepted,
  family-wise over the labels). The margin is there because the holdout is small and its
  intervals treat images as independent although a patient's follow-ups look alike;
- ``policy_flip_rate``: the audited flip rate's Wilson lower bound exceeds ``max_flip_rate``;
- ``max_logit_delta``: max |Δlogit| above ``max_logit_delta`` when the policy sets it, or above
  ``legacy_max_logit_delta`` for a bundle without a record (compressed before records existed).

One model-wide fact (``label=None``), severity high when decisions flip beyond a bound, medium when
only logits moved. Too few audited images for the comparison: a ``cannot_assess`` fact says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.core.facts import IssueFact
from engine.monitors.base import Monitor, MonitorContext, finite_rows, sample_ids
from model.compression.accepted import (
    FidelityRecord,
    accepted_fidelity,
    measure_fidelity,
)
from model.interval import Interval
from rules.policy.monitors import CompressionFidelityConfig, MonitorConfig

__all__ = ["CompressionFidelityMonitor"]

_SECTION = "compression_fidelity"
_FLIP_CRITERIA = ("flip_rate", "label_flip_rate", "policy_flip_rate")


def _worse(audited: Interval, accepted: Interval, ratio: float) -> bool:
    """Worse beyond noise and materially: the audited lower bound above ``ratio`` x the accepted upper bound."""
    return audited.low is not None and accepted.high is not None and audited.low > ratio * accepted.high


def _pair(criterion: str, label: str | None, audited: Interval, accepted: Interval | None = None,
          bound: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"criterion": criterion, "label": label, "audited": audited.to_dict()}
    if accepted is not None:
        row["accepted"] = accepted.to_dict()
    if bound is not None:
        row["bound"] = bound
    return row


def _against_record(audited: FidelityRecord, record: FidelityRecord, ratio: float) -> list[dict[str, Any]]:
    """Every record criterion that fired (model-wide, then per label in the bundle's order)."""
    fired = [_pair(name, None, getattr(audited, attr), getattr(record, attr))
             for name, attr in (("flip_rate", "flip_rate"), ("mean_logit_delta", "mean_abs_dlogit"))
             if _worse(getattr(audited, attr), getattr(record, attr), ratio)]
    for label, now in audited.per_label.items():
        then = record.per_label.get(label)
        if then is None:
            continue
        fired += [_pair(name, label, getattr(now, attr), getattr(then, attr))
                  for name, attr in (("label_flip_rate", "flip_rate"), ("label_mean_logit_delta", "mean_abs_dlogit"))
                  if _worse(getattr(now, attr), getattr(then, attr), ratio)]
    return fired


def _thresholds(cfg: CompressionFidelityConfig, fired: list[dict[str, Any]]) -> dict[str, Any]:
    """The policy keys behind the criteria that fired, with their values (as the config holds them)."""
    names = {f["criterion"] for f in fired}
    out: dict[str, Any] = {}
    if names - {"policy_flip_rate", "max_logit_delta"}:
        out[f"{_SECTION}.compare_to_accepted"] = cfg.compare_to_accepted
        out[f"{_SECTION}.level"] = cfg.level
        out[f"{_SECTION}.min_ratio"] = cfg.min_ratio
    if "policy_flip_rate" in names:
        out[f"{_SECTION}.max_flip_rate"] = cfg.max_flip_rate
    if "max_logit_delta" in names:
        key = "max_logit_delta" if cfg.max_logit_delta is not None else "legacy_max_logit_delta"
        out[f"{_SECTION}.{key}"] = getattr(cfg, key)
    return out


class CompressionFidelityMonitor(Monitor):
    name = "compression_fidelity"
    kinds = ("compression_fidelity", "cannot_assess")
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        cfg = config.compression_fidelity
        if not cfg.enabled or ctx.parent_data is None:
            return []
        aligned = self._aligned(ctx)
        if isinstance(aligned, str):
            return [self._cannot(aligned)]
        rows, common, z, pz, thr, pthr = aligned
        record = accepted_fidelity(ctx.bundle)
        n = len(rows)
        audited = measure_fidelity(pz, z, pthr, thr, common, where=f"audited data ({n} images)", level=cfg.level,
                                   n_boot=cfg.n_boot, seed=config.seed)
        fired: list[dict[str, Any]] = []
        out: list[IssueFact] = []
        if record is not None and cfg.compare_to_accepted:
            if n < cfg.min_images:
                out.append(self._cannot(f"{n} audited image(s) in common with the parent, fewer than "
                                        f"compression_fidelity.min_images ({cfg.min_images}) for a comparison "
                                        "with the accepted fidelity"))
            else:
                fired += _against_record(audited, record, cfg.min_ratio)
        if cfg.max_flip_rate is not None and audited.flip_rate.low is not None \
                and audited.flip_rate.low > cfg.max_flip_rate:
            fired.append(_pair("policy_flip_rate", None, audited.flip_rate, bound=cfg.max_flip_rate))
        bound = cfg.max_logit_delta if cfg.max_logit_delta is not None else (
            cfg.legacy_max_logit_delta if record is None else None)
        if bound is not None and audited.max_abs_dlogit > bound:
            fired.append({"criterion": "max_logit_delta", "label": None, "audited": audited.max_abs_dlogit,
                          "bound": bound})
        if fired:
            out.insert(0, self._fact(ctx, config, audited, record, fired, rows, z, pz))
        return out

    def _aligned(self, ctx: MonitorContext) -> str | tuple[np.ndarray, list[str], np.ndarray, np.ndarray,
                                                          np.ndarray, np.ndarray]:
        """Rows and labels in common with the parent's outputs, their logits and thresholds; or why not."""
        data, pdata = ctx.data, ctx.parent_data
        assert pdata is not None
        parent_labels = ctx.parent.labels if ctx.parent is not None else ctx.bundle.labels
        if pdata.logits.shape[1] != len(parent_labels):
            return f"parent logits have {pdata.logits.shape[1]} columns for {len(parent_labels)} labels"
        common = [name for name in ctx.bundle.labels if name in parent_labels]
        prow = {name: i for i, name in enumerate(pdata.image_names)}
        valid, pvalid = finite_rows(data), finite_rows(pdata)
        rows = np.array([i for i, name in enumerate(data.image_names)
                         if valid[i] and name in prow and pvalid[prow[name]]], dtype=int)
        if not common or not len(rows):
            return "no images or labels in common with the parent's outputs"
        cols = [ctx.bundle.labels.index(n) for n in common]
        pcols = [parent_labels.index(n) for n in common]
        z = np.asarray(data.logits, dtype=np.float64)[np.ix_(rows, cols)]
        pz = np.asarray(pdata.logits, dtype=np.float64)[np.ix_([prow[data.image_names[i]] for i in rows], pcols)]
        thr = np.asarray(ctx.bundle.meta.thresholds, dtype=np.float64)[cols]
        pthr = np.asarray((ctx.parent.meta.thresholds if ctx.parent is not None else ctx.bundle.meta.thresholds),
                          dtype=np.float64)[pcols]
        return rows, common, z, pz, thr, pthr

    def _fact(self, ctx: MonitorContext, config: MonitorConfig, audited: FidelityRecord,
              record: FidelityRecord | None, fired: list[dict[str, Any]], rows: np.ndarray, z: np.ndarray,
              pz: np.ndarray) -> IssueFact:
        names = sorted({f["criterion"] for f in fired})
        flips_beyond = any(f["criterion"] in _FLIP_CRITERIA for f in fired)
        if record is None:  # legacy: any flipped decision is serious, as before records existed
            flips_beyond = flips_beyond or audited.flips > 0
        labels = sorted({f["label"] for f in fired if f["label"] is not None})
        against = (f"accepted on the {record.where}: mean |delta logit| {record.mean_abs_dlogit.text(3)}, flip rate "
                   f"{record.flip_rate.text(4)}" if record is not None else "no accepted-fidelity record (legacy)")
        delta = np.abs(z - pz)
        worst = rows[np.argsort(-delta.max(axis=1), kind="stable")]
        return self.fact(
            "compression_fidelity",
            label=None,
            severity="high" if flips_beyond else "medium",
            message=f"compressed model departs from its parent ({', '.join(names)}"
                    f"{'; labels ' + ', '.join(labels) if labels else ''}): mean |delta logit| "
                    f"{audited.mean_abs_dlogit.text(3)}, max {audited.max_abs_dlogit:.3g}, {audited.flips} decision "
                    f"flip(s) ({audited.flip_rate.text(4)} of image-label pairs); {against}.",
            measured={"max_logit_delta": audited.max_abs_dlogit, "mean_logit_delta": audited.mean_abs_dlogit.estimate,
                      "flip_rate": audited.flip_rate.estimate, "n_flips": audited.flips, "n": audited.n_images},
            reference={"max_logit_delta": record.max_abs_dlogit if record is not None else 0.0},
            threshold=_thresholds(config.compression_fidelity, fired),
            evidence={
                "criteria": fired,
                "audited": audited.to_json(),
                "accepted": record.to_json() if record is not None else None,
                "per_label_max_delta": {n: v.max_abs_dlogit for n, v in audited.per_label.items()},
                "per_label_flips": {n: v.flips for n, v in audited.per_label.items() if v.flips},
                "worst_ids": sample_ids(ctx.data.image_names, worst, config.max_evidence_ids),
                "parent_weights_hash": ctx.parent_data.weights_hash if ctx.parent_data is not None else None,
            },
        )

    def _cannot(self, reason: str) -> IssueFact:
        return self.fact("cannot_assess", label=None, severity="low",
                         message=f"compression fidelity cannot be assessed: {reason}.", evidence={"reason": reason})
