"""Classifier-only retraining on the fit split's cached pooled features (no backbone run).

When a label's *ranking* is hurt (a recall collapse that a threshold cannot undo, a false-positive
cluster, an AUROC drop, a calibration drift) but the backbone's features still carry the finding,
re-fitting that label's classifier row on labelled audit data repairs it in seconds: 1,025
parameters per label (14,350 for the whole 14-label head of DenseNet121).

Recipe (deterministic for a seed):

* full-batch L-BFGS on the (weighted) binary cross-entropy, starting from the current row, with an
  L2 pull toward it, ``l2/2 * ||w - w0||^2`` (the bias is free). The pull keeps the change — and its
  collateral — small; ``l2: auto`` picks, per label, the value of ``l2_grid`` with the lowest
  out-of-fold cross-entropy over patient-grouped folds of the fit split, and keeps the current row
  when no retrained row beats it out of fold (never worse than doing nothing, by that measure);
* operating thresholds re-fitted on the *out-of-fold* logits (``threshold: oof``, honest: no row is
  scored by a model that saw it) or on the final in-sample logits (``fit``). ``threshold_rule``:
  ``youden`` (Youden's J), ``keep_sensitivity`` (the highest threshold that keeps at least the
  label's current sensitivity on the fit split: a false-positive treatment must not cost true
  positives), ``auto`` (default: ``keep_sensitivity`` for an ``fp_cluster`` fact, else ``youden``);
* ``scope: label`` retrains only the fact's label's row (every other output stays bit-identical);
  ``scope: all`` retrains every row with at least ``min_positives`` positives and negatives.

Rows are independent given the features, so all rows are fitted in one joint L-BFGS problem.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field
from scipy.optimize import minimize
from scipy.special import expit
from threadpoolctl import threadpool_limits

from engine.core.errors import InterventionError
from engine.core.validation import show_value
from interventions.attribution import (
    check_features_match, classifier_layer, evidence_members, head_logits, output_index, truth_index,
)
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from model.bundle import Bundle
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, confusion_at, sigmoid, youden_threshold

__all__ = ["PartialRetrainIntervention", "fit_head", "patient_folds", "retrain_rows", "keep_sensitivity_threshold"]


def _check_l2(value: Any) -> Any:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and np.isfinite(value) and value >= 0):
        return value
    raise ValueError(f"must be 'auto' or a number >= 0, got {show_value(value)}")


def _check_grid(value: Any) -> tuple[float, ...]:
    """A non-empty list of numbers >= 0, as a tuple from the largest down (the tie-break prefers it)."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0 for v in value)
    if not ok:
        raise ValueError(f"must be a non-empty list of numbers >= 0, got {show_value(value)}")
    return tuple(sorted((float(v) for v in value), reverse=True))


def patient_folds(patient_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id (0..k-1) per row; a patient's rows share a fold. Deterministic for a seed."""
    patients = sorted(set(np.asarray(patient_ids).astype(str).tolist()))
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[i]: j % k for j, i in enumerate(order)}
    return np.array([fold_of[p] for p in np.asarray(patient_ids).astype(str)], dtype=int)


def fit_head(
    x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray, *, l2: np.ndarray, sample_weight: np.ndarray,
    active: np.ndarray, max_iter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit rows of a linear head by L-BFGS: BCE (weighted mean per row) + ``l2_k/2 ||w_k - w0_k||^2``.

    ``x`` (N, F), ``y`` and ``sample_weight`` (N, K), ``w0`` (K, F), ``b0`` (K,), ``l2`` (K,),
    ``active`` (K,) bool — inactive rows are returned unchanged. float64, closed-form gradient,
    scipy's L-BFGS-B (a few ms per fit on cached features; deterministic).
    """
    active = np.asarray(active, dtype=bool)
    w0 = np.asarray(w0, dtype=np.float64)
    b0 = np.asarray(b0, dtype=np.float64)
    if not active.any():
        return w0.copy(), b0.copy()
    rows = np.flatnonzero(active)
    x = np.ascontiguousarray(x, dtype=np.float64)
    yk = np.asarray(y, dtype=np.float64)[:, rows]
    sk = np.asarray(sample_weight, dtype=np.float64)[:, rows]
    sk = sk / np.maximum(sk.sum(axis=0), 1e-12)  # weighted mean per row
    lam = np.asarray(l2, dtype=np.float64)[rows]
    wk0, bk0 = w0[rows], b0[rows]
    n_rows, n_feat = wk0.shape

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        dw = theta[: n_rows * n_feat].reshape(n_rows, n_feat)
        db = theta[n_rows * n_feat:]
        z = x @ (wk0 + dw).T + (bk0 + db)
        loss = float((sk * (np.logaddexp(0.0, z) - yk * z)).sum() + 0.5 * (lam * (dw * dw).sum(axis=1)).sum())
        r = sk * (expit(z) - yk)
        grad_w = r.T @ x + lam[:, None] * dw
        return loss, np.concatenate([grad_w.ravel(), r.sum(axis=0)])

    theta0 = np.zeros(n_rows * (n_feat + 1))
    # One BLAS thread: on problems this small, thread start-up and contention cost 10-100x the work.
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": 1e-8, "ftol": 1e-12})
    w, b = w0.copy(), b0.copy()
    w[rows] = wk0 + res.x[: n_rows * n_feat].reshape(n_rows, n_feat)
    b[rows] = bk0 + res.x[n_rows * n_feat:]
    return w, b


def _bce(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy per column."""
    z = np.asarray(logits, dtype=np.float64)
    return (np.logaddexp(0.0, z) - y * z).mean(axis=0)


def _weights(y: np.ndarray, class_weight: str, extra: np.ndarray | None) -> np.ndarray:
    w = np.ones_like(y, dtype=np.float64)
    if class_weight == "balanced":
        pos = y.sum(axis=0)
        neg = len(y) - pos
        w = np.where(y > 0, np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), 1.0)
    if extra is not None:
        w = w * extra
    return w


