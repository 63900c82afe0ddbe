"""Statistically aware acceptance: the target's operating point, improvement beyond noise, Bonferroni,
non-inferiority and the shortcut's clean images, on planted verify splits (no network runs: logits are
written directly, the monitors are silenced so only these checks decide)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.facts import IssueFact
from engine.triage.acceptance import candidate_level
from engine.triage.verify import Acceptance, verify_treatment
from model.bundle import Bundle, new_bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.nets import arch_config, build_model

LABEL = "Effusion"
K = CHEXNET_LABELS.index(LABEL)


def nothing(*_args, **_kw) -> list[IssueFact]:
    """A monitor that finds nothing: "the issue is gone", so the statistical checks alone decide."""
    return []


def _bundle() -> Bundle:
    torch.manual_seed(0)
    cfg = arch_config("tiny")
    return new_bundle(build_model("densenet", cfg), config=cfg, input_size=32, thresholds=[0.5] * 14)


def _split(n: int = 400, positives: int = 120, seed: int = 0) -> FeatureSet:
    """Every label ranks well (positives around +2, negatives around -2); ``LABEL`` has ``positives``."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 14)) < 0.3).astype(np.uint8)
    labels[:, K] = 0
    labels[rng.choice(n, positives, replace=False), K] = 1
    logits = np.where(labels == 1, 2.0, -2.0) + rng.normal(0, 1.2, (n, 14))
    return FeatureSet(tuple(f"{i:05d}.png" for i in range(n)), np.arange(n).astype(str), labels,
                      np.zeros((n, 4), np.float32), logits.astype(np.float32), "w", "m")


def _with(fs: FeatureSet, column: np.ndarray, k: int = K) -> FeatureSet:
    logits = fs.logits.copy()
    logits[:, k] = column
    return fs.with_logits(logits)


def _fact(kind: str, **kw) -> IssueFact:
    return IssueFact(kind=kind, monitor=kind, label=LABEL, severity="high", message="planted", **kw)


def _verify(fact: IssueFact, before: FeatureSet, after: FeatureSet, acceptance: Acceptance,
            after_bundle: Bundle | None = None, bundle: Bundle | None = None, **kw) -> dict[str, dict]:
    bundle = bundle or _bundle()
    vr = verify_treatment(fact=fact, intervention="threshold", before_bundle=bundle,
                          after_bundle=after_bundle or bundle, before=before, after=after, monitor_fn=nothing,
                          acceptance=acceptance, **kw)
    checks = {c["name"]: c for c in vr.checks}
    assert vr.passed == all(c["passed"] for c in checks.values())
    return checks


def _failed(checks: dict[str, dict]) -> list[str]:
    return [name for name, c in checks.items() if not c["passed"]]


# ------------------------------------------------------------------------------------------------
# The target label's own operating point


def test_a_threshold_that_loses_true_positives_is_rejected_whatever_the_kind() -> None:
    """A drift fact (not a false-positive treatment): raising the threshold still may not cost TPs."""
    before = _split()
    bundle = _bundle()
    thresholds = list(bundle.meta.thresholds)
    thresholds[K] = 0.95  # far above the positives' bulk: most true positives lost
    raised = bundle.with_meta(thresholds=thresholds)
    fact = _fact("recall_collapse")
    checks = _verify(fact, before, before, Acceptance(), after_bundle=raised, bundle=bundle)
    lost = checks["tp_lost"]
    assert not lost["passed"] and lost["value"] > 20 and lost["limit"] == 0
    assert "tp_lost" in _failed(checks)
    # The policy's limit decides: allowing that many passes this check.
    checks = _verify(fact, before, before, Acceptance(max_tp_lost=10**6), after_bundle=raised, bundle=bundle)
    assert checks["tp_lost"]["passed"]
    # A treatment that leaves the label's operating point alone is not judged on it.
    assert "tp_lost" not in _verify(fact, before, before, Acceptance())


def test_a_sensitivity_below_the_policys_target_is_rejected_with_its_interval() -> None:
    before = _split()
    y = before.labels[:, K] == 1
    bundle = _bundle()
    p = 1 / (1 + np.exp(-before.logits[y, K].astype(np.float64)))
    thresholds = list(bundle.meta.thresholds)
    thresholds[K] = float(np.quantile(p, 0.5))  # about half the positives above it
    moved = bundle.with_meta(thresholds=thresholds)
    fact = _fact("calibration_drift")
    loose = Acceptance(max_tp_lost=10**6, sensitivity_target=0.9)
    check = _verify(fact, before, before, loose, after_bundle=moved, bundle=bundle)["target_sensitivity"]
    assert not check["passed"] and check["limit"] == 0.9 and check["positives"] == int(y.sum())
    assert check["value"] == pytest.approx(0.5, abs=0.02) and check["high"] < 0.9
    assert check["method"] == "wilson" and "whole interval lies below the target" in check["detail"]
    # The interval reaching the target passes; no target: passes, recorded.
    reach = Acceptance(max_tp_lost=10**6, sensitivity_target=0.55)
    assert _verify(fact, before, before, reach, after_bundle=moved, bundle=bundle)["target_sensitivity"]["passed"]
    none = _verify(fact, before, before, Acceptance(max_tp_lost=10**6), after_bundle=moved, bundle=bundle)
    assert none["target_sensitivity"]["passed"] and none["target_sensitivity"]["limit"] is None


