"""Calibration drift: the probabilities (and so the operating point) moved, the ranking did not.

Three criteria per label, each robust to the noise of a handful of positives (here and in the
small held-out part the reference was measured on). The two statistical ones are family-wise:
``alpha`` is divided by the number of labels assessed (one audit tests 14 labels).

* **ECE**: this data's ECE, reweighted to the reference's class balance (label-shift importance
  weights: a test split that merely holds more positives than the reference part is not drift)
  and bootstrap bias-corrected, exceeds the reference ECE by ``ece_increase`` plus a one-sided
  one-sided margin whose standard error combines this data's bootstrap with the reference's (the
  same spread scaled to the reference's size);
* **operating point**: the Youden-J threshold on this data is at least ``threshold_shift`` away from
  the deployed threshold, the deployed threshold costs at least ``min_j_loss`` of Youden's J against
  the best threshold (bias-corrected lower confidence bound: J curves are often flat, so the Youden
  threshold alone wanders by noise) and more than a threshold picked as the deployed one was (Youden
  on a reference-sized sample) loses on an independent replica of this data at the family-wise
  level, and the AUROC is intact
  (>= ``min_auroc_ratio`` x reference):
  an operating-point problem that re-thresholding can fix, not a ranking problem;
* **threshold displacement**: the reference's false-positive rate at its threshold says where that
  threshold sat in the negatives' logit distribution (a normal quantile, continuity-clipped, so a
  31-image reference cannot claim more than ~2 SDs); on this data it sits
  ``(logit(t) - median) / robust SD`` of the negatives' logits. Fires when the two differ by at
  least ``max_threshold_displacement`` SDs: the scores moved wholesale against the threshold, as
  after a new scanner, whichever way. Negatives only, so a prevalence shift does not move it, and
  it is still checked on a label with too few positives for anything else (then alone). A reference
  threshold above (below) every reference negative only bounds its position: a threshold still
  further out on that side is not displaced (censored, recorded as not assessable).

The fact carries ``auroc_intact``, ``youden_threshold``, ``deployed_threshold``, ``ece`` and ``auroc``:
the rules allow "threshold only" treatments only while ranking is intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from engine.core.facts import IssueFact
from engine.monitors.base import (
    LabelData,
    Monitor,
    MonitorContext,
    bootstrap_counts,
    comparable,
    iter_labels,
    j_at,
    sampled_youden_thresholds,
    severity_for,
    weighted_ece,
    weighted_j_curve,
)
from model.metrics import (
    auroc,
    calibration_slope_intercept,
    expected_calibration_error,
    logit,
    sigmoid,
    youden_fit,
)
from rules.policy.monitors import MonitorConfig

__all__ = ["CalibrationDriftMonitor"]

_SECTION = "calibration_drift"


def _prevalence_weights(y: np.ndarray, reference_prevalence: float | None) -> np.ndarray:
    """Per-row weights that give this data the reference's class balance (ones when undefined)."""
    prev = float(y.mean())
    if reference_prevalence is None or not 0 < prev < 1 or not 0 < reference_prevalence < 1:
        return np.ones(len(y))
    return np.where(y == 1, reference_prevalence / prev, (1 - reference_prevalence) / (1 - prev))


