"""FP cluster: a label's false positives share a cause that neither its true positives nor its
true negatives have (a shortcut, e.g. the chest drain that marks treated pneumothorax).

Per label, at the deployed threshold, in a 64-d PCA space of the standardised pooled features
(fitted once per audit):

1. **slice**: a shrinkage linear discriminant FPs-vs-TPs is cross-fitted (every image scored by a
   discriminant that did not see it); the slice is the FPs scoring above all but
   ``max_reference_share`` of the TPs. A shortcut lifts most FPs there; ordinary FPs do not. Its
   share of the FPs gets a permutation p-value (FP/TP labels shuffled, the slice re-cut), which
   must be below ``alpha``;
2. **unlike the negatives too**: along the slice-vs-TP discriminant (fitted without any TN) the
   slice must stand out from the true negatives (AUROC >= ``min_negative_separation_auroc``), and
   the cluster is the slice members that beat all but ``max_reference_share`` of the TNs. This is
   what tells a shortcut (something ordinary negatives lack too) from FPs that merely lack the
   finding the TPs have. It also rules out the score itself: FPs score between TNs and TPs, so no
   direction along the score sets them apart from both. (Regressing the logit direction out
   instead would remove the shortcut too, since a shortcut is what drives those logits up);
3. the cluster must hold ``min_share`` of the FPs (and ``min_fp`` images) and stay separable from
   the TPs (cross-fitted AUROC >= ``min_separation_auroc``).

The slice is "one cluster" in the sense that one direction of feature space sets all its members
apart. An earlier version clustered the FPs with k-means instead: on phantoms with an injected
chest-drain shortcut the k-means cells followed anatomy (the dominant variance), not the drain, and
split drains on the left from drains on the right; the discriminant finds the drain.

At least ``min_tp`` true positives are needed: the discriminant lives in 64 dimensions, and false
negatives would look different merely for scoring low.

Evidence: the member image ids; the classifier channels whose contribution ``w_kc * f_c`` is higher
on the cluster than on the TPs; and ``n_channels_needed``, the fewest of those channels whose
removal (zeroing ``w_kc``) pushes the cluster's mean logit below the threshold logit. The rules use
it: zeroing only when few channels explain the cluster.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.extmath import randomized_svd

from engine.core.facts import IssueFact
from engine.monitors.base import LabelData, Monitor, MonitorContext, iter_labels
from model.metrics import auroc, logit
from rules.policy.monitors import MonitorConfig

__all__ = ["FpClusterMonitor", "lda_direction", "crossfit_scores", "fp_slice", "slice_pvalue", "driving_channels", "channels_needed"]

_SECTION = "fp_cluster"
_PCA_ROWS = 2000


def _classifier_weights(ctx: MonitorContext) -> np.ndarray | None:
    layer = getattr(ctx.bundle.model, "classifier", None)
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    w = weight.detach().cpu().numpy().astype(np.float64)
    if w.shape != (len(ctx.bundle.labels), ctx.data.features.shape[1]):
        return None
    return w


def lda_direction(a: np.ndarray, b: np.ndarray, shrinkage: float = 0.5) -> np.ndarray:
    """Shrinkage linear discriminant direction separating rows of ``a`` (high) from rows of ``b``."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    resid = np.concatenate([a - mu_a, b - mu_b])
    cov = resid.T @ resid / max(len(resid) - 2, 1)
    target = np.trace(cov) / len(cov) * np.eye(len(cov))
    cov = (1 - shrinkage) * cov + shrinkage * target + 1e-9 * np.eye(len(cov))
    return np.linalg.solve(cov, mu_a - mu_b)


def crossfit_scores(a: np.ndarray, b: np.ndarray, *, seed: list[int], folds: int = 5,
                    others: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Out-of-fold discriminant scores (``a`` high vs ``b``) of every row of ``a`` and ``b``.

    Stratified folds: no row is scored by a discriminant fitted on it. Rows of ``others`` (never
    fitted on) get the mean score over the fold discriminants, returned as a third array.
    """
    x = np.concatenate([a, b])
    y = np.r_[np.ones(len(a), bool), np.zeros(len(b), bool)]
    n_folds = int(min(folds, len(a), len(b)))
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % n_folds
    scores = np.empty(len(y))
    other = np.zeros(0 if others is None else len(others))
    for f in range(n_folds):
        train, test = fold != f, fold == f
        direction = lda_direction(x[train & y], x[train & ~y])
        scores[test] = x[test] @ direction
        if others is not None:
            other += others @ direction / n_folds
    if others is None:
        return scores[: len(a)], scores[len(a):]
    return scores[: len(a)], scores[len(a):], other


def fp_slice(fp: np.ndarray, tp: np.ndarray, reference_share: float, *, seed: list[int]
             ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """FPs whose cross-fitted FP-vs-TP score beats all but ``reference_share`` of the TPs.

    Returns (membership mask over ``fp``, the cut, FP scores, TP scores).
    """
    s_fp, s_tp = crossfit_scores(fp, tp, seed=seed)
    cut = float(np.quantile(s_tp, 1 - reference_share))
    return s_fp > cut, cut, s_fp, s_tp


def slice_pvalue(fp: np.ndarray, tp: np.ndarray, observed_share: float, reference_share: float,
                 n_permutations: int, *, seed: list[int]) -> float:
    """Permutation p-value of the slice's share: FP/TP labels shuffled, the slice re-cut each time."""
    x = np.concatenate([fp, tp])
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_permutations):
        perm = rng.permutation(len(x))
        mask, *_ = fp_slice(x[perm[: len(fp)]], x[perm[len(fp):]], reference_share, seed=seed + [i])
        hits += bool(mask.mean() >= observed_share)
    return (1 + hits) / (1 + n_permutations)


