"""The monitor interface, its context, the registry and the statistics monitors share.

A monitor looks at one labelled audit set (cached pooled features + logits + labels) against the
bundle's reference metrics and deployed thresholds, and returns typed :class:`IssueFact` s. Every
tolerance comes from :class:`MonitorConfig`; the facts name the key that fired. Degenerate data is
a fact, not a crash: labels that cannot be assessed are reported once by the ``validity`` monitor
and skipped by the others.

The bootstrap helpers work on resampling *counts* ``(B, N)`` instead of index arrays, so a label's
scores are sorted once and every resample is a weighted cumulative sum: AUROC, Youden threshold and
ECE bootstraps over 10,000 rows cost milliseconds, not seconds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from engine.core.facts import IssueFact
from model.bundle import Bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.metrics import sigmoid
from rules.policy.monitors import MonitorConfig

__all__ = [
    "MonitorContext",
    "Monitor",
    "LabelData",
    "finite_rows",
    "run_memo",
    "label_gate",
    "iter_labels",
    "comparison_problem",
    "comparable",
    "clean_value",
    "clean_dict",
    "severity_for",
    "sample_ids",
        "auroc_se",
    "bootstrap_counts",
    "weighted_auroc",
    "weighted_j_curve",
    "j_at",
    "weighted_youden_threshold",
    "weighted_ece",
]

_CHEXNET_INDEX = {name: i for i, name in enumerate(CHEXNET_LABELS)}


@dataclass(frozen=True)
class MonitorContext:
    """What monitors may look at. ``parent_data`` covers the same images as ``data`` (any order)."""

    bundle: Bundle
    data: FeatureSet
    #: The uncompressed parent bundle, when known (compression_fidelity).
    parent: Bundle | None = None
    #: The parent's features/logits on the same images (compression_fidelity).
    parent_data: FeatureSet | None = None
    #: Pooled features of a reference sample, e.g. the training images under this model (input_drift).
    reference_features: np.ndarray | None = None
    #: Where ``reference_features`` came from (quoted in the input_drift fact).
    reference_source: str | None = None

    def __post_init__(self) -> None:
        n_labels = len(self.bundle.labels)
        logits = np.asarray(self.data.logits)
        if logits.ndim != 2 or logits.shape[1] != n_labels:
            raise ValueError(
                f"The 'data' parameter of MonitorContext must have logits of shape (N, {n_labels}) for the "
                f"bundle's {n_labels} labels. Got shape {logits.shape} instead."
            )
        if len(self.bundle.meta.thresholds) != n_labels:
            raise ValueError(
                f"The bundle has {len(self.bundle.meta.thresholds)} thresholds for {n_labels} labels."
            )


class Monitor(ABC):
    """Base class: set ``name`` / ``kinds`` and implement :meth:`run`.

    ``run`` must be deterministic under ``config.seed``, must not modify the context, and must
    report degenerate inputs as facts (``cannot_assess``, ``invalid_output``) instead of raising.
    """

    #: Stable name (registry key and ``IssueFact.monitor``).
    name: ClassVar[str]
    #: The fact kinds this monitor may emit.
    kinds: ClassVar[tuple[str, ...]]
    #: The MonitorConfig section holding its thresholds (None: only top-level keys).
    section: ClassVar[str | None] = None

    @abstractmethod
    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        """The facts this monitor finds on ``ctx`` (possibly none)."""

    def enabled(self, config: MonitorConfig) -> bool:
        return self.section is None or bool(getattr(config, self.section).enabled)

    def fact(self, kind: str, **fields: Any) -> IssueFact:
        """An IssueFact from this monitor, with NaN/inf and numpy scalars made JSON-safe."""
        if kind not in self.kinds:
            raise AssertionError(f"monitor {self.name!r} declared kinds {self.kinds}, emitted {kind!r}")
        for key in ("measured", "reference", "threshold"):
            if key in fields:
                fields[key] = clean_dict(fields[key])
        if "evidence" in fields:
            fields["evidence"] = clean_value(fields["evidence"])
        return IssueFact(kind=kind, monitor=self.name, **fields)


# --------------------------------------------------------------------------------------------
# Per-label views and the shared "can this label be assessed" gate


#: Per-run memo (set by ``run_monitors``): every monitor asks for the finite rows, and a 10k x 1024
#: scan is not free. Scoped to one run so that arrays edited in place later are never served stale.
_RUN_MEMO: ContextVar[dict | None] = ContextVar("monitor_run_memo", default=None)


@contextmanager
def run_memo() -> Iterator[None]:
    token = _RUN_MEMO.set({})
    try:
        yield
    finally:
        _RUN_MEMO.reset(token)


def finite_rows(data: FeatureSet) -> np.ndarray:
    """Rows whose logits and features are all finite (the others are reported as invalid_output)."""
    memo = _RUN_MEMO.get()
    key = ("finite", id(data))
    if memo is not None and key in memo and memo[key][0] is data:
        return memo[key][1]
    logits_ok = np.isfinite(np.asarray(data.logits)).all(axis=1)
    feats = np.asarray(data.features)
    feats_ok = np.isfinite(feats).all(axis=1) if feats.ndim == 2 and feats.shape[1] else np.ones(len(data), bool)
    mask = logits_ok & feats_ok
    if memo is not None:
        memo[key] = (data, mask)
    return mask


@dataclass(frozen=True)
class LabelData:
    """One label's column on the valid rows: ground truth, logits, probabilities, threshold, reference."""

    k: int
    name: str
    rows: np.ndarray  # indices into the FeatureSet
    y: np.ndarray  # (n,) int
    logits: np.ndarray  # (n,) float64
    probs: np.ndarray  # (n,) float64
    threshold: float
    reference: dict[str, Any]

    @property
    def positives(self) -> int:
        return int(self.y.sum())

    @property
    def negatives(self) -> int:
        return int(len(self.y) - self.y.sum())