class CalibrationDriftMonitor(Monitor):
    name = "calibration_drift"
    kinds = ("calibration_drift",)
    section = _SECTION

    def run(self, ctx: MonitorContext, config: MonitorConfig) -> list[IssueFact]:
        facts = []
        shared: dict[tuple, np.ndarray] = {}  # one set of resamples for all labels (same rows)
        assessable = list(iter_labels(ctx, config))
        # The family is every assessable label, enabled or not: a label's fact must not depend on
        # which other labels a re-check switched off (the loop re-checks treated labels only).
        family = len(assessable)
        full = {lab.name for lab in assessable}
        for lab in iter_labels(ctx, config, need_positives=False):
            cfg = config.for_label(lab.name)
            if not cfg.calibration_drift.enabled:
                continue
            if lab.name not in full:
                # Too few positives for ECE or Youden: the negatives still show a displaced threshold.
                fact = self._check_negatives(lab, cfg)
                if fact is not None:
                    facts.append(fact)
                continue

            def resamples(n_boot: int, n: int = len(lab.y)) -> np.ndarray:
                key = (n, n_boot)
                if key not in shared:
                    shared[key] = bootstrap_counts(n, n_boot, [config.seed, 1])
                return shared[key]

            fact = self._check(lab, cfg, resamples, family=family)
            if fact is not None:
                facts.append(fact)
        return facts

    @staticmethod
    def _displacement(lab: LabelData, cfg) -> dict[str, float] | None:
        """Where the deployed threshold sits among the negatives' logits now, vs where the reference
        threshold sat among the reference negatives (SD units). Before any treatment the two
        thresholds are the same; after a threshold treatment the deployed one is what is judged."""
        ref = lab.reference
        fp, tn = ref.get("fp"), ref.get("tn")
        neg = lab.logits[lab.y == 0]
        if fp is None or tn is None or fp + tn < 1 or len(neg) < 2:
            return None
        n0 = fp + tn
        t = float(lab.threshold)
        q_ref = min(max(fp / n0, 0.5 / n0), 1 - 0.5 / n0)
        z_ref = float(norm.ppf(1 - q_ref))
        q75, median, q25 = np.percentile(neg, [75, 50, 25])
        scale = max((q75 - q25) / 1.349, cfg.min_logit_scale)
        z_now = (logit(t) - median) / scale
        out = {"threshold_displacement_sd": float(z_now - z_ref), "fp_rate": float((sigmoid(neg) >= t).mean()),
               "reference_fp_rate": float(fp / n0), "negatives_logit_median": float(median),
               "negatives_logit_scale": float(scale)}
        # A reference threshold above every reference negative (0 false positives) or below every one
        # sat *at least* z_ref SDs out: a bound, not a position. A threshold now further out on that
        # side is consistent with it, so there is no displacement to measure.
        side = "above" if fp == 0 and z_now >= z_ref else "below" if tn == 0 and z_now <= z_ref else None
        if side is not None:
            out["threshold_displacement_sd"] = None
            out["threshold_displacement_reason"] = (
                f"the reference threshold sat {side} all {n0:g} reference negatives, so only a bound on its "
                f"position ({abs(z_ref):.1f} SD or more) is known, and it sits further {side} them now")
        return out

    def _check_negatives(self, lab: LabelData, config: MonitorConfig) -> IssueFact | None:
        """The threshold-displacement criterion alone, for a label with too few positives for the rest.

        Ranking cannot be judged there, so the fact says so (``auroc_comparable`` False): the rules
        then allow only a threshold that restores the reference false-positive rate.
        """
        cfg = config.calibration_drift
        disp = self._displacement(lab, cfg)
        if (disp is None or disp["threshold_displacement_sd"] is None
                or abs(disp["threshold_displacement_sd"]) < cfg.max_threshold_displacement):
            return None
        d = disp["threshold_displacement_sd"]
        severity = severity_for(abs(d), cfg.max_threshold_displacement, config)
        ref = lab.reference
        return self.fact(
            "calibration_drift",
            label=lab.name,
            severity=severity,
            message=(f"{lab.name}: calibration drifted (negatives' scores moved {abs(d):.1f} SD "
                     f"{'below' if d > 0 else 'above'} the threshold (FP rate {disp['fp_rate']:.2f} vs reference "
                     f"{disp['reference_fp_rate']:.2f}); only {lab.positives} positive(s), so only the negatives "
                     "were assessed)."),
            measured=dict(disp, auroc_intact=False, auroc_comparable=False, deployed_threshold=lab.threshold,
                          positives=lab.positives, n=len(lab.y), mean_probability=float(lab.probs.mean())),
            reference={k: ref.get(k) for k in ("ece", "auroc", "youden_threshold")},
            threshold={f"{_SECTION}.max_threshold_displacement": cfg.max_threshold_displacement},
            evidence={"criteria": ["threshold_displacement"], "auroc_intact": False, "negatives_only": True,
                      "deployed_threshold": lab.threshold,
                      "reference_detail": {k: ref.get(k) for k in ("threshold", "prevalence", "fp", "tn", "n")}},
        )

    def _check(self, lab: LabelData, config: MonitorConfig, resamples, family: int) -> IssueFact | None:
        cfg = config.calibration_drift
        y, p = lab.y, lab.probs
        auc = auroc(y, p)
        fit = youden_fit(y, p)
        youden = fit.threshold
        ref_auc = lab.reference.get("auroc")
        # "Ranking intact" needs AUROCs worth comparing (enough positives on both sides); else False.
        reliable = comparable(lab, config)
        auroc_intact = bool(reliable and ref_auc is not None and np.isfinite(auc) and auc >= cfg.min_auroc_ratio * ref_auc)
        z = float(norm.ppf(1 - cfg.alpha / max(family, 1)))  # one-sided, family-wise over the labels assessed
        found = _Findings(_SharedResamples(resamples, cfg.n_boot))
        ece_adj = self._ece_test(lab, cfg, z, found)
        if youden is None:  # no operating point to compare with: not assessable, never "passed"
            found.not_assessable["operating_point"] = fit.reason
        elif auroc_intact and abs(youden - lab.threshold) >= cfg.threshold_shift:
            self._operating_point_test(lab, cfg, z, found, tail=cfg.alpha / max(family, 1),
                                       seed=[config.seed, 2, lab.k])
        disp = self._displacement(lab, cfg)
        if disp is not None:
            found.measured.update(disp)
            d = disp["threshold_displacement_sd"]
            if d is None:
                found.not_assessable["threshold_displacement"] = disp["threshold_displacement_reason"]
            elif abs(d) >= cfg.max_threshold_displacement:
                found.fire({f"{_SECTION}.max_threshold_displacement": cfg.max_threshold_displacement},
                           abs(d), cfg.max_threshold_displacement)
        if not found.fired:
            return None
        return self._drift_fact(lab, config, found, ece_adj=ece_adj, auc=auc, youden=youden,
                                auroc_intact=auroc_intact, reliable=reliable)

    @staticmethod
    def _ece_test(lab: LabelData, cfg, z: float, found: "_Findings") -> float:
        """ECE at the reference's class balance (label-shift importance weights), so that a test split
        that merely holds more or fewer positives than the small reference part does not count; fires
        when its bias-corrected increase clears the policy's step by the bootstrap margin."""
        y, p, ref = lab.y, lab.probs, lab.reference
        ref_ece = ref.get("ece")
        w = _prevalence_weights(y, ref.get("prevalence"))
        ece_adj = float(weighted_ece(y, p, np.ones((1, len(y)), dtype=np.float32), cfg.n_bins, w)[0])
        found.measured["ece_at_reference_prevalence"] = ece_adj
        if ref_ece is not None and ece_adj - ref_ece >= cfg.ece_increase:
            boot = weighted_ece(y, p, found.resamples(), cfg.n_bins, w)
            se = float(boot.std(ddof=1))
            # the reference ECE is noisy too: same spread, scaled to its sample size
            ref_n = ref.get("n")
            se_ref = se * float(np.sqrt(len(y) / ref_n)) if ref_n else 0.0
            ece_bc = float(2 * ece_adj - boot.mean())  # ECE is biased upwards; bootstrap bias correction
            margin = z * float(np.hypot(se, se_ref))
            found.measured.update(ece_bias_corrected=ece_bc, ece_margin=margin)
            if ece_bc - ref_ece - cfg.ece_increase >= margin:
                found.fire({f"{_SECTION}.ece_increase": cfg.ece_increase}, ece_adj - ref_ece, cfg.ece_increase)
        return ece_adj

    @staticmethod
    def _operating_point_test(lab: LabelData, cfg, z: float, found: "_Findings", *, tail: float, seed) -> None:
        """The deployed threshold lost Youden J against the best one, by more than the bootstrap says
        chance would (the best threshold's J is optimistic on the data it was chosen on), and by more
        than a threshold chosen the way it was would lose without any drift (:func:`_selection_null`)."""
        y, p, deployed = lab.y, lab.probs, lab.threshold
        values, j_point = weighted_j_curve(y, p, np.ones((1, len(y)), dtype=np.float32))
        j_loss = float(np.nanmax(j_point[0]) - j_at(values, j_point, deployed)[0])
        found.measured["j_loss"] = j_loss
        if j_loss < cfg.min_j_loss:
            return
        _, j_boot = weighted_j_curve(y, p, found.resamples())
        j_boot = j_boot[np.isfinite(j_boot).all(axis=1)]  # resamples with both classes
        loss_boot = j_boot.max(axis=1) - j_at(values, j_boot, deployed)
        # bootstrap bias correction: the best threshold's J is optimistic on the data it was chosen on
        j_loss_lower = (float(2 * j_loss - loss_boot.mean() - z * loss_boot.std(ddof=1))
                        if len(loss_boot) > 1 else float("nan"))
        found.measured["j_loss_lower"] = j_loss_lower
        if j_loss_lower < cfg.min_j_loss:
            return
        null = _selection_null(lab, tail, seed, found.resamples.of(_SELECTION_DRAWS))
        if null is not None:
            found.measured.update(null)
            if j_loss <= null["j_loss_selection_quantile"]:
                return
        else:
            found.not_assessable["operating_point_selection_noise"] = (
                "the reference records no size or prevalence (or no resample of this data holds both classes), "
                "so the deployed threshold's own selection noise could not be allowed for")
        found.fire({f"{_SECTION}.threshold_shift": cfg.threshold_shift,
                    f"{_SECTION}.min_j_loss": cfg.min_j_loss,
                    f"{_SECTION}.min_auroc_ratio": cfg.min_auroc_ratio}, j_loss, cfg.min_j_loss)

    def _drift_fact(self, lab: LabelData, config: MonitorConfig, found: "_Findings", *, ece_adj: float,
                    auc: float, youden: float | None, auroc_intact: bool, reliable: bool) -> IssueFact:
        ref, deployed, measured, fired = lab.reference, lab.threshold, found.measured, found.fired
        ref_ece, ref_auc = ref.get("ece"), ref.get("auroc")
        y, p = lab.y, lab.probs
        ece = expected_calibration_error(y, p, n_bins=config.calibration_drift.n_bins)
        cal = calibration_slope_intercept(y, lab.logits)
        if not cal.estimable:
            found.not_assessable["calibration_slope"] = cal.reason
        severity = max((severity_for(e, t, config) for e, t in found.excess), key=("medium", "high").index)
        criteria = [c for c, key in (("ece", "ece_increase"), ("operating_point", "threshold_shift"),
                                     ("threshold_displacement", "max_threshold_displacement"))
                    if f"{_SECTION}.{key}" in fired]
        parts = []
        if "ece" in criteria:
            parts.append(f"ECE {ece_adj:.3f} (at reference prevalence) vs reference {ref_ece:.3f}")
        if "operating_point" in criteria:
            parts.append(f"Youden threshold {youden:.3f} vs deployed {deployed:.3f}")
        if "threshold_displacement" in criteria:
            d = measured["threshold_displacement_sd"]
            parts.append(f"negatives' scores moved {abs(d):.1f} SD {'below' if d > 0 else 'above'} the threshold "
                         f"(FP rate {measured['fp_rate']:.2f} vs reference {measured['reference_fp_rate']:.2f})")
        ranking = ("ranking intact" if auroc_intact else "ranking NOT intact" if reliable
                   else f"ranking not assessable on {lab.positives} positive(s), so not counted as intact")
        measured.update(
            ece=ece, auroc=auc, auroc_intact=auroc_intact, youden_threshold=youden, deployed_threshold=deployed,
            threshold_shift=None if youden is None else youden - deployed,
            calibration_slope=cal.slope, calibration_intercept=cal.intercept,
            mean_probability=float(p.mean()), prevalence=float(y.mean()), positives=lab.positives, n=len(y),
            auroc_comparable=reliable,
        )
        if not cal.estimable:
            measured.update(calibration_slope_reason=cal.reason, calibration_intercept_reason=cal.reason)
        if youden is None:
            measured.update(youden_threshold_reason=found.not_assessable.get("operating_point"))
        return self.fact(
            "calibration_drift",
            label=lab.name,
            severity=severity,
            message=f"{lab.name}: calibration drifted ({'; '.join(parts)}; AUROC {auc:.3f} vs {ref_auc:.3f}, {ranking}).",
            measured=measured,
            # reference: only metrics comparable with measured ones (verification reads their gaps)
            reference={k: ref.get(k) for k in ("ece", "auroc", "youden_threshold")},
            threshold=fired,
            evidence={"criteria": criteria, "auroc_intact": auroc_intact, "youden_threshold": youden,
                      "deployed_threshold": deployed, "ece": ece, "auroc": auc,
                      **({"not_assessable": dict(found.not_assessable)} if found.not_assessable else {}),
                      "reference_detail": {k: ref.get(k) for k in ("calibration_slope", "calibration_intercept",
                                                                   "threshold", "prevalence", "fp", "tn", "n")}},
        )


