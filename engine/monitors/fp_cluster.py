"""FP cluster: a label's false positives share one cause that its true positives do not (a shortcut).

Per label, at the deployed threshold:

1. represent each image by its centred contributions ``w_kc * (f_c - mean_c)`` on the
   ``n_feature_channels`` channels whose contributions vary most, with the logit direction (the
   sum of the contributions) projected out, so that "FPs score lower than TPs" never counts as a
   difference, only *what* drives the score does;
2. cluster the FPs there with k-means (k = 2..``max_k``, chosen by silhouette; below
   ``min_silhouette`` the FPs are one group) and take the largest cluster;
3. it must hold ``min_share`` of the FPs and ``min_fp`` images, and be *separable from the true
   positives* (at least ``min_tp`` of them; false negatives would look "separable" merely for
   scoring low): at most ``max_reference_share`` of the TPs fall into the cluster's k-means cell
   (k >= 2), and the cross-validated AUROC of a shrinkage linear discriminant, cluster vs TPs,
   reaches ``min_separation_auroc`` with a permutation p-value below ``alpha``.

Evidence: the member image ids; the classifier channels whose contribution is higher on the cluster
than on the reference positives (``w_kc * f_c``, cluster mean minus reference mean); and
``n_channels_needed``, the fewest of those channels whose removal (zeroing ``w_kc``) pushes the
cluster's mean logit below the threshold logit. The rules use it: zeroing only when few channels
explain the cluster.
"""

from __future__ import annotations

import numpy as np

from engine.facts import IssueFact
from engine.monitors.base import LabelData, Monitor, MonitorContext, iter_labels, logit, register_monitor, sample_ids
from engine.monitors.config import MonitorConfig
from model.metrics import auroc

__all__ = ["FpClusterMonitor", "separation_auroc", "separation_pvalue", "channels_needed", "kmeans", "silhouette"]

_SECTION = "fp_cluster"
_STATS_ROWS = 2000


def _classifier_weights(ctx: MonitorContext) -> np.ndarray | None:
    layer = getattr(ctx.bundle.model, "classifier", None)
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    w = weight.detach().cpu().numpy().astype(np.float64)
    if w.shape != (len(ctx.bundle.labels), ctx.data.features.shape[1]):
        return None
    return w


def separation_auroc(a: np.ndarray, b: np.ndarray, *, seed: list[int], folds: int = 5, shrinkage: float = 0.5) -> float:
    """Cross-validated AUROC of a shrinkage linear discriminant telling rows of ``a`` from rows of ``b``.

    Stratified folds; the discriminant is fitted on the other folds only, so a separation found by
    chance in few rows and many dimensions does not count.
    """
    x = np.concatenate([a, b])
    y = np.r_[np.ones(len(a)), np.zeros(len(b))]
    n_folds = int(min(folds, len(a), len(b)))
    if n_folds < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % n_folds
    scores = np.empty(len(y))
    for f in range(n_folds):
        train, test = fold != f, fold == f
        xa, xb = x[train & (y == 1)], x[train & (y == 0)]
        mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
        resid = np.concatenate([xa - mu_a, xb - mu_b])
        cov = resid.T @ resid / max(len(resid) - 2, 1)
        target = np.trace(cov) / len(cov) * np.eye(len(cov))
        cov = (1 - shrinkage) * cov + shrinkage * target + 1e-9 * np.eye(len(cov))
        direction = np.linalg.solve(cov, mu_a - mu_b)
        scores[test] = x[test] @ direction
    return auroc(y, scores)


def separation_pvalue(a: np.ndarray, b: np.ndarray, observed: float, n_permutations: int, *, seed: list[int]) -> float:
    """Permutation p-value of :func:`separation_auroc`: how often shuffled group labels separate as well."""
    x = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_permutations):
        perm = rng.permutation(len(x))
        value = separation_auroc(x[perm[: len(a)]], x[perm[len(a):]], seed=seed + [i])
        hits += bool(value >= observed)
    return (1 + hits) / (1 + n_permutations)


def channels_needed(order: np.ndarray, cluster_contrib: np.ndarray, mean_logit: float, threshold_logit: float) -> int | None:
    """Fewest leading channels of ``order`` whose removal brings ``mean_logit`` below ``threshold_logit``."""
    if mean_logit < threshold_logit:
        return 0
    remaining = mean_logit - np.cumsum(cluster_contrib[order])
    hit = np.flatnonzero(remaining < threshold_logit)
    return int(hit[0] + 1) if len(hit) else None


