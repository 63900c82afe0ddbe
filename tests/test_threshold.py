"""The threshold intervention: fixes an operating-point drift on held-out data, copies, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from interventions.base import TreatmentContext
from interventions.registry import available_interventions, get_intervention
from interventions.threshold import ThresholdIntervention, fit_threshold, negatives_threshold
from model.bundle import new_bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.metrics import confusion_at, sigmoid, youden_threshold
from model.nets import arch_config, build_model

LABEL = "Effusion"
K = CHEXNET_LABELS.index(LABEL)


def _featureset(labels: np.ndarray, logits: np.ndarray, patients: np.ndarray) -> FeatureSet:
    n = len(labels)
    return FeatureSet(tuple(f"{i:05d}.png" for i in range(n)), patients, labels.astype(np.uint8),
                      np.zeros((n, 4), np.float32), logits.astype(np.float32), "w", "m")


def _scenario(seed: int = 0, n: int = 1200, shift: float = 2.5):
    """Clean logits with a stored Youden operating point, then a +shift logit drift (scanner change)."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(-0.8, 2.5, (n, 14))  # calibrated by construction: labels drawn from sigmoid(logit)
    labels = (rng.random((n, 14)) < sigmoid(clean)).astype(np.uint8)
    torch.manual_seed(seed)
    cfg = arch_config("tiny")
    ref_half = np.arange(n) % 3 == 0  # reference data: where the deployed thresholds were fitted
    thresholds = [youden_threshold(labels[ref_half, k], sigmoid(clean[ref_half, k])) for k in range(14)]
    bundle = new_bundle(build_model("densenet", cfg), config=cfg, input_size=32, thresholds=thresholds)
    drifted = clean.copy()
    drifted[:, K] += shift
    patients = np.array([f"p{i // 2}" for i in range(n)], dtype=object)
    fs = _featureset(labels, drifted, patients)
    fit = fs.subset(np.flatnonzero(~ref_half & (np.arange(n) % 3 == 1)))
    verify = fs.subset(np.flatnonzero(np.arange(n) % 3 == 2))
    return bundle, fit, verify, clean, labels


def _fact(kind: str = "calibration_drift", label: str | None = LABEL) -> IssueFact:
    return IssueFact(kind=kind, monitor=kind, label=label, severity="high", message="test")


def _ctx(bundle, fit, params=None, fact=None) -> TreatmentContext:
    return TreatmentContext(bundle=bundle, fact=fact or _fact(), fit=fit, fit_dataset=None,  # type: ignore[arg-type]
                            params=params or {}, seed=0)


def test_registered_with_its_contract() -> None:
    assert available_interventions()["threshold"] is ThresholdIntervention
    plugin = get_intervention("threshold")
    assert set(plugin.treats) == {"calibration_drift", "recall_collapse", "reported_fp"} and plugin.classifier_only
    assert plugin.Params is ThresholdIntervention.Params
    assert plugin.read_params({}).model_dump() == {"method": "youden", "target": None, "fn_cost": None,
                                                   "fp_cost": None, "scope": "label", "max_tp_lost": 0}


def test_resolves_a_logit_shift_on_the_verify_split() -> None:
    bundle, fit, verify, clean, labels = _scenario()
    deployed = bundle.meta.thresholds[K]
    ref = confusion_at(labels[:, K], sigmoid(clean[:, K]), deployed)  # operating point before the drift
    y, p = verify.labels[:, K], verify.probs[:, K]
    before = confusion_at(y, p, deployed)
    # The drift is real: specificity collapsed at the deployed threshold.
    assert ref["specificity"] - before["specificity"] > 0.3
    result = get_intervention("threshold").apply(_ctx(bundle, fit))
    new = result.bundle.meta.thresholds[K]
    after = confusion_at(y, p, new)
    youden_j = lambda c: c["sensitivity"] + c["specificity"] - 1  # noqa: E731
    # Held-out operating quality is back at the pre-drift level (it was far below it).
    assert youden_j(before) < youden_j(ref) - 0.2
    assert youden_j(after) > youden_j(ref) - 0.06
    assert new > deployed  # logits went up, so the threshold had to
    # Only the fact's label moved; no weight changed.
    assert [t for i, t in enumerate(result.bundle.meta.thresholds) if i != K] == \
           [t for i, t in enumerate(bundle.meta.thresholds) if i != K]
    assert result.bundle.weights_hash() == bundle.weights_hash()
    assert result.classifier_only