# ------------------------------------------------------------------------------------------------
# The improvement must exceed noise


def test_an_improvement_inside_noise_is_not_accepted_and_a_real_one_is() -> None:
    before = _split(positives=40)
    y = before.labels[:, K] == 1
    rng = np.random.default_rng(5)
    # A ranking problem: the label's logits are mostly noise before the treatment.
    broken = _with(before, np.where(y, 0.3, 0.0) + rng.normal(0, 1.5, len(y)))
    noise = _with(broken, broken.logits[:, K] + rng.normal(0, 0.05, len(y)))  # a "treatment" that did nothing
    real = _with(broken, np.where(y, 2.5, -2.5) + rng.normal(0, 1.0, len(y)))
    fact = _fact("auroc_drop")
    acc = Acceptance(max_tp_lost=10**6)
    inside = _verify(fact, broken, noise, acc)["improvement_significant"]
    assert not inside["passed"] and inside["low"] <= 0 <= inside["high"]
    assert "does not exclude no change" in inside["detail"]
    gain = _verify(fact, broken, real, acc)["improvement_significant"]
    assert gain["passed"] and gain["low"] > 0 and gain["method"] == "paired_bootstrap"
    assert gain["level"] == 0.95 and gain["candidate_k"] == 1


def test_too_few_positives_means_the_improvement_cannot_be_shown() -> None:
    """Three positives that all flipped to detected: a bootstrap would claim certainty; it escalates instead."""
    before = _split(positives=3)
    y = before.labels[:, K] == 1
    missed = _with(before, np.where(y, -3.0, before.logits[:, K]))
    caught = _with(before, np.where(y, 3.0, before.logits[:, K]))
    check = _verify(_fact("recall_collapse"), missed, caught, Acceptance(min_positives=10))["improvement_significant"]
    assert not check["passed"] and check["value"] is None
    assert "3 positive(s)" in check["reason"] and "cannot be shown" in check["detail"]


def test_the_kth_candidate_is_judged_at_the_bonferroni_level() -> None:
    assert [candidate_level(0.95, k) for k in (1, 2, 3)] == [0.95, 0.975, pytest.approx(1 - 0.05 / 3)]
    before = _split(positives=40)
    y = before.labels[:, K] == 1
    broken = _with(before, np.random.default_rng(1).normal(0, 1.5, len(y)))
    better = _with(broken, broken.logits[:, K] + np.where(y, 1.0, 0.0))
    first = _verify(_fact("auroc_drop"), broken, better, Acceptance(), candidate_k=1)["improvement_significant"]
    third = _verify(_fact("auroc_drop"), broken, better, Acceptance(), candidate_k=3)["improvement_significant"]
    assert (third["candidate_k"], third["level"]) == (3, pytest.approx(1 - 0.05 / 3))
    assert third["value"] == first["value"] and third["low"] < first["low"]  # wider: stricter for later tries


def test_a_calibration_fix_is_judged_on_the_criterion_the_monitor_fired_on() -> None:
    """Threshold displacement: the FP rate's distance from the reference rate, over the negatives."""
    before = _split()
    up = _with(before, before.logits[:, K] + 3.0)  # a scanner shift: nearly every negative flagged
    bundle = _bundle()
    thresholds = list(bundle.meta.thresholds)
    thresholds[K] = float(1 / (1 + np.exp(-3.0)))  # the threshold follows the shift
    fixed = bundle.with_meta(thresholds=thresholds)
    fact = _fact("calibration_drift", measured={"reference_fp_rate": 0.05},
                 evidence={"criteria": ["threshold_displacement"]})
    check = _verify(fact, up, up, Acceptance(max_tp_lost=10**6), after_bundle=fixed,
                    bundle=bundle)["improvement_significant"]
    assert check["passed"] and check["low"] > 0.3 and "reference rate 0.050" in check["detail"]


def test_records_are_deterministic_for_a_seed() -> None:
    before = _split(positives=40)
    after = _with(before, before.logits[:, K] + np.random.default_rng(2).normal(0, 0.8, len(before)))
    a = _verify(_fact("auroc_drop"), before, after, Acceptance(), seed=3)
    b = _verify(_fact("auroc_drop"), before, after, Acceptance(), seed=3)
    assert a == b
    assert _verify(_fact("auroc_drop"), before, after, Acceptance(), seed=4)["improvement_significant"]["low"] != \
        a["improvement_significant"]["low"]