def driving_channels(w: np.ndarray, cluster_feats: np.ndarray, tp_feats: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which classifier channels drive the cluster but not the true positives: the mean contributions
    ``w_c * f_c`` of the cluster and of the TPs, their difference, and the channels that push the
    cluster up more than the TPs, largest difference first."""
    c_cluster = w * cluster_feats.mean(axis=0, dtype=np.float64)
    c_ref = w * tp_feats.mean(axis=0, dtype=np.float64)
    delta = c_cluster - c_ref
    candidates = np.flatnonzero((delta > 0) & (c_cluster > 0))
    return c_cluster, c_ref, delta, candidates[np.argsort(-delta[candidates], kind="stable")]


def _all_members(examined: np.ndarray, rest: np.ndarray, on_rest: np.ndarray, on_tp: np.ndarray,
                 cut_tn: float, q: float) -> np.ndarray:
    """Membership over all FPs (the decision used at most ``max_points`` of them): the FPs not in the
    examined slice join when they beat both cuts on the same discriminant."""
    if not len(rest):
        return examined
    cut_tp = float(np.quantile(on_tp, 1 - q))
    return np.union1d(examined, rest[(on_rest > cut_tp) & (on_rest > cut_tn)])


def channels_needed(order: np.ndarray, cluster_contrib: np.ndarray, mean_logit: float, threshold_logit: float) -> int | None:
    """Fewest leading channels of ``order`` whose removal brings ``mean_logit`` below ``threshold_logit``."""
    if mean_logit < threshold_logit:
        return 0
    remaining = mean_logit - np.cumsum(cluster_contrib[order])
    hit = np.flatnonzero(remaining < threshold_logit)
    return int(hit[0] + 1) if len(hit) else None


def _pca_scores(feats: np.ndarray, rows: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Scores of ``rows`` on the leading principal axes of the standardised features (fitted on a sample)."""
    rng = np.random.default_rng([seed, 6])
    sample = feats[np.sort(rng.permutation(rows)[:_PCA_ROWS])].astype(np.float64)
    mean, std = sample.mean(axis=0), sample.std(axis=0)
    std = np.where(std > 1e-8 * max(float(std.max()), 1e-30), std, np.inf)  # constant channels drop out
    k = int(min(n_components, len(sample) - 1, feats.shape[1]))
    _, _, vt = randomized_svd((sample - mean) / std, k, n_iter=4, random_state=seed)
    proj = (vt / std).T.astype(np.float32)  # standardise and project in one float32 matmul
    offset = (mean / std) @ vt.T
    block = feats if len(rows) == len(feats) else feats[rows]
    return (np.asarray(block, dtype=np.float32) @ proj).astype(np.float64) - offset


class FpClusterMonitor(Monitor):
    name = "fp_cluster"
    kinds = ("fp_cluster", "cannot_assess")
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        if not any(config.for_label(n).fp_cluster.enabled for n in ctx.bundle.labels):
            return []
        weights = _classifier_weights(ctx)
        if weights is None:
            return [self.fact("cannot_assess", label=None, severity="low",
                              message="fp_cluster cannot assess: the bundle's classifier is not a Linear layer on the "
                                      "pooled features.", evidence={"reason": "no linear classifier on the features"})]
        feats = np.asarray(ctx.data.features)  # float32, not copied: only slices are widened
        space: np.ndarray | None = None
        facts = []
        for lab in iter_labels(ctx, config):
            cfg_all = config.for_label(lab.name)
            if not cfg_all.fp_cluster.enabled:
                continue
            pred = lab.probs >= lab.threshold
            enough = ((pred & (lab.y == 0)).sum() >= cfg_all.fp_cluster.min_fp
                      and (pred & (lab.y == 1)).sum() >= cfg_all.fp_cluster.min_tp)
            if not enough:
                continue
            if space is None:  # one PCA basis per audit, rows aligned with lab.rows
                space = _pca_scores(feats, lab.rows, config.fp_cluster.n_components, config.seed)
            fact = self._check(ctx, cfg_all, lab, feats, weights[lab.k], space)
            if fact is not None:
                facts.append(fact)
        return facts

    def _check(self, ctx: MonitorContext, config: MonitorConfig, lab: LabelData, feats: np.ndarray,
               w: np.ndarray, space: np.ndarray) -> IssueFact | None:
        cfg = config.fp_cluster
        pred = lab.probs >= lab.threshold
        fp_pos = np.flatnonzero(pred & (lab.y == 0))  # positions within lab.rows / space
        tp_pos = np.flatnonzero(pred & (lab.y == 1))
        tn_pos = np.flatnonzero(~pred & (lab.y == 0))
        rng = np.random.default_rng([config.seed, lab.k, 3])
        x = space

        def sub(pos: np.ndarray) -> np.ndarray:
            return np.sort(rng.permutation(pos)[: cfg.max_points])

        fp_s, tp_s, tn_s = sub(fp_pos), sub(tp_pos), sub(tn_pos)
        if len(tn_s) < 2:
            return None
        q = cfg.max_reference_share
        mask, cut, s_fp, s_tp = fp_slice(x[fp_s], x[tp_s], q, seed=[config.seed, lab.k, 4])
        if mask.mean() < cfg.min_share or mask.sum() < cfg.min_fp:
            return None
        # Unlike the TNs too: along the slice-vs-TP discriminant (cross-fitted; never fitted on a TN)
        # the slice must stand out from the TNs, and its members must beat all but q of the TNs.
        rest = fp_pos[:0] if len(fp_s) == len(fp_pos) else np.setdiff1d(fp_pos, fp_s)
        on_slice, on_tp, on_other = crossfit_scores(x[fp_s][mask], x[tp_s], seed=[config.seed, lab.k, 6],
                                                    others=np.concatenate([x[tn_s], x[rest]]))
        on_tn, on_rest = on_other[: len(tn_s)], on_other[len(tn_s):]
        sep_tn = auroc(np.r_[np.ones(len(on_slice)), np.zeros(len(on_tn))], np.r_[on_slice, on_tn])
        cut_tn = float(np.quantile(on_tn, 1 - q))
        in_cluster = on_slice > cut_tn
        share = float(in_cluster.sum() / len(fp_s))
        if share < cfg.min_share or in_cluster.sum() < cfg.min_fp:
            return None
        sep_tp = auroc(np.r_[np.ones(in_cluster.sum()), np.zeros(len(s_tp))], np.r_[s_fp[mask][in_cluster], s_tp])
        if not (sep_tp >= cfg.min_separation_auroc and sep_tn >= cfg.min_negative_separation_auroc):
            return None
        pvalue = slice_pvalue(x[fp_s], x[tp_s], float(mask.mean()), q, cfg.n_permutations,
                              seed=[config.seed, lab.k, 5])
        if not pvalue < cfg.alpha:
            return None

        member_pos = _all_members(fp_s[mask][in_cluster], rest, on_rest, on_tp, cut_tn, q)
        cluster, tp = lab.rows[member_pos], lab.rows[tp_pos]
        share_all = len(member_pos) / len(fp_pos)

        c_cluster, c_ref, delta, order = driving_channels(w, feats[cluster], feats[tp])
        mean_logit = float(lab.logits[member_pos].mean())
        thr_logit = logit(lab.threshold)
        needed = channels_needed(order, c_cluster, mean_logit, thr_logit)
        top = order[: cfg.max_channels]
        severity = "high" if len(cluster) >= config.high_severity_factor * cfg.min_fp else "medium"
        return self.fact(
            "fp_cluster",
            label=lab.name,
            severity=severity,
            message=f"{lab.name}: {len(cluster)} of {len(fp_pos)} false positives ({share_all:.0%}) form one cluster "
                    f"unlike the true positives (AUROC {sep_tp:.2f}) and the true negatives (AUROC {sep_tn:.2f}), "
                    f"permutation p={pvalue:.2g}; "
                    + (f"{needed} classifier channel(s) explain it." if needed is not None
                       else "no small set of classifier channels explains it."),
            measured={"n_fp": len(fp_pos), "n_tp": len(tp_pos), "n_tn": len(tn_pos), "positives": lab.positives,
                      "cluster_size": len(cluster), "share": share_all, "separation_auroc": sep_tp,
                      "negative_separation_auroc": sep_tn, "p_value": pvalue, "n_channels_needed": needed,
                      "cluster_mean_logit": mean_logit, "threshold_logit": thr_logit},
            reference={"threshold": lab.threshold, "specificity": lab.reference.get("specificity")},
            threshold={f"{_SECTION}.min_share": cfg.min_share, f"{_SECTION}.min_fp": cfg.min_fp,
                       f"{_SECTION}.max_reference_share": cfg.max_reference_share,
                       f"{_SECTION}.min_separation_auroc": cfg.min_separation_auroc,
                       f"{_SECTION}.min_negative_separation_auroc": cfg.min_negative_separation_auroc,
                       f"{_SECTION}.alpha": cfg.alpha},
            evidence={
                # Complete, not a sample: verification and zeroing judge the treatment on these members.
                "member_ids": [ctx.data.image_names[int(i)] for i in cluster],
                "channels": [int(c) for c in top],
                "channel_contributions": [
                    {"channel": int(c), "weight": float(w[c]), "cluster_mean": float(c_cluster[c]),
                     "reference_mean": float(c_ref[c]), "delta": float(delta[c])} for c in top
                ],
                "n_channels_needed": needed,
            },
        )