def label_gate(ctx: MonitorContext, config: MonitorConfig, k: int, valid: np.ndarray, *,
               need_positives: bool = True) -> str | None:
    """Why label ``k`` cannot be compared with its reference on this data, or None when it can.

    ``need_positives=False`` asks only what a negatives-only check needs (negatives and reference
    metrics): where the deployed threshold sits among the negatives does not depend on positives.
    """
    name = ctx.bundle.labels[k]
    cfg = config.for_label(name)
    if name not in _CHEXNET_INDEX:
        return f"no ground-truth column for label {name!r} in the NIH label file"
    if not valid.any():
        return "no rows with finite outputs"
    y = np.asarray(ctx.data.labels)[valid, _CHEXNET_INDEX[name]]
    pos = int(y.sum())
    if need_positives and pos < cfg.min_positives:
        return f"{pos} positive(s) on the audited data (min_positives={cfg.min_positives})"
    if pos == len(y):
        return "no negatives on the audited data"
    ref = ctx.bundle.meta.reference_metrics.get(name)
    if not ref:
        return "the bundle has no reference metrics for this label"
    if ref.get("positives") is not None and ref["positives"] < 1:
        return "the reference metrics are undefined (the reference split had no positives)"
    return None


def reference_positives(ctx: MonitorContext, name: str) -> int | None:
    ref = ctx.bundle.meta.reference_metrics.get(name) or {}
    return None if ref.get("positives") is None else int(ref["positives"])


def comparison_problem(reference: dict[str, Any], positives: int, config: MonitorConfig, name: str) -> str | None:
    """Why sensitivity/AUROC cannot be compared with the reference (too few positives), or None.

    A reference count that is unknown is trusted.
    """
    need = config.for_label(name).min_comparison_positives
    ref_pos = reference.get("positives")
    problems = []
    if ref_pos is not None and ref_pos < need:
        problems.append(f"the reference part had {int(ref_pos)} positive(s)")
    if positives < need:
        problems.append(f"the audited data has {int(positives)} positive(s)")
    return f"{' and '.join(problems)} (min_comparison_positives={need})" if problems else None


def comparable(lab: "LabelData", config: MonitorConfig) -> bool:
    """Whether ``lab``'s sensitivity and AUROC may be compared with its reference."""
    return comparison_problem(lab.reference, lab.positives, config, lab.name) is None