def retrain_rows(
    x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray, active: np.ndarray, groups: np.ndarray, *,
    params: PartialRetrainIntervention.Params, seed: int, extra_weight: np.ndarray | None = None,
) -> dict[str, Any]:
    """The partial-retraining recipe on arrays (see the module docstring); returns rows, l2 and OOF logits."""
    k_rows = len(w0)
    grid = (params.l2,) if params.l2 != "auto" else params.l2_grid
    folds = patient_folds(groups, params.folds, seed)
    init_logits = x @ w0.T + b0
    oof = {g: np.array(init_logits, dtype=np.float64) for g in grid}
    for f in range(params.folds):
        tr, te = folds != f, folds == f
        if not te.any() or not tr.any():
            continue
        y_tr = y[tr]
        fold_active = active & (y_tr.sum(axis=0) > 0) & (y_tr.sum(axis=0) < len(y_tr))
        sw = _weights(y_tr, params.class_weight, None if extra_weight is None else extra_weight[tr])
        for g in grid:
            w, b = fit_head(x[tr], y_tr, w0, b0, l2=np.full(k_rows, g), sample_weight=sw, active=fold_active,
                            max_iter=params.max_iter)
            oof[g][te] = x[te] @ w.T + b
    init_bce = _bce(y, init_logits)
    oof_bce = {g: _bce(y, oof[g]) for g in grid}
    chosen_l2 = np.zeros(k_rows)
    keep = ~active.copy()
    for k in np.flatnonzero(active):
        scores = [oof_bce[g][k] for g in grid]
        best = int(np.argmin(scores))  # first minimum: the largest l2 among ties
        chosen_l2[k] = grid[best]
        if params.l2 == "auto" and not scores[best] < init_bce[k]:
            keep[k] = True  # no retrained row beats the current one out of fold
    fit_active = active & ~keep
    sw = _weights(y, params.class_weight, extra_weight)
    w, b = fit_head(x, y, w0, b0, l2=chosen_l2, sample_weight=sw, active=fit_active, max_iter=params.max_iter)
    oof_chosen = np.array(init_logits, dtype=np.float64)
    for k in np.flatnonzero(fit_active):
        oof_chosen[:, k] = oof[chosen_l2[k]][:, k]
    return {"w": w, "b": b, "l2": chosen_l2, "kept": keep, "trained": fit_active, "oof_logits": oof_chosen,
            "oof_bce": {float(g): v for g, v in oof_bce.items()}, "init_bce": init_bce}


def _metrics(y: np.ndarray, logits: np.ndarray, thr: float) -> dict[str, Any]:
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    c = confusion_at(y, p, thr)
    value = auroc(y.astype(int), p)
    return {"auroc": None if np.isnan(value) else float(value), "threshold": float(thr),
            **{k: (None if isinstance(v, float) and np.isnan(v) else v)
               for k, v in c.items() if k in ("tp", "fp", "fn", "sensitivity", "specificity", "precision", "f1")}}


def keep_sensitivity_threshold(y: np.ndarray, probs: np.ndarray, sensitivity: float) -> float | None:
    """Highest threshold with at least ``sensitivity`` of the positives at or above it (None if undefined)."""
    pos = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(y) > 0])[::-1]
    if len(pos) == 0 or not sensitivity > 0:
        return None
    k = min(len(pos), max(1, int(np.ceil(sensitivity * len(pos) - 1e-9))))
    return float(min(max(pos[k - 1], 1e-6), 1 - 1e-6))


