"""AUROC drop: the ranking itself got worse, beyond what resampling noise explains.

Fires when ``reference - auroc - max_drop`` exceeds ``z(1 - alpha/2)`` standard errors of the
difference, the standard error combining this data's bootstrap (``n_boot`` resamples) with the
reference's own (read off its stored 95 % CI): noise on a handful of positives, here or in the
reference, does not fire it. Without a reference CI this reduces to "the upper CI bound of this
data's AUROC is below reference - max_drop". Labels with fewer than ``min_comparison_positives``
positives here or in the reference are skipped (``validity`` reports them): the bootstrap of one
positive's rank looks precise and is not. The bootstrap only
runs when the point estimate is already below the line, which keeps a healthy audit cheap.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from engine.facts import IssueFact
from engine.monitors.base import (
    Monitor,
    MonitorContext,
    bootstrap_counts,
    comparable,
    iter_labels,
    register_monitor,
    severity_for,
    weighted_auroc,
)
from engine.monitors.config import MonitorConfig
from model.metrics import auroc

__all__ = ["AurocDropMonitor"]

_SECTION = "auroc_drop"


@register_monitor
class AurocDropMonitor(Monitor):
    name = "auroc_drop"
    kinds = ("auroc_drop",)
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        facts = []
        for lab in iter_labels(ctx, config):
            cfg_all = config.for_label(lab.name)
            cfg = cfg_all.auroc_drop
            ref_auc = lab.reference.get("auroc")
            if not cfg.enabled or ref_auc is None or not comparable(lab, config):
                continue
            auc = auroc(lab.y, lab.logits)
            line = ref_auc - cfg.max_drop
            if not auc < line:
                continue
            boot = weighted_auroc(lab.y, lab.logits, bootstrap_counts(len(lab.y), cfg.n_boot, [config.seed, lab.k, 2]))
            boot = boot[np.isfinite(boot)]
            if not len(boot):
                continue
            lo, hi = (float(v) for v in np.quantile(boot, [cfg.alpha / 2, 1 - cfg.alpha / 2]))
            z = float(norm.ppf(1 - cfg.alpha / 2))
            se = float(boot.std(ddof=1))
            ref_lo, ref_hi = lab.reference.get("auroc_ci_low"), lab.reference.get("auroc_ci_high")
            ref_se = (ref_hi - ref_lo) / (2 * float(norm.ppf(0.975))) if ref_lo is not None and ref_hi is not None else 0.0
            margin = z * float(np.hypot(se, ref_se))
            if ref_se == 0.0:
                fired = hi < line  # percentile CI of this data only
            else:
                fired = ref_auc - auc - cfg.max_drop > margin
            if not fired:
                continue
            facts.append(self.fact(
                "auroc_drop",
                label=lab.name,
                severity=severity_for(ref_auc - auc, cfg.max_drop, cfg_all),
                message=f"{lab.name}: AUROC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}) below reference {ref_auc:.3f} "
                        f"minus {cfg.max_drop:g}.",
                measured={"auroc": auc, "auroc_ci_low": lo, "auroc_ci_high": hi, "drop": ref_auc - auc,
                          "auroc_se": se, "reference_se": ref_se, "margin": margin,
                          "positives": lab.positives, "n": len(lab.y)},
                reference={k: lab.reference.get(k) for k in ("auroc", "auroc_ci_low", "auroc_ci_high", "positives")},
                threshold={f"{_SECTION}.max_drop": cfg.max_drop, f"{_SECTION}.alpha": cfg.alpha},
                evidence={"n_boot": cfg.n_boot, "ci_level": 1 - cfg.alpha},
            ))
        return facts