def iter_labels(ctx: MonitorContext, config: MonitorConfig, *, need_positives: bool = True) -> Iterator[LabelData]:
    """Assessable labels in bundle order (see :func:`label_gate`), restricted to finite rows."""
    valid = finite_rows(ctx.data)
    rows = np.flatnonzero(valid)
    logits_all = np.asarray(ctx.data.logits, dtype=np.float64)
    labels_all = np.asarray(ctx.data.labels)
    for k, name in enumerate(ctx.bundle.labels):
        if label_gate(ctx, config, k, valid, need_positives=need_positives) is not None:
            continue
        z = logits_all[rows, k]
        yield LabelData(
            k=k,
            name=name,
            rows=rows,
            y=labels_all[rows, _CHEXNET_INDEX[name]].astype(np.int64),
            logits=z,
            probs=sigmoid(z),
            threshold=float(ctx.bundle.meta.thresholds[k]),
            reference=dict(ctx.bundle.meta.reference_metrics.get(name) or {}),
        )


# --------------------------------------------------------------------------------------------
# Small helpers


def clean_value(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None (fact ids hash strict JSON)."""
    if isinstance(value, dict):
        return {str(k): clean_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [clean_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_dict(values: dict[str, Any]) -> dict[str, Any]:
    return {k: clean_value(v) for k, v in values.items()}


def severity_for(excess: float, tolerance: float, config: MonitorConfig) -> str:
    """'high' when ``excess`` reaches ``high_severity_factor`` x ``tolerance``, else 'medium'."""
    if tolerance > 0 and excess >= config.high_severity_factor * tolerance:
        return "high"
    return "medium"


def auroc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC ``a`` from ``n_pos`` / ``n_neg`` cases.

    A floor for bootstrap standard errors, which come out too small with a handful of positives
    (a resample can only reshuffle the few positives there are).
    """
    if n_pos < 1 or n_neg < 1 or not math.isfinite(a):
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def sample_ids(names: Sequence[str], rows: np.ndarray, limit: int) -> list[str]:
    return [names[int(i)] for i in np.asarray(rows)[:limit]]


# --------------------------------------------------------------------------------------------
# Bootstrap on resampling counts


def bootstrap_counts(n: int, n_boot: int, seed: int | Sequence[int]) -> np.ndarray:
    """``(n_boot, n)`` float32 counts of each row in each with-replacement resample of ``n`` rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n), dtype=np.int32) if n else np.zeros((n_boot, 0), np.int32)
    out = np.empty((n_boot, n), dtype=np.float32)
    for b in range(n_boot):
        out[b] = np.bincount(idx[b], minlength=n)
    return out


def _sorted_cumsums(y: np.ndarray, scores: np.ndarray, counts: np.ndarray):
    """Distinct scores ascending, their group bounds, and per-resample cumulative pos/neg weights.

    Ties are handled by reading the cumulative sums at group boundaries (no per-group reduction).
    Float32 is exact here: resampling counts are integers far below 2**24.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    w = np.asarray(counts, dtype=np.float32)[:, order]
    pos = np.asarray(y)[order].astype(bool)
    cum_p = np.cumsum(np.where(pos, w, np.float32(0)), axis=1)
    cum_n = np.cumsum(np.where(pos, np.float32(0), w), axis=1)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    return s[starts], starts, ends, cum_p, cum_n


def _below(cum: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Weight strictly below each group (cumulative sum just before its start)."""
    if len(starts) == cum.shape[1]:  # no ties: a shifted copy, no gather
        out = np.empty_like(cum)
        out[:, 0] = 0
        out[:, 1:] = cum[:, :-1]
        return out
    out = np.zeros((cum.shape[0], len(starts)), dtype=cum.dtype)
    nz = starts > 0
    out[:, nz] = cum[:, starts[nz] - 1]
    return out


def weighted_auroc(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of every resample (rows of ``counts``), ties counted half; NaN where a class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = np.asarray(y)[order].astype(bool)
    w = np.asarray(counts, dtype=np.float32)[:, order]
    wn = np.where(pos, np.float32(0), w)
    cum_n = np.cumsum(wn, axis=1)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if len(starts) == len(s):  # no ties: negatives strictly below each positive
        below_n = (cum_n - wn)[:, pos]
    else:  # ties: negatives below the tie group plus half of those in it
        group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
        ends = np.r_[starts[1:], len(s)] - 1
        before = _below(cum_n, starts)
        below_n = (before + 0.5 * (cum_n[:, ends] - before))[:, group[pos]]
    num = (w[:, pos] * below_n).sum(axis=1, dtype=np.float64)
    den = w[:, pos].sum(axis=1, dtype=np.float64) * cum_n[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_j_curve(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Youden's J (sensitivity + specificity - 1) of ``score >= t`` for every distinct score ``t``.

    Returns the ascending distinct scores ``(G,)`` and J per resample ``(B, G)`` (NaN where a class
    is absent from a resample).
    """
    values, starts, _, cum_p, cum_n = _sorted_cumsums(y, np.asarray(scores, dtype=np.float64), counts)
    total_p, total_n = cum_p[:, -1:], cum_n[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        j = (total_p - _below(cum_p, starts)) / total_p - (total_n - _below(cum_n, starts)) / total_n
    return values, j


def j_at(values: np.ndarray, j: np.ndarray, threshold: float) -> np.ndarray:
    """J of each resample at ``score >= threshold`` (0 when no score reaches it: nothing is positive)."""
    g = int(np.searchsorted(values, threshold, side="left"))
    return j[:, g] if g < len(values) else np.zeros(len(j))


def weighted_youden_threshold(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Youden-J optimal threshold (``score >= t`` is positive) of every resample; NaN where undefined."""
    values, j = weighted_j_curve(y, scores, counts)
    ok = np.isfinite(j).all(axis=1)
    best = np.argmax(np.where(np.isfinite(j), j, -np.inf), axis=1)
    return np.where(ok, values[best], np.nan)


def sampled_youden_thresholds(y: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Youden-J optimal threshold of each sample ``rows[b]`` (row indices, ``(B, m)``): the lowest of
    the sample's own scores with the largest J of ``score >= t`` on that sample, in O(B m log m).

    For small samples of a large set (a threshold fitted as on a small reference), where a ``(B, n)``
    count matrix would cost O(B n). Unlike :func:`weighted_youden_threshold`, which may return any of
    the whole set's scores between two sampled ones, the result is a score the sample holds, as a
    threshold fitted on that sample alone would be. Each sample needs both classes. Sorted as
    integer keys (dense rank of the score, then the label bit): much faster than argsort.
    """
    distinct, rank = np.unique(scores, return_inverse=True)
    keys = np.sort((rank[rows] * 2 + np.asarray(y)[rows]).astype(np.int64), axis=1)
    labels, rank = keys & 1, keys >> 1
    n_pos = labels.sum(axis=1, keepdims=True)
    n_neg = rows.shape[1] - n_pos
    pos_below = np.cumsum(labels, axis=1) - labels
    neg_below = np.arange(rows.shape[1]) - pos_below
    j = (n_pos - pos_below) / n_pos - (n_neg - neg_below) / n_neg
    first_of_value = np.ones(keys.shape, dtype=bool)
    first_of_value[:, 1:] = rank[:, 1:] != rank[:, :-1]
    best_at = np.argmax(np.where(first_of_value, j, -np.inf), axis=1)
    return distinct[rank[np.arange(len(rows)), best_at]]


def weighted_ece(y: np.ndarray, probs: np.ndarray, counts: np.ndarray, n_bins: int,
                 row_weights: np.ndarray | None = None) -> np.ndarray:
    """ECE (equal-width bins, as :func:`model.metrics.expected_calibration_error`) of every resample.

    Row ``i`` of resample ``b`` weighs ``counts[b, i] * row_weights[i]``. One matmul: the per-bin
    sums of weight, weighted outcomes and weighted probabilities are ``counts @ design``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    rw = np.ones(len(probs)) if row_weights is None else np.asarray(row_weights, dtype=np.float64)
    bins = np.clip((probs * n_bins).astype(int), 0, n_bins - 1)
    onehot = np.zeros((len(probs), n_bins), dtype=np.float64)
    onehot[np.arange(len(probs)), bins] = 1.0
    design = np.concatenate([onehot * (rw * np.asarray(y, dtype=np.float64))[:, None],
                             onehot * (rw * probs)[:, None], rw[:, None]], axis=1)
    sums = np.asarray(counts, dtype=np.float32) @ design.astype(np.float32)
    sums = sums.astype(np.float64)
    return np.abs(sums[:, :n_bins] - sums[:, n_bins:2 * n_bins]).sum(axis=1) / sums[:, -1]