def _rows_hash(w: np.ndarray, b: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
    return h.hexdigest()


class PartialRetrainIntervention(Intervention):
    """Re-fit classifier rows on cached features with an L2 pull toward the current weights."""

    name = "partial_retrain"
    treats = ("fp_cluster", "calibration_drift", "recall_collapse", "auroc_drop", "reported_fp")
    expected_time_s = 5.0
    classifier_only = True

    class Params(InterventionParams):
        """``params.partial_retrain`` (``min_positives`` defaults to ``conditions.partial_retrain.min_positives``)."""

        scope: Literal["label", "all"] = "label"
        l2: Annotated[Literal["auto"] | float, BeforeValidator(_check_l2)] = "auto"
        l2_grid: Annotated[tuple[float, ...], BeforeValidator(_check_grid)] = (1.0, 0.1, 0.01, 0.001)
        class_weight: Literal["none", "balanced"] = "none"
        cluster_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)
        max_iter: int = Field(200, ge=1, le=10_000)
        folds: int = Field(3, ge=2, le=20)
        threshold: Literal["oof", "fit"] = "oof"
        threshold_rule: Literal["auto", "youden", "keep_sensitivity"] = "auto"
        min_positives: int = Field(10, ge=2)

    def _targets(self, ctx: TreatmentContext, params: PartialRetrainIntervention.Params) -> list[str]:
        if params.scope == "label" and ctx.fact.label is not None:
            return [ctx.fact.label]
        return [name for name in ctx.bundle.labels if name in CHEXNET_LABELS]

    def _eligible(self, ctx: TreatmentContext, label: str, min_positives: int) -> tuple[bool, str]:
        y = ctx.fit.labels[:, truth_index(label)]
        pos, neg = int(y.sum()), int(len(y) - y.sum())
        if pos < min_positives or neg < min_positives:
            return False, (f"the fit split has {pos} positive and {neg} negative {label} image(s); retraining "
                           f"needs at least {min_positives} of each (min_positives)")
        return True, ""

    def _applicable(self, ctx: TreatmentContext, params: PartialRetrainIntervention.Params) -> tuple[bool, str]:
        try:
            head = classifier_layer(ctx.bundle)
            targets = self._targets(ctx, params)
            for label in targets:
                output_index(ctx.bundle, label)
                truth_index(label)
        except InterventionError as exc:
            return False, str(exc)
        if ctx.fit.features.ndim != 2 or ctx.fit.features.shape[1] != head.in_features:
            return False, f"the fit split's features (shape {ctx.fit.features.shape}) do not fit the classifier"
        eligible = []
        for label in targets:
            ok, why = self._eligible(ctx, label, params.min_positives)
            if ok:
                eligible.append(label)
            elif params.scope == "label":
                return False, why
        if not eligible:
            return False, f"no label has at least {params.min_positives} positives and negatives in the fit split"
        n_params = len(eligible) * (head.in_features + 1)
        return True, (f"partial_retrain re-fits {len(eligible)} classifier row(s) ({n_params:,} parameters) on the "
                      f"fit split's cached features")

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        check_features_match(ctx.bundle, ctx.fit)
        head = classifier_layer(ctx.bundle)
        targets = [l for l in self._targets(ctx, params) if self._eligible(ctx, l, params.min_positives)[0]]
        if not targets:
            raise InterventionError("partial_retrain: no label with enough positives and negatives in the fit split")
        rows = [output_index(ctx.bundle, l) for l in targets]
        truth = [truth_index(l) for l in targets]
        x = ctx.fit.features.astype(np.float64)
        y = ctx.fit.labels[:, truth].astype(np.float64)
        w_all = head.weight.detach().cpu().to(torch.float64).numpy()
        b_all = head.bias.detach().cpu().to(torch.float64).numpy() if head.bias is not None else np.zeros(len(w_all))
        extra = _cluster_weights(ctx, params, targets, y)
        out = retrain_rows(x, y, w_all[rows], b_all[rows], np.ones(len(rows), dtype=bool), ctx.fit.patient_ids,
                           params=params, seed=ctx.seed, extra_weight=extra)
        new = _with_rows(ctx.bundle, rows, out["w"], out["b"])
        thresholds = list(ctx.bundle.meta.thresholds)
        fit_metrics, per_label = _refit_thresholds(ctx, params, targets, rows, y, out, head_logits(new, ctx.fit.features),
                                                   thresholds)
        recipe = {
            "op": "retrain_classifier_rows",
            "rows": rows,
            "labels": targets,
            "method": "lbfgs_bce_l2_to_init",
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.model_dump().items()},
            "l2_chosen": [float(v) for v in out["l2"]],
            "retrained": [bool(v) for v in out["trained"]],
            "thresholds": {l: float(thresholds[k]) for l, k in zip(targets, rows)},
            "seed": ctx.seed,
            "fit_manifest_hash": ctx.fit.manifest_hash,
            "fit_weights_hash": ctx.fit.weights_hash,
            "fit_images_sha256": hashlib.sha256("\n".join(ctx.fit.image_names).encode()).hexdigest(),
            "cluster_members_weighted": extra is not None,
            "result_rows_sha256": _rows_hash(out["w"], out["b"]),
        }
        history = list(ctx.bundle.meta.history) + [recipe]
        new = new.with_meta(thresholds=thresholds, history=history, parent_hash=ctx.bundle.content_hash())
        changes = {**recipe, "per_label": per_label,
                   "n_parameters": int(out["trained"].sum()) * (head.in_features + 1)}
        if not out["trained"].any():
            changes["note"] = (f"no retrained row beat the current one out of fold ({', '.join(targets)}); only "
                               "thresholds were refitted")
        return InterventionResult(bundle=new, changes=changes, fit_metrics=fit_metrics, classifier_only=True)