def test_probability_drift_also_gets_an_intercept_recalibration() -> None:
    from interventions.threshold import ECE_KEY
    from model.metrics import auroc, expected_calibration_error

    bundle, fit, verify, clean, labels = _scenario()
    fact = IssueFact(kind="calibration_drift", monitor="calibration_drift", label=LABEL, severity="high",
                     message="ECE and operating point", threshold={ECE_KEY: 0.05})
    result = get_intervention("threshold").apply(_ctx(bundle, fit, fact=fact))
    (shift,) = result.changes["logit_shifts"]
    delta = shift["delta"]
    assert shift["label"] == LABEL and delta < -1.0  # undoes most of the +2.5 drift
    # Fit split: mean predicted probability equals the prevalence (the intercept's MLE condition).
    assert sigmoid(fit.logits[:, K] + delta).mean() == pytest.approx(fit.labels[:, K].mean(), abs=1e-6)
    # Verify split: probabilities calibrated again, ranking untouched.
    y = verify.labels[:, K]
    ece_before = expected_calibration_error(y, sigmoid(verify.logits[:, K]))
    ece_after = expected_calibration_error(y, sigmoid(verify.logits[:, K] + delta))
    assert ece_after < 0.1 < ece_before
    assert auroc(y, verify.logits[:, K] + delta) == auroc(y, verify.logits[:, K])
    # Only that label's classifier bias moved, by exactly delta; the threshold sits on the new scale.
    old_b, new_b = bundle.model.classifier.bias.detach(), result.bundle.model.classifier.bias.detach()
    assert torch.equal(result.bundle.model.classifier.weight, bundle.model.classifier.weight)
    assert float(new_b[K] - old_b[K]) == pytest.approx(delta, abs=1e-5)
    assert torch.equal(torch.cat([new_b[:K], new_b[K + 1:]]), torch.cat([old_b[:K], old_b[K + 1:]]))
    assert [h["op"] for h in result.bundle.meta.history] == ["shift_logit", "set_threshold"]
    after = confusion_at(y, sigmoid(verify.logits[:, K] + delta), result.bundle.meta.thresholds[K])
    assert after["sensitivity"] + after["specificity"] > 1.6


def test_input_not_mutated_and_change_recorded() -> None:
    bundle, fit, _, _, _ = _scenario()
    meta_before, hash_before = bundle.meta.model_dump(), bundle.content_hash()
    result = get_intervention("threshold").apply(_ctx(bundle, fit))
    assert bundle.meta.model_dump() == meta_before and bundle.content_hash() == hash_before
    assert result.bundle.model is not bundle.model
    assert result.bundle.meta.parent_hash == hash_before
    entry = result.bundle.meta.history[-1]
    assert entry == {"op": "set_threshold", "label": LABEL, "old": bundle.meta.thresholds[K],
                     "new": result.bundle.meta.thresholds[K], "method": "youden"}
    assert result.changes["thresholds"] == [{"label": LABEL, "old": entry["old"], "new": entry["new"],
                                           "method": "youden"}]
    assert set(result.fit_metrics[LABEL]) == {"before", "after"}


def test_deterministic() -> None:
    bundle, fit, _, _, _ = _scenario()
    a = get_intervention("threshold").apply(_ctx(bundle, fit))
    b = get_intervention("threshold").apply(_ctx(bundle, fit))
    assert a.bundle.content_hash() == b.bundle.content_hash()
    assert a.changes == b.changes


def test_scope_all_refits_every_label() -> None:
    bundle, fit, _, _, _ = _scenario()
    result = get_intervention("threshold").apply(_ctx(bundle, fit, {"scope": "all"}))
    assert [c["label"] for c in result.changes["thresholds"]] == list(CHEXNET_LABELS)
    assert len(result.bundle.meta.history) == 14