#: Draws of the (reference sample, audited replica) pairs in :func:`_selection_null` (a tail quantile
#: at alpha / 14 needs more than the bootstrap's 200), and how many replicas' J curves are held at once.
_SELECTION_DRAWS = 1000
_SELECTION_CHUNK = 250


def reference_samples(lab: LabelData, draws: int, rng: np.random.Generator) -> np.ndarray | None:
    """``(draws, reference n)`` row indices of samples of this data the size of the label's reference,
    stratified at its prevalence (with replacement); None when the reference records no size or
    prevalence, or this data lacks a class."""
    ref_n, prev = lab.reference.get("n"), lab.reference.get("prevalence")
    pos, neg = np.flatnonzero(lab.y == 1), np.flatnonzero(lab.y == 0)
    if not ref_n or prev is None or not 0 < prev < 1 or not len(pos) or not len(neg):
        return None
    n_pos = min(max(int(round(prev * ref_n)), 1), int(ref_n) - 1)
    return np.concatenate([pos[rng.integers(0, len(pos), size=(draws, n_pos))],
                           neg[rng.integers(0, len(neg), size=(draws, int(ref_n) - n_pos))]], axis=1)


def _selection_null(lab: LabelData, tail: float, seed, replicas: np.ndarray) -> dict[str, float] | None:
    """How much Youden J a threshold loses on data like this when it was chosen as the deployed one
    was: by Youden J on an independent sample of the reference's size and class balance.

    The deployed threshold was fitted on a few hundred images, so even without drift it sits off
    this data's best threshold (a flat J curve and a few dozen positives move the Youden point a
    lot), and this data's best threshold is itself optimistic (its J curve is noisy too). Both
    noises are simulated with this data standing in for the distribution: each draw pairs a
    reference-sized sample (stratified at the reference prevalence) with an independent bootstrap
    replica of this data (``replicas``: resampling counts, shared by the labels); the sample's
    Youden threshold is judged on the replica's J curve against the replica's own best. The
    ``1 - tail`` quantile of those losses is what "no drift" allows. Judging the samples on this
    data's own curve instead (a replica equal to the data) leaves the second noise out: on clean
    phantoms that null was exceeded 15-51 % of the time at a nominal 5 %. None when the reference
    does not record its size and prevalence, or no replica holds both classes.
    """
    y, draws = lab.y, len(replicas)
    rows = reference_samples(lab, draws, np.random.default_rng(seed))
    if rows is None:
        return None
    chosen = sampled_youden_thresholds(y, lab.probs, rows)
    losses = []
    for start in range(0, draws, _SELECTION_CHUNK):  # chunks bound the J curves held at once
        values, j = weighted_j_curve(y, lab.probs, replicas[start : start + _SELECTION_CHUNK])
        # the sample's threshold on the replica's curve (as j_at: 0 where no score reaches it)
        g = np.searchsorted(values, chosen[start : start + _SELECTION_CHUNK], side="left")
        at = np.concatenate([j, np.zeros((len(j), 1))], axis=1)[np.arange(len(j)), g]
        both = np.isfinite(j).all(axis=1)  # replicas that hold both classes
        losses.append((j.max(axis=1) - at)[both])
    losses = np.concatenate(losses)
    if not len(losses):
        return None
    return {"j_loss_selection_quantile": float(np.quantile(losses, 1 - tail)),
            "j_loss_selection_median": float(np.median(losses)), "selection_reference_n": float(rows.shape[1])}


class _SharedResamples:
    """The bootstrap resampling counts, drawn at most once per label and shared by every test."""

    def __init__(self, draw, n_boot: int) -> None:
        self._draw, self._n_boot, self._counts = draw, n_boot, None

    def __call__(self):
        if self._counts is None:
            self._counts = self._draw(self._n_boot)
        return self._counts

    def of(self, n_boot: int) -> np.ndarray:
        """``n_boot`` resamples of the same rows (the monitor's draw caches them across labels)."""
        return self._draw(n_boot)


@dataclass
class _Findings:
    """What one label's tests measured, which policy keys fired, and by how much (for severity)."""

    resamples: _SharedResamples
    measured: dict[str, object] = field(default_factory=dict)
    fired: dict[str, float] = field(default_factory=dict)
    excess: list[tuple[float, float]] = field(default_factory=list)
    #: what could not be estimated on this label, with the reason (recorded, neither fired nor passed)
    not_assessable: dict[str, str | None] = field(default_factory=dict)

    def fire(self, keys: dict[str, float], value: float, limit: float) -> None:
        self.fired.update(keys)
        self.excess.append((value, limit))
