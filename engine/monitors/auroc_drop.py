"""AUROC drop: the ranking itself got worse, beyond what resampling noise explains.

Fires when ``reference - auroc - max_drop`` exceeds ``z`` standard errors of the difference, the
standard error combining this data's (bootstrap over ``n_boot`` resamples) with the reference's
(read off its stored 95 % CI), each floored by the Hanley-McNeil formula because a bootstrap over a
handful of positives looks more precise than it is. ``z`` is two-sided at ``alpha`` divided by the
number of labels compared (family-wise: one audit tests 14 labels). Without a reference CI this is
"the upper confidence bound of this data's AUROC is below reference - max_drop". Labels with fewer
than ``min_comparison_positives`` positives here or in the reference are skipped (``validity``
reports them): the bootstrap of one positive's rank looks precise and is not. The bootstrap only
runs when the point estimate is already below the line, which keeps a healthy audit cheap.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from engine.core.facts import IssueFact
from engine.monitors.base import (
    Monitor,
    MonitorContext,
    auroc_se,
    bootstrap_counts,
    comparable,
    iter_labels,
    severity_for,
    weighted_auroc,
)
from model.metrics import auroc
from rules.policy.monitors import MonitorConfig

__all__ = ["AurocDropMonitor"]

_SECTION = "auroc_drop"


class AurocDropMonitor(Monitor):
    name = "auroc_drop"
    kinds = ("auroc_drop",)
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        # The family is every comparable label, enabled or not (a fact must not depend on which other
        # labels a re-check switched off).
        labs = [lab for lab in iter_labels(ctx, config) if lab.reference.get("auroc") is not None
                and comparable(lab, config)]
        facts = []
        for lab in labs:
            cfg_all = config.for_label(lab.name)
            cfg = cfg_all.auroc_drop
            if not cfg.enabled:
                continue
            ref = lab.reference
            ref_auc = float(ref["auroc"])
            auc = auroc(lab.y, lab.logits)
            line = ref_auc - cfg.max_drop
            if not auc < line:
                continue
            boot = weighted_auroc(lab.y, lab.logits, bootstrap_counts(len(lab.y), cfg.n_boot, [config.seed, lab.k, 2]))
            boot = boot[np.isfinite(boot)]
            if len(boot) < 2:
                continue
            level = cfg.alpha / len(labs)  # family-wise over the labels compared in this audit
            z = float(norm.ppf(1 - level / 2))
            se = max(float(boot.std(ddof=1)), auroc_se(auc, lab.positives, lab.negatives))
            ref_se = 0.0
            if ref.get("auroc_ci_low") is not None and ref.get("auroc_ci_high") is not None:
                ref_se = (ref["auroc_ci_high"] - ref["auroc_ci_low"]) / (2 * float(norm.ppf(0.975)))
            if ref.get("positives") and ref.get("n"):
                ref_se = max(ref_se, auroc_se(ref_auc, int(ref["positives"]), int(ref["n"] - ref["positives"])))
            margin = z * float(np.hypot(se, ref_se))
            if not ref_auc - auc - cfg.max_drop > margin:
                continue
            lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
            facts.append(self.fact(
                "auroc_drop",
                label=lab.name,
                severity=severity_for(ref_auc - auc, cfg.max_drop, cfg_all),
                message=f"{lab.name}: AUROC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}) below reference {ref_auc:.3f} "
                        f"minus {cfg.max_drop:g} by more than the noise margin {margin:.3f}.",
                measured={"auroc": auc, "auroc_ci_low": lo, "auroc_ci_high": hi, "drop": ref_auc - auc,
                          "auroc_se": se, "reference_se": ref_se, "margin": margin, "level": level,
                          "positives": lab.positives, "n": len(lab.y)},
                # reference: only metrics comparable with measured ones (verification reads their gaps)
                reference={"auroc": ref_auc},
                threshold={f"{_SECTION}.max_drop": cfg.max_drop, f"{_SECTION}.alpha": cfg.alpha},
                evidence={"n_boot": cfg.n_boot, "labels_compared": len(labs),
                          "reference_detail": {k: ref.get(k) for k in ("auroc_ci_low", "auroc_ci_high", "positives", "n")}},
            ))
        return facts