def test_fixed_sensitivity_is_the_highest_threshold_reaching_the_target() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    p = np.clip(rng.random(300) * 0.6 + 0.3 * y, 0, 1)
    for target in (0.5, 0.8, 0.95, 1.0):
        t = fit_threshold(y, p, "fixed_sensitivity", target=target)
        assert confusion_at(y, p, t)["sensitivity"] >= target
        higher = np.unique(p[p > t])
        assert all(confusion_at(y, p, h)["sensitivity"] < target for h in higher[:5])


def test_cost_weighted_minimises_the_cost() -> None:
    rng = np.random.default_rng(2)
    y = rng.random(200) < 0.25
    p = np.round(np.clip(rng.random(200) * 0.7 + 0.3 * y, 0, 1), 2)  # ties on purpose
    for fn_cost, fp_cost in ((1.0, 1.0), (10.0, 1.0), (1.0, 10.0)):
        t = fit_threshold(y, p, "cost_weighted", fn_cost=fn_cost, fp_cost=fp_cost)
        cost = lambda thr: fn_cost * confusion_at(y, p, thr)["fn"] + fp_cost * confusion_at(y, p, thr)["fp"]  # noqa: E731
        assert cost(t) <= min(cost(c) for c in np.r_[np.unique(p), 1.01]) + 1e-9
    t_fn = fit_threshold(y, p, "cost_weighted", fn_cost=10.0, fp_cost=1.0)
    t_fp = fit_threshold(y, p, "cost_weighted", fn_cost=1.0, fp_cost=10.0)
    assert t_fn < t_fp  # missing a finding is expensive -> lower threshold


@pytest.mark.parametrize("params, message", [
    ({"method": "magic"}, "==> At key: method: must be one of 'youden', 'fixed_sensitivity' or 'cost_weighted', "
                          "got 'magic'"),
    ({"method": "fixed_sensitivity"}, "==> At key: target: required when method is fixed_sensitivity"),
    ({"method": "fixed_sensitivity", "target": 1.5}, "==> At key: target: must be a number <= 1, got 1.5"),
    ({"method": "cost_weighted", "fn_cost": 1.0}, "==> At key: fp_cost: required when method is cost_weighted"),
    ({"scope": "some"}, "==> At key: scope: must be one of 'label' or 'all', got 'some'"),
    ({"treshold": 1}, "==> At key: treshold: unknown key (expected one of: method, target, fn_cost, fp_cost, scope, max_tp_lost)"),
])
def test_bad_parameters_are_refused_by_name(params, message) -> None:
    """The plugin's own Params model refuses them, in the policy's words (one validation system)."""
    bundle, fit, _, _, _ = _scenario(n=120)
    ok, why = get_intervention("threshold").applicable(_ctx(bundle, fit, params))
    assert not ok and why.startswith("threshold parameters: ==> At key: ") and message in why
    with pytest.raises(InterventionError) as info:
        get_intervention("threshold").apply(_ctx(bundle, fit, params))
    assert str(info.value) == f"threshold is not applicable: {why}"


def test_not_applicable_outside_its_kinds_or_without_both_classes() -> None:
    bundle, fit, _, _, _ = _scenario(n=120)
    ok, why = get_intervention("threshold").applicable(_ctx(bundle, fit, fact=_fact("fp_cluster")))
    assert not ok and "does not treat fp_cluster" in why
    labels = fit.labels.copy()
    labels[:, K] = 0
    single = FeatureSet(fit.image_names, fit.patient_ids, labels, fit.features, fit.logits, "w", "m")
    ok, why = get_intervention("threshold").applicable(_ctx(bundle, single))
    assert not ok and "only one class" in why
    ok, why = get_intervention("threshold").applicable(_ctx(bundle, fit, fact=_fact(label=None)))
    assert not ok