@register_monitor
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
        feats = np.asarray(ctx.data.features)  # float32, not copied: only small slices are widened
        stats: tuple[np.ndarray, np.ndarray] | None = None
        facts = []
        for lab in iter_labels(ctx, config):
            cfg_all = config.for_label(lab.name)
            if not cfg_all.fp_cluster.enabled:
                continue
            if stats is None:  # channel means/variances from a row sample: they only rank and centre
                rng = np.random.default_rng([config.seed, 6])
                sample = feats[np.sort(rng.permutation(lab.rows)[: _STATS_ROWS])]
                stats = (sample.mean(axis=0, dtype=np.float64), sample.var(axis=0, dtype=np.float64))
            fact = self._check(ctx, cfg_all, lab, feats, weights[lab.k], stats)
            if fact is not None:
                facts.append(fact)
        return facts

    def _check(self, ctx: MonitorContext, config: MonitorConfig, lab: LabelData, feats: np.ndarray,
               w: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> IssueFact | None:
        cfg = config.fp_cluster
        pred = lab.probs >= lab.threshold
        fp = lab.rows[pred & (lab.y == 0)]
        tp = lab.rows[pred & (lab.y == 1)]
        if len(fp) < cfg.min_fp:
            return None
        if len(tp) < cfg.min_tp:
            return None
        ref = tp
        rng = np.random.default_rng([config.seed, lab.k, 3])

        # The label's "contribution space": centred w_kc * (f_c - mean_c) on the channels whose
        # contributions vary most over the audited rows (chosen without looking at FP/TP membership,
        # so the comparison below is not biased towards separating them), with the logit direction
        # (the sum of the contributions) projected out: "FPs score lower than TPs" must not count,
        # only *what* drives the score.
        mean, var = stats
        channels = np.argsort(-(w * w * var), kind="stable")[: cfg.n_feature_channels]
        v = np.full(len(channels), 1.0 / np.sqrt(len(channels)))

        def space(rows: np.ndarray) -> np.ndarray:
            x = (feats[np.ix_(rows, channels)].astype(np.float64) - mean[channels]) * w[channels]
            return x - np.outer(x @ v, v)

        fp_x = space(fp)
        sub = np.sort(rng.permutation(len(fp))[: cfg.max_points])
        members, centers, largest, k_best, sil_best = self._largest_cluster(fp_x, sub, cfg, seed=config.seed + lab.k)
        cluster = fp[members]
        share = len(cluster) / len(fp)
        if share < cfg.min_share or len(cluster) < cfg.min_fp:
            return None
        rsub = ref[np.sort(rng.permutation(len(ref))[: cfg.max_points])]
        ra = space(rsub)
        # A k-means cell cut out of one blob is "separable" from anything spread over the blob; so
        # with k >= 2 the reference positives must mostly fall outside the cluster's cell.
        ref_share = 0.0
        if centers is not None:
            ref_share = float((_sq_dists(ra, centers).argmin(axis=1) == largest).mean())
            if ref_share > cfg.max_reference_share:
                return None
        csub = cluster[np.sort(rng.permutation(len(cluster))[: cfg.max_points])]
        ca = space(csub)
        sep = separation_auroc(ca, ra, seed=[config.seed, lab.k, 4])
        if not (np.isfinite(sep) and sep >= cfg.min_separation_auroc):
            return None
        pvalue = separation_pvalue(ca, ra, sep, cfg.n_permutations, seed=[config.seed, lab.k, 5])
        if not pvalue < cfg.alpha:
            return None

        # Which classifier channels drive the cluster but not the reference positives.
        c_cluster = w * feats[cluster].mean(axis=0, dtype=np.float64)
        c_ref = w * feats[ref].mean(axis=0, dtype=np.float64)
        delta = c_cluster - c_ref
        candidates = np.flatnonzero((delta > 0) & (c_cluster > 0))
        order = candidates[np.argsort(-delta[candidates], kind="stable")]
        mean_logit = float(lab.logits[np.searchsorted(lab.rows, cluster)].mean())
        thr_logit = logit(lab.threshold)
        needed = channels_needed(order, c_cluster, mean_logit, thr_logit)
        top = order[: cfg.max_channels]
        severity = "high" if len(cluster) >= config.high_severity_factor * cfg.min_fp else "medium"
        return self.fact(
            "fp_cluster",
            label=lab.name,
            severity=severity,
            message=f"{lab.name}: {len(cluster)} of {len(fp)} false positives ({share:.0%}) form one cluster "
                    f"separable from the true positives (CV AUROC {sep:.2f}, permutation p={pvalue:.2g}); "
                    + (f"{needed} classifier channel(s) explain it." if needed is not None
                       else "no small set of classifier channels explains it."),
            measured={"n_fp": len(fp), "n_tp": len(tp), "positives": lab.positives, "cluster_size": len(cluster),
                      "share": share, "reference_share_in_cluster": ref_share, "separation_auroc": sep,
                      "separation_p_value": pvalue, "n_channels_needed": needed, "cluster_mean_logit": mean_logit,
                      "threshold_logit": thr_logit, "k": k_best, "silhouette": sil_best},
            reference={"threshold": lab.threshold, "specificity": lab.reference.get("specificity")},
            threshold={f"{_SECTION}.min_share": cfg.min_share, f"{_SECTION}.min_fp": cfg.min_fp,
                       f"{_SECTION}.min_separation_auroc": cfg.min_separation_auroc, f"{_SECTION}.alpha": cfg.alpha,
                       **({f"{_SECTION}.max_reference_share": cfg.max_reference_share} if k_best > 1 else {})},
            evidence={
                "member_ids": sample_ids(ctx.data.image_names, cluster, config.max_evidence_ids),
                "channels": [int(c) for c in top],
                "channel_contributions": [
                    {"channel": int(c), "weight": float(w[c]), "cluster_mean": float(c_cluster[c]),
                     "reference_mean": float(c_ref[c]), "delta": float(delta[c])} for c in top
                ],
                "n_channels_needed": needed,
            },
        )

    @staticmethod
    def _largest_cluster(x: np.ndarray, sub: np.ndarray, cfg, seed: int
                         ) -> tuple[np.ndarray, np.ndarray | None, int, int, float | None]:
        """Membership (over all rows of ``x``) of the largest k-means cluster, the centres (None for
        k = 1), that cluster's index, k and the silhouette. k-means runs on the subsample ``sub``;
        every row is then assigned to its nearest centre."""
        xs = x[sub]
        dist = np.sqrt(np.maximum(_sq_dists(xs, xs), 0.0))
        best: tuple[float, np.ndarray] | None = None
        for k in range(2, min(cfg.max_k, len(xs) - 1) + 1):
            centers, assign = kmeans(xs, k, seed=[seed, k], n_init=2)
            if len(np.unique(assign)) < 2:
                continue
            sil = silhouette(dist, assign)
            if best is None or sil > best[0]:
                best = (sil, centers)
        if best is None or best[0] < cfg.min_silhouette:
            return np.ones(len(x), dtype=bool), None, 0, 1, (best[0] if best else None)
        assign = _sq_dists(x, best[1]).argmin(axis=1)
        largest = int(np.bincount(assign, minlength=len(best[1])).argmax())
        return assign == largest, best[1], largest, len(best[1]), best[0]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(axis=1)[:, None] - 2.0 * a @ b.T + (b * b).sum(axis=1)[None, :]


def kmeans(x: np.ndarray, k: int, *, seed: list[int], n_init: int = 3, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` runs by inertia.

    Plain numpy: on a few hundred rows scikit-learn's KMeans spends most of its 10-80 ms per fit
    starting thread pools, and a 14-label audit fits dozens of them.
    """
    rng = np.random.default_rng(seed)
    xx = (x * x).sum(axis=1)
    labels = np.arange(k)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        centers = x[[int(rng.integers(len(x)))]]
        closest = np.maximum(xx - 2.0 * x @ centers[0] + centers[0] @ centers[0], 0.0)
        for _ in range(1, k):
            total = closest.sum()
            nxt = int(rng.choice(len(x), p=closest / total)) if total > 0 else int(rng.integers(len(x)))
            centers = np.vstack([centers, x[nxt]])
            closest = np.minimum(closest, np.maximum(xx - 2.0 * x @ x[nxt] + xx[nxt], 0.0))
        assign = np.full(len(x), -1)
        for _ in range(max_iter):
            d = (centers * centers).sum(axis=1)[None, :] - 2.0 * x @ centers.T
            new = d.argmin(axis=1)
            if np.array_equal(new, assign):
                break
            assign = new
            onehot = (assign[:, None] == labels[None, :]).astype(x.dtype)
            sizes = onehot.sum(axis=0)
            centers = np.where(sizes[:, None] > 0, (onehot.T @ x) / np.maximum(sizes, 1)[:, None], centers)
        d = (centers * centers).sum(axis=1)[None, :] - 2.0 * x @ centers.T
        inertia = float(np.maximum(xx + d[np.arange(len(x)), assign], 0.0).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centers.copy(), assign.copy())
    assert best is not None
    return best[1], best[2]


def silhouette(dist: np.ndarray, assign: np.ndarray) -> float:
    """Mean silhouette coefficient from a full distance matrix (as sklearn.metrics.silhouette_score)."""
    clusters = np.unique(assign)
    onehot = (assign[:, None] == clusters[None, :]).astype(np.float64)
    sizes = onehot.sum(axis=0)
    sums = dist @ onehot  # (n, C): total distance to each cluster
    own = np.searchsorted(clusters, assign)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[np.arange(len(assign)), own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes[None, :]
    mean_other[np.arange(len(assign)), own] = np.inf
    b = mean_other.min(axis=1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())