# ------------------------------------------------------------------------------------------------
# Collateral and shortcuts


def test_other_labels_are_judged_as_non_inferior_within_the_tolerance() -> None:
    before = _split()
    other = CHEXNET_LABELS.index("Atelectasis")
    rng = np.random.default_rng(3)
    target_only = _with(before, before.logits[:, K] + 0.1)
    check = _verify(_fact("auroc_drop"), before, target_only, Acceptance(max_tp_lost=10**6))["other_labels_noninferior"]
    # The other labels' logits are bit-identical: they contribute exactly 0.
    assert check["passed"] and (check["value"], check["low"], check["high"]) == (0.0, 0.0, 0.0)
    harmed = _with(target_only, rng.normal(0, 1.0, len(before)), k=other)  # one label's ranking destroyed
    checks = _verify(_fact("auroc_drop"), before, harmed, Acceptance(max_tp_lost=10**6, max_other_auroc_change=0.01))
    assert not checks["other_labels_noninferior"]["passed"] and checks["other_labels_noninferior"]["low"] < -0.01
    assert checks["other_labels_noninferior"]["limit"] == -0.01


def _shortcut_split() -> tuple[FeatureSet, list[str], np.ndarray]:
    """60 negatives carry the artefact, and the untreated head calls them positive (the FP cluster)."""
    before = _split()
    y = before.labels[:, K] == 1
    cluster = np.flatnonzero(~y)[:60]
    column = before.logits[:, K].copy()
    column[cluster] += 4.5
    return _with(before, column), [before.image_names[i] for i in cluster], cluster


def test_a_head_that_learned_the_shortcut_in_reverse_is_rejected_on_the_clean_images() -> None:
    before, members, cluster = _shortcut_split()
    y = before.labels[:, K] == 1
    fact = _fact("fp_cluster", evidence={"member_ids": members})
    good_col = before.logits[:, K].copy()
    good_col[cluster] -= 4.5  # the artefact's effect removed, nothing else touched
    good = _verify(fact, before, _with(before, good_col), Acceptance())
    assert _failed(good) == []
    assert good["improvement_significant"]["method"] == "wilson" and good["improvement_significant"]["low"] > 0.8
    assert good["clean_target_specificity"]["value"] == 0.0 and good["clean_target_auroc"]["value"] == 0.0
    # Reversed: the artefact now means "negative", so its absence means "positive": the cluster's FPs are
    # gone, but on clean negatives the head calls most of them positive.
    reverse_col = good_col.copy()
    clean_neg = np.setdiff1d(np.flatnonzero(~y), cluster)
    reverse_col[clean_neg] += 3.5
    reverse = _verify(fact, before, _with(before, reverse_col), Acceptance())
    assert reverse["cluster_fps_removed"]["passed"] and reverse["improvement_significant"]["passed"]
    spec = reverse["clean_target_specificity"]
    assert not spec["passed"] and spec["high"] < 0 and spec["value"] < -0.5
    assert "negatives among 340 verify images outside the cluster" in spec["detail"]
    assert not reverse["clean_target_auroc"]["passed"] and reverse["clean_target_auroc"]["high"] < -0.01


def test_a_cluster_without_verify_members_cannot_show_its_improvement() -> None:
    before, _, _ = _shortcut_split()
    fact = _fact("fp_cluster", evidence={"member_ids": ["not-on-this-split.png"]})
    checks = _verify(fact, before, before, Acceptance())
    assert checks["cluster_fps_removed"]["passed"]  # the point check has nothing to count ...
    assert not checks["improvement_significant"]["passed"]  # ... so the gain cannot be shown: a human decides
    assert "none of the cluster's listed members" in checks["improvement_significant"]["reason"]



def test_a_symptom_of_a_shortcut_is_judged_on_the_clean_images_too() -> None:
    """The shortcut's calibration-drift symptom on the same label: treating it must not learn the artefact in
    reverse either (the cluster fact of the run is passed in; without it there is no clean-image check)."""
    before, members, cluster = _shortcut_split()
    y = before.labels[:, K] == 1
    reverse_col = before.logits[:, K].copy()
    reverse_col[cluster] -= 4.5
    reverse_col[np.setdiff1d(np.flatnonzero(~y), cluster)] += 3.5
    drift = _fact("calibration_drift")
    cluster_fact = _fact("fp_cluster", evidence={"member_ids": members})
    without = _verify(drift, before, _with(before, reverse_col), Acceptance())
    assert "clean_target_specificity" not in without
    judged = _verify(drift, before, _with(before, reverse_col), Acceptance(), cluster=cluster_fact)
    assert not judged["clean_target_specificity"]["passed"] and judged["clean_target_specificity"]["value"] < -0.5