def _cluster_weights(ctx: TreatmentContext, params: PartialRetrainIntervention.Params, targets: list[str],
                     y: np.ndarray) -> np.ndarray | None:
    """Per-sample weights that give an fp_cluster fact's members ``cluster_weight`` in its label's row."""
    members = evidence_members(ctx.fact.evidence)
    if (ctx.fact.kind in ("fp_cluster", "reported_fp") and members and params.cluster_weight != 1.0
            and ctx.fact.label in targets):
        extra = np.ones_like(y)
        in_cluster = np.array([n in members for n in ctx.fit.image_names])
        extra[in_cluster, targets.index(ctx.fact.label)] = params.cluster_weight
        return extra
    return None


def _with_rows(bundle: Bundle, rows: list[int], w: np.ndarray, b: np.ndarray) -> Bundle:
    """A copy of ``bundle`` whose classifier rows ``rows`` are ``w`` and ``b``."""
    new = bundle.copy()
    new_head = classifier_layer(new)
    with torch.no_grad():
        for j, k in enumerate(rows):
            new_head.weight[k] = torch.from_numpy(w[j]).to(new_head.weight.dtype)
            if new_head.bias is not None:
                new_head.bias[k] = float(b[j])
    return new


def _refit_threshold(params: PartialRetrainIntervention.Params, kind: str, y: np.ndarray, source_p: np.ndarray,
                     before_logits: np.ndarray, old_thr: float) -> tuple[float, str]:
    """The new operating threshold of one row, and the rule that gave it (see ``threshold_rule``)."""
    rule = params.threshold_rule
    if rule == "auto":
        rule = "keep_sensitivity" if kind in ("fp_cluster", "reported_fp") else "youden"
    new_thr = None
    if rule == "keep_sensitivity":
        sens = confusion_at(y, sigmoid(before_logits.astype(np.float64)), old_thr)["sensitivity"]
        new_thr = keep_sensitivity_threshold(y, source_p, sens)
        if new_thr is None:
            rule = "youden"  # nothing to keep (no positive detected before)
    if new_thr is None:
        new_thr = youden_threshold(y.astype(int), source_p)
    return new_thr, rule


def _refit_thresholds(ctx: TreatmentContext, params: PartialRetrainIntervention.Params, targets: list[str],
                      rows: list[int], y: np.ndarray, out: dict[str, Any], after: np.ndarray,
                      thresholds: list[float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refit each target's threshold into ``thresholds``; return the fit metrics and the per-label record."""
    before = ctx.fit.logits
    fit_metrics: dict[str, Any] = {}
    per_label: list[dict[str, Any]] = []
    for j, (label, k) in enumerate(zip(targets, rows)):
        yj = y[:, j]
        if out["trained"][j]:
            source = out["oof_logits"][:, j] if params.threshold == "oof" else after[:, k]
        else:
            source = after[:, k]  # an unchanged row was not trained on these rows: in-sample is honest
        old_thr = float(thresholds[k])
        source_p = sigmoid(np.asarray(source, dtype=np.float64))
        new_thr, rule = _refit_threshold(params, ctx.fact.kind, yj, source_p, before[:, k], old_thr)
        thresholds[k] = new_thr
        fit_metrics[label] = {
            "before": _metrics(yj, before[:, k], old_thr),
            "after": _metrics(yj, after[:, k], new_thr),
            "out_of_fold_after": _metrics(yj, out["oof_logits"][:, j], new_thr),
            "bce": {"before": float(out["init_bce"][j]),
                    "after_out_of_fold": float(_bce(yj[:, None], out["oof_logits"][:, j:j + 1])[0])},
        }
        per_label.append({"label": label, "row": k, "retrained": bool(out["trained"][j]),
                          "l2": float(out["l2"][j]), "old_threshold": old_thr, "new_threshold": new_thr,
                          "threshold_rule": rule})
    return fit_metrics, per_label
