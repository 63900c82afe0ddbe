"""Prevalence shift: a label is much more or less common than in the reference split.

Informational (severity ``info``): a prevalence change alone needs no treatment of the model, but it
moves PPV and ECE and explains other facts. Judged with Fisher's exact test on the audited counts
against the reference counts (chi-square when every expected count is >= 5; a binomial test when
the reference size is unknown), Bonferroni-
corrected over the labels tested, plus a minimum absolute change. Labels without positives are
tested too: a prevalence that fell to zero is itself a shift.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, chi2_contingency, fisher_exact

from engine.core.facts import IssueFact
from engine.monitors.base import Monitor, MonitorContext, finite_rows
from model.labels import CHEXNET_LABELS
from rules.policy.monitors import MonitorConfig

__all__ = ["PrevalenceShiftMonitor"]

_SECTION = "prevalence_shift"


class PrevalenceShiftMonitor(Monitor):
    name = "prevalence_shift"
    kinds = ("prevalence_shift",)
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        valid = finite_rows(ctx.data)
        n = int(valid.sum())
        if n == 0:
            return []
        labels = np.asarray(ctx.data.labels)[valid]
        tests = []
        for name in ctx.bundle.labels:
            ref = ctx.bundle.meta.reference_metrics.get(name) or {}
            if name not in CHEXNET_LABELS or ref.get("prevalence") is None:
                continue  # (disabled labels still count in the Bonferroni family: see below)
            pos = int(labels[:, CHEXNET_LABELS.index(name)].sum())
            ref_n, ref_pos = ref.get("n"), ref.get("positives")
            if ref_n and ref_pos is not None:
                ref_n, ref_pos = int(ref_n), int(ref_pos)
                table = np.array([[pos, n - pos], [ref_pos, ref_n - ref_pos]], dtype=float)
                expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
                if expected.min() >= 5:  # large counts: the chi-square test (Fisher's exact is slow there)
                    pvalue = float(chi2_contingency(table, correction=False).pvalue)
                    test = "chi-square"
                else:
                    pvalue = float(fisher_exact(table.astype(int)).pvalue)
                    test = "Fisher exact"
            else:
                pvalue = float(binomtest(pos, n, min(max(float(ref["prevalence"]), 0.0), 1.0)).pvalue)
                test = "binomial"
            tests.append((name, pos, pvalue, test, float(ref["prevalence"]), ref_n, ref_pos))
        facts = []
        for name, pos, pvalue, test, ref_prev, ref_n, ref_pos in tests:
            cfg = config.for_label(name).prevalence_shift
            if not cfg.enabled:  # the family is every testable label, so facts do not depend on switches
                continue
            level = cfg.alpha / len(tests)
            prev = pos / n
            if pvalue < level and abs(prev - ref_prev) >= cfg.min_abs_change:
                facts.append(self.fact(
                    "prevalence_shift",
                    label=name,
                    severity="info",
                    message=f"{name}: prevalence {prev:.3f} ({pos}/{n}) vs reference {ref_prev:.3f} "
                            f"({test} p={pvalue:.2g}).",
                    measured={"prevalence": prev, "positives": pos, "n": n, "p_value": pvalue},
                    reference={"prevalence": ref_prev},
                    threshold={f"{_SECTION}.alpha": cfg.alpha, f"{_SECTION}.min_abs_change": cfg.min_abs_change},
                    evidence={"test": test, "bonferroni_level": level, "labels_tested": len(tests),
                              "reference_counts": {"positives": ref_pos, "n": ref_n}},
                ))
        return facts
