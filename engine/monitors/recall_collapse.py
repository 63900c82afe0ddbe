"""Recall collapse: the deployed threshold now misses positives it used to catch.

Fires when recall at the deployed threshold is below ``min_recall_ratio`` x the reference
sensitivity *and* a one-sided Fisher exact test of (detected, missed) here against the reference's
counts says recall is lower at ``alpha`` divided by the number of labels compared (a
Clopper-Pearson bound against the reference value when the reference counts are unknown), so two
misses out of three positives, or a reference sensitivity of 1.0 measured on two positives, do not
raise an alarm. Labels with fewer than ``min_comparison_positives`` positives here or in the
reference are skipped (``validity`` reports them). ``positives`` is in ``measured``: the rules only
propose retraining when enough labelled positives exist.
"""

from __future__ import annotations

from scipy.stats import beta, fisher_exact

from engine.core.facts import IssueFact
from engine.monitors.base import (
    Monitor,
    MonitorContext,
    comparable,
    iter_labels,
    sample_ids,
)
from model.metrics import auroc, confusion_at
from rules.policy.monitors import MonitorConfig

__all__ = ["RecallCollapseMonitor", "recall_upper_bound"]

_SECTION = "recall_collapse"


def recall_upper_bound(tp: int, positives: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound of a binomial proportion tp / positives."""
    if tp >= positives:
        return 1.0
    return float(beta.ppf(1 - alpha, tp + 1, positives - tp))


class RecallCollapseMonitor(Monitor):
    name = "recall_collapse"
    kinds = ("recall_collapse",)
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        # The family is every comparable label, enabled or not (a fact must not depend on which other
        # labels a re-check switched off).
        labs = [lab for lab in iter_labels(ctx, config)
                if (lab.reference.get("sensitivity") or 0) > 0 and comparable(lab, config)]
        facts = []
        for lab in labs:
            cfg_all = config.for_label(lab.name)
            cfg = cfg_all.recall_collapse
            if not cfg.enabled:
                continue
            ref_sens = float(lab.reference["sensitivity"])
            level = cfg.alpha / len(labs)  # family-wise over the labels compared in this audit
            conf = confusion_at(lab.y, lab.probs, lab.threshold)
            recall = conf["sensitivity"]
            limit = cfg.min_recall_ratio * ref_sens
            if not recall < limit:
                continue
            ref_tp, ref_fn = lab.reference.get("tp"), lab.reference.get("fn")
            if ref_tp is not None and ref_fn is not None:
                test = "Fisher exact (one-sided) against the reference counts"
                pvalue = float(fisher_exact([[conf["tp"], conf["fn"]], [int(ref_tp), int(ref_fn)]],
                                            alternative="less").pvalue)
                if not pvalue < level:
                    continue
            else:
                test = "Clopper-Pearson bound against the reference sensitivity"
                pvalue = None
                if recall_upper_bound(conf["tp"], lab.positives, level) >= ref_sens:
                    continue
            upper = recall_upper_bound(conf["tp"], lab.positives, level)
            missed = lab.rows[(lab.y == 1) & (lab.probs < lab.threshold)]
            # 'high' when recall is below the limit by the high-severity factor (e.g. under half of it).
            severity = "high" if recall * cfg_all.high_severity_factor <= limit else "medium"
            facts.append(self.fact(
                "recall_collapse",
                label=lab.name,
                severity=severity,
                message=f"{lab.name}: recall {recall:.2f} ({conf['tp']}/{lab.positives}) at threshold "
                        f"{lab.threshold:.3f}, below {cfg.min_recall_ratio:g} x reference sensitivity {ref_sens:.2f}.",
                measured={"sensitivity": recall, "recall": recall, "recall_upper": upper, "p_value": pvalue,
                          "level": level, "tp": conf["tp"], "fn": conf["fn"], "positives": lab.positives, "n": len(lab.y), "specificity": conf["specificity"],
                          "auroc": auroc(lab.y, lab.probs)},
                # reference: only metrics comparable with measured ones (verification reads their gaps)
                reference={k: lab.reference.get(k) for k in ("sensitivity", "specificity", "auroc")},
                threshold={f"{_SECTION}.min_recall_ratio": cfg.min_recall_ratio, f"{_SECTION}.alpha": cfg.alpha},
                evidence={"test": test, "n_missed": int(len(missed)), "deployed_threshold": lab.threshold,
                          "reference_counts": {k: lab.reference.get(k) for k in ("positives", "tp", "fn", "n")},
                          "missed_ids": sample_ids(ctx.data.image_names, missed, cfg_all.max_evidence_ids)},
            ))
        return facts