def test_negatives_threshold_restores_the_false_positive_rate() -> None:
    """With too few positives for Youden, the threshold is read off the negatives alone."""
    rng = np.random.default_rng(0)
    neg = sigmoid(rng.normal(1.5, 1.0, 400))  # a scanner change lifted every negative's score
    for rate in (0.0, 0.05, 0.2, 0.7):
        t = negatives_threshold(neg, rate)
        assert (neg >= t).mean() <= rate + 1e-12
        assert (neg >= np.nextafter(t, 0)).mean() >= min(rate, 1.0) - 1.0 / len(neg)  # tight: no lower cut works


def test_drift_with_few_fit_positives_uses_the_reference_fp_rate() -> None:
    from pathlib import Path

    from rules.policy import load_policy
    from rules.ruleset import issue_record  # the rules see the same fact
    rng = np.random.default_rng(1)
    n = 300
    y = np.zeros((n, 14), dtype=np.uint8)
    y[:3, CHEXNET_LABELS.index(LABEL)] = 1  # three positives: Youden would be set by three ranks
    feats = rng.normal(0, 1, (n, 16)).astype(np.float32)
    torch.manual_seed(0)
    cfg = arch_config("tiny")
    bundle = new_bundle(build_model("densenet", cfg), config=cfg, input_size=32)
    with torch.no_grad():
        head = bundle.model.classifier
        head.weight.zero_()
        head.weight[:, : feats.shape[1]] = torch.from_numpy(rng.normal(0, 1, (14, feats.shape[1])).astype(np.float32))
    logits = feats @ head.weight.detach().numpy()[:, : feats.shape[1]].T + head.bias.detach().numpy()
    fit = FeatureSet(tuple(f"{i:08d}_000.png" for i in range(n)), np.arange(n), y,
                     np.pad(feats, ((0, 0), (0, head.in_features - feats.shape[1]))), logits.astype(np.float32),
                     bundle.weights_hash(), "m")
    fact = IssueFact(kind="calibration_drift", monitor="calibration_drift", label=LABEL, severity="high",
                     message="drift", measured={"reference_fp_rate": 0.1, "auroc_comparable": False},
                     evidence={"criteria": ["threshold_displacement"]})
    result = get_intervention("threshold").apply(TreatmentContext(bundle, fact, fit, None))
    change = result.changes["thresholds"][0]
    assert change["method"] == "reference_fp_rate"
    neg = sigmoid(logits[y[:, CHEXNET_LABELS.index(LABEL)] == 0, K])
    assert (neg >= result.bundle.meta.thresholds[K]).mean() <= 0.1 + 1e-12
    assert result.bundle.meta.history[-1]["target_fp_rate"] == 0.1
    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")
    assert issue_record(fact, seq=0, run_id="r", policy=policy, context={}).get("negatives_moved") is True


def test_few_fit_positives_fall_back_to_the_reference_fp_rate_whatever_the_method() -> None:
    """A per-label fixed-sensitivity method cannot be fitted on no positives; the negatives still can."""
    bundle, fit, _, _, _ = _scenario()
    k = CHEXNET_LABELS.index(LABEL)
    y = fit.labels.copy()
    y[:, k] = 0
    fit = FeatureSet(fit.image_names, fit.patient_ids, y, fit.features, fit.logits, fit.weights_hash, "m")
    fact = IssueFact(kind="calibration_drift", monitor="calibration_drift", label=LABEL, severity="high",
                     message="drift", measured={"reference_fp_rate": 0.05, "auroc_comparable": False},
                     evidence={"criteria": ["threshold_displacement"]})
    ctx = _ctx(bundle, fit, params={"method": "fixed_sensitivity", "target": 0.9}, fact=fact)
    plugin = get_intervention("threshold")
    assert plugin.applicable(ctx)[0]
    result = plugin.apply(ctx)
    assert result.changes["thresholds"][0]["method"] == "reference_fp_rate"
    assert (sigmoid(fit.logits[:, k]) >= result.bundle.meta.thresholds[k]).mean() <= 0.05 + 1e-12
    # without the reference rate there is nothing to fit on
    assert not plugin.applicable(_ctx(bundle, fit, params={"method": "fixed_sensitivity", "target": 0.9}))[0]
