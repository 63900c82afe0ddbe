"""Monitors: shared invariants over every registered monitor, each monitor on its own fault (and
quiet on clean data over several seeds), degenerate inputs, config plumbing, and one end-to-end run
on a quickly trained model with an injected scanner shift.

Most tests use synthetic FeatureSets whose structure is known exactly: Gaussian pooled features
with 4 signal channels per label and a classifier that is the Bayes-optimal (hence calibrated)
linear rule, plus 3 "shortcut" channels the Pneumothorax row also weighs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.facts import FACT_KINDS, IssueFact
from engine.monitors import ALWAYS_RUN, MonitorConfig, MonitorContext, available_monitors, get_monitor, run_monitors
from engine.monitors.base import (
    LabelData,
    bootstrap_counts,
    j_at,
    sampled_youden_thresholds,
    weighted_auroc,
    weighted_ece,
    weighted_j_curve,
    weighted_youden_threshold,
)
from engine.monitors.calibration_drift import CalibrationDriftMonitor, _Findings, _selection_null, _SharedResamples
from model.bundle import Bundle, new_bundle
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.metrics import (
    auroc,
    expected_calibration_error,
    numeric_rows,
    per_label_metrics,
    sigmoid,
    youden_threshold,
)

K = len(CHEXNET_LABELS)
F = 64
SHORTCUT_LABEL = "Pneumothorax"
SHORTCUT_CHANNELS = (60, 61, 62)
ACTIONABLE_OR_INFO = set(FACT_KINDS) - {"cannot_assess"}
COMPARABLE = {"ece", "auroc", "youden_threshold", "sensitivity", "specificity", "prevalence", "max_logit_delta", "mmd2"}


# ------------------------------------------------------------------------------------------------
# Synthetic world


class _Head(nn.Module):
    """Just a classifier on pooled features (monitors never run the backbone)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.classifier = nn.Linear(n_features, K)


def _design(mu: float = 0.5, sigma: float = 0.5, n_signal: int = 4, prevalence: float = 0.2) -> dict:
    signal = [np.arange(k * n_signal, (k + 1) * n_signal) for k in range(K)]
    w = np.zeros((K, F))
    b = np.zeros(K)
    for k in range(K):
        w[k, signal[k]] = mu / sigma**2
        m0, m1, v = n_signal * 1.0, n_signal * (1.0 + mu), n_signal * sigma**2
        b[k] = np.log(prevalence / (1 - prevalence)) - (m1**2 - m0**2) / (2 * v)
    k_sc = CHEXNET_LABELS.index(SHORTCUT_LABEL)
    w[k_sc, list(SHORTCUT_CHANNELS)] = 0.8
    b[k_sc] -= 0.8 * len(SHORTCUT_CHANNELS)
    return dict(mu=mu, sigma=sigma, prevalence=prevalence, signal=signal, w=w, b=b)


def _draw(d: dict, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, K)) < d["prevalence"]).astype(np.uint8)
    f = 1.0 + d["sigma"] * rng.standard_normal((n, F))
    for k in range(K):
        f[:, d["signal"][k]] += d["mu"] * y[:, k : k + 1]
    return y, f.astype(np.float32)


def _logits(d: dict, f: np.ndarray) -> np.ndarray:
    return f.astype(np.float64) @ d["w"].T + d["b"]


def _featureset(d: dict, y: np.ndarray, f: np.ndarray, logits: np.ndarray | None = None) -> FeatureSet:
    z = _logits(d, f) if logits is None else logits
    names = tuple(f"{i:08d}_000.png" for i in range(len(y)))
    return FeatureSet(names, np.array([str(i) for i in range(len(y))], dtype=object), y, f,
                      np.asarray(z, dtype=np.float32), "weights", "manifest")


def _bundle(d: dict, n_ref: int = 1500, seed: int = 1) -> Bundle:
    y, f = _draw(d, n_ref, seed)
    z = _logits(d, f)
    thresholds = [youden_threshold(y[:, k], sigmoid(z[:, k])) for k in range(K)]
    reference = numeric_rows(per_label_metrics(y, z, thresholds, CHEXNET_LABELS, n_boot=200, seed=0))
    head = _Head(F)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor(d["w"], dtype=torch.float32))
        head.classifier.bias.copy_(torch.tensor(d["b"], dtype=torch.float32))
    return new_bundle(head, config={"num_classes": K}, input_size=64, thresholds=thresholds,
                      reference_metrics=reference)


@pytest.fixture(scope="module")
def world() -> tuple[dict, Bundle]:
    d = _design()
    return d, _bundle(d)


def _clean(world, n: int = 1500, seed: int = 10) -> FeatureSet:
    d, _ = world
    y, f = _draw(d, n, seed)
    return _featureset(d, y, f)


def _of(facts: list[IssueFact], kind: str) -> list[IssueFact]:
    return [f for f in facts if f.kind == kind]


# ------------------------------------------------------------------------------------------------
# Scenarios for the common invariants


def _scenarios(world) -> dict[str, MonitorContext]:
    d, bundle = world
    clean = _clean(world, n=600, seed=21)
    y, f = _draw(d, 600, 22)
    ref_y, ref_f = _draw(d, 300, 23)
    nan = clean.logits.copy()
    nan[[3, 7], 2] = np.nan
    nan[11, :] = np.inf
    no_pos_y = clean.labels.copy()
    no_pos_y[:, 0] = 0
    scrambled = clean.logits.copy()
    scrambled[:, 2] = np.random.default_rng(24).permutation(scrambled[:, 2])
    return {
        "clean": MonitorContext(bundle, clean, parent=bundle, parent_data=clean, reference_features=ref_f),
        "shifted": MonitorContext(bundle, clean.with_logits(clean.logits + 1.5), parent=bundle, parent_data=clean,
                                  reference_features=ref_f + 0.3),
        "nan_rows": MonitorContext(bundle, clean.with_logits(nan), parent_data=clean),
        "all_nan": MonitorContext(bundle, clean.with_logits(np.full_like(clean.logits, np.nan))),
        "no_positives": MonitorContext(bundle, FeatureSet(clean.image_names, clean.patient_ids, no_pos_y,
                                                          clean.features, clean.logits, "w", "m")),
        "one_row": MonitorContext(bundle, clean.subset([0]), parent_data=clean.subset([0]),
                                  reference_features=ref_f),
        "zero_rows": MonitorContext(bundle, clean.subset(np.array([], dtype=int)), reference_features=ref_f),
        "planted": MonitorContext(bundle, _featureset(d, y, _plant(d, y, f, 0.4, seed=5)[0])),
        # every score lowered: the operating point no longer finds the positives
        "lowered": MonitorContext(bundle, clean.with_logits(clean.logits - 3.0)),
        # one label's scores shuffled across images: its ranking is gone
        "scrambled": MonitorContext(bundle, clean.with_logits(scrambled)),
    }


def _plant(d: dict, y: np.ndarray, f: np.ndarray, share_of_negatives: float, seed: int, boost: float = 3.0):
    """A shortcut: a tight group of negatives lit up on 3 channels the Pneumothorax row weighs."""
    k = CHEXNET_LABELS.index(SHORTCUT_LABEL)
    neg = np.flatnonzero(y[:, k] == 0)
    rows = np.random.default_rng(seed).choice(neg, int(share_of_negatives * len(neg)), replace=False)
    out = f.copy()
    out[np.ix_(rows, list(SHORTCUT_CHANNELS))] += boost
    return out, rows


SCENARIOS = ("clean", "shifted", "nan_rows", "all_nan", "no_positives", "one_row", "zero_rows", "planted", "lowered",
             "scrambled")


@pytest.fixture(scope="module")
def scenarios(world) -> dict[str, MonitorContext]:
    return _scenarios(world)


def _snapshot(ctx: MonitorContext) -> tuple:
    arrays = [ctx.data.features, ctx.data.logits, ctx.data.labels]
    if ctx.reference_features is not None:
        arrays.append(ctx.reference_features)
    return tuple(np.array(a, copy=True) for a in arrays), ctx.bundle.weights_hash(), ctx.bundle.meta.model_dump()


# ------------------------------------------------------------------------------------------------
# Common invariants (scikit-learn test_common style): the same checks over every monitor


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", available_monitors())
def test_monitor_common_invariants(name: str, scenario: str, scenarios) -> None:
    ctx = scenarios[scenario]
    monitor = get_monitor(name)
    config = MonitorConfig()
    before = _snapshot(ctx)
    facts = monitor.run(ctx, config)
    after = _snapshot(ctx)
    # does not modify its inputs
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1:] == after[1:]
    # typed, attributed, declared kinds, strict-JSON-safe (fact ids hash canonical JSON without NaN)
    for fact in facts:
        assert isinstance(fact, IssueFact)
        assert fact.monitor == name
        assert fact.kind in monitor.kinds
        assert len(fact.fact_id) == 16
        json.dumps(fact.model_dump(mode="json"), allow_nan=False)
        assert fact.label is None or fact.label in ctx.bundle.labels
        # every threshold named in a fact is a real config key holding that value (no constants in code)
        for key, value in fact.threshold.items():
            assert config.value(key, fact.label) == value, key
        # measured and reference pair only comparable, scale-free metrics (verification averages the gaps)
        assert set(fact.measured) & set(fact.reference) <= COMPARABLE, fact.kind
    # deterministic
    again = monitor.run(ctx, config)
    assert [f.model_dump() for f in facts] == [f.model_dump() for f in again]


#: Each monitor's own fault, and the fact it must raise there: without it the invariants above could
#: pass vacuously for a monitor that never emits anything.
OWN_FAULT = {
    "validity": ("nan_rows", "invalid_output", None),
    "calibration_drift": ("shifted", "calibration_drift", "Effusion"),
    "fp_cluster": ("planted", "fp_cluster", "Pneumothorax"),
    "recall_collapse": ("lowered", "recall_collapse", "Effusion"),
    "auroc_drop": ("scrambled", "auroc_drop", "Effusion"),
    "compression_fidelity": ("shifted", "compression_fidelity", None),
    "prevalence_shift": ("no_positives", "prevalence_shift", "Atelectasis"),
    "input_drift": ("shifted", "input_drift", None),
}


def test_every_monitor_has_its_own_fault() -> None:
    assert set(OWN_FAULT) == set(available_monitors())
    for name, (scenario, kind, _) in OWN_FAULT.items():
        assert scenario in SCENARIOS and kind in get_monitor(name).kinds, name


@pytest.mark.parametrize("name", available_monitors())
def test_monitor_fires_on_its_own_fault(name: str, scenarios) -> None:
    scenario, kind, label = OWN_FAULT[name]
    facts = _of(get_monitor(name).run(scenarios[scenario], MonitorConfig()), kind)
    assert facts, f"{name} raised no {kind} on the {scenario!r} scenario"
    assert label in {f.label for f in facts}


def test_declared_kinds_are_fact_kinds() -> None:
    """What the removed registration-time check enforced: a monitor declares only real fact kinds."""
    for name in available_monitors():
        assert get_monitor(name).kinds and set(get_monitor(name).kinds) <= set(FACT_KINDS), name


@pytest.mark.parametrize("name", [n for n in available_monitors() if get_monitor(n).section])
def test_disabled_monitor_is_silent(name: str, scenarios) -> None:
    monitor = get_monitor(name)
    config = MonitorConfig.model_validate({monitor.section: {"enabled": False}})
    for scenario in ("shifted", "planted", "clean"):
        assert monitor.run(scenarios[scenario], config) == []


def test_invalid_output_names_the_rows(scenarios) -> None:
    ctx = scenarios["nan_rows"]
    facts = run_monitors(ctx, MonitorConfig())
    invalid = _of(facts, "invalid_output")
    assert len(invalid) == 1 and invalid[0].label is None
    assert invalid[0].evidence["sample_ids"] == [ctx.data.image_names[i] for i in (3, 7, 11)]
    assert invalid[0].evidence["non_finite_logits_per_label"]["Effusion"] == 3
    # the other monitors still ran on the finite rows: clean data, nothing else to say
    assert not [f for f in facts if f.kind in ACTIONABLE_OR_INFO - {"invalid_output", "input_drift"}]


def test_all_nan_is_a_fact_not_a_crash(scenarios) -> None:
    facts = run_monitors(scenarios["all_nan"], MonitorConfig())
    assert _of(facts, "invalid_output")[0].measured["n_invalid"] == len(scenarios["all_nan"].data)
    assert {f.label for f in _of(facts, "cannot_assess") if f.monitor == "validity"} == set(CHEXNET_LABELS)
    assert not [f for f in facts if f.actionable]


def test_no_positives_gives_cannot_assess(scenarios) -> None:
    facts = run_monitors(scenarios["no_positives"], MonitorConfig())
    assert [f.label for f in facts if f.kind == "cannot_assess" and f.monitor == "validity"] == ["Atelectasis"]
    fact = _of(facts, "cannot_assess")[0]
    assert fact.measured["positives"] == 0 and fact.threshold == {"min_positives": 1}
    # the label monitors skip it; only the prevalence monitor speaks (a prevalence of zero is a shift)
    assert [f.kind for f in facts if f.label == "Atelectasis" and f.kind != "cannot_assess"] == ["prevalence_shift"]


def test_too_few_positives_skip_rank_comparisons(world) -> None:
    d, bundle = world
    clean = _clean(world, n=600, seed=24)
    k = CHEXNET_LABELS.index("Mass")
    keep = np.r_[np.flatnonzero(clean.labels[:, k] == 0), np.flatnonzero(clean.labels[:, k] == 1)[:3]]
    data = clean.subset(np.sort(keep))
    data = data.with_logits(np.where(np.arange(K) == k, -data.logits, data.logits))  # ranking inverted
    facts = run_monitors(MonitorContext(bundle, data), MonitorConfig())
    info = [f for f in facts if f.label == "Mass" and f.kind == "cannot_assess"]
    assert info and info[0].severity == "info" and "3 positive(s)" in info[0].message
    assert not [f for f in facts if f.label == "Mass" and f.kind in ("auroc_drop", "recall_collapse")]
    # with the minimum lowered the same inverted ranking is an AUROC drop
    facts = run_monitors(MonitorContext(bundle, data), MonitorConfig(min_comparison_positives=3))
    assert [f.label for f in _of(facts, "auroc_drop")] == ["Mass"]


def test_no_positives_still_checks_the_negatives_threshold_displacement(scenarios) -> None:
    """A scanner shift on a label with no positives: only the negatives can show it, and they do."""
    ctx = scenarios["no_positives"]
    k = CHEXNET_LABELS.index("Atelectasis")
    shifted = ctx.data.with_logits(np.where(np.arange(K) == k, ctx.data.logits + 8.0, ctx.data.logits))
    facts = run_monitors(MonitorContext(ctx.bundle, shifted), MonitorConfig())
    drift = [f for f in _of(facts, "calibration_drift") if f.label == "Atelectasis"]
    assert len(drift) == 1 and drift[0].evidence["criteria"] == ["threshold_displacement"]
    assert drift[0].measured["auroc_comparable"] is False and drift[0].measured["positives"] == 0
    assert drift[0].measured["threshold_displacement_sd"] < 0  # scores moved above the threshold
    cannot = [f for f in facts if f.label == "Atelectasis" and f.kind == "cannot_assess"][0]
    assert "calibration_drift.ece" in cannot.evidence["skipped"] and "calibration_drift" not in cannot.evidence["skipped"]
    # unshifted, the same label raises nothing but the cannot_assess and the prevalence fact
    assert not [f for f in _of(run_monitors(ctx, MonitorConfig()), "calibration_drift") if f.label == "Atelectasis"]


def _negatives_label(shift: float, fp: int, tn: int) -> LabelData:
    """A label whose 400 negatives have standard-normal logits (plus ``shift``), no positives, a
    deployed threshold at logit 2.5 and a reference that counted ``fp`` / ``tn`` at it."""
    logits = np.random.default_rng(0).normal(size=400) + shift
    return LabelData(k=0, name="Atelectasis", rows=np.arange(400), y=np.zeros(400, dtype=int), logits=logits,
                     probs=sigmoid(logits), threshold=float(sigmoid(2.5)), reference={"fp": fp, "tn": tn})


def test_threshold_displacement_treats_a_zero_count_reference_as_a_bound() -> None:
    """0 reference false positives only says the threshold sat at least ~3 SD above the negatives: a
    threshold now 6.5 SD above them is consistent with that (the parent's clean phantom audit fired
    on exactly this); scores moved *up* past the bound still fire, and so does a counted reference."""
    cfg = MonitorConfig()
    check = CalibrationDriftMonitor()._check_negatives
    below = _negatives_label(shift=-4.0, fp=0, tn=500)  # threshold 6.5 SD above the negatives now
    assert CalibrationDriftMonitor._displacement(below, cfg.calibration_drift)["threshold_displacement_sd"] is None
    assert check(below, cfg) is None
    moved_up = check(_negatives_label(shift=3.0, fp=0, tn=500), cfg)  # threshold 0.5 SD below: FP rate ~0.7
    assert moved_up is not None and moved_up.measured["threshold_displacement_sd"] < -3
    counted = check(_negatives_label(shift=-4.0, fp=3, tn=497), cfg)  # reference sat at ~2.5 SD: a position
    assert counted is not None and counted.measured["threshold_displacement_sd"] > 3
    # the other side: a reference threshold below every negative, now further below them
    low = _negatives_label(shift=6.0, fp=500, tn=0)
    assert CalibrationDriftMonitor._displacement(low, cfg.calibration_drift)["threshold_displacement_sd"] is None


def test_sampled_youden_thresholds_are_each_samples_own_best_score() -> None:
    """Per sample: a score it holds, with the sample's largest J, the lowest such score (ties included)."""
    rng = np.random.default_rng(5)
    y = (rng.random(400) < 0.2).astype(int)
    scores = np.round(rng.random(400) * (0.5 + 0.4 * y), 2)  # coarse: many tied scores
    rows = np.concatenate([rng.choice(np.flatnonzero(y == 1), size=(50, 15)),
                           rng.choice(np.flatnonzero(y == 0), size=(50, 45))], axis=1)
    got = sampled_youden_thresholds(y, scores, rows)
    for b in range(50):
        ys, ss = y[rows[b]], scores[rows[b]]
        j = {t: (ss[ys == 1] >= t).mean() - (ss[ys == 0] >= t).mean() for t in np.unique(ss)}
        best = max(j.values())
        assert got[b] == min(t for t, v in j.items() if v == best)


def test_operating_point_allows_for_the_deployed_thresholds_own_selection_noise() -> None:
    """A threshold off this data's best by a J loss that a Youden pick on a small reference makes by
    chance is no drift; the same loss against a reference of thousands is."""
    rng = np.random.default_rng(3)
    y = (rng.random(3000) < 0.1).astype(int)
    logits = rng.normal(size=3000) + 1.2 * y - 2.0  # AUROC ~0.8: a flat J curve
    probs = sigmoid(logits)
    def check(ref_n: int):
        cfg = MonitorConfig()
        # deployed threshold where the J loss on this data is about 0.2
        lab = LabelData(k=0, name="Atelectasis", rows=np.arange(3000), y=y, logits=logits, probs=probs,
                        threshold=float(sigmoid(-2.0 + 1.8)), reference={"n": ref_n, "prevalence": 0.1})
        counts = bootstrap_counts(3000, cfg.calibration_drift.n_boot, 0)
        found = _Findings(_SharedResamples(lambda n_boot: counts, cfg.calibration_drift.n_boot))
        CalibrationDriftMonitor._operating_point_test(lab, cfg.calibration_drift, 2.7, found,
                                                      tail=0.05 / 14, seed=[0, 2, 0])
        return found

    small, large = check(60), check(5000)
    assert small.measured["j_loss"] == large.measured["j_loss"] and large.measured["j_loss_lower"] >= 0.05
    assert small.measured["j_loss_selection_quantile"] > small.measured["j_loss"] > large.measured[
        "j_loss_selection_quantile"]
    assert not small.fired and "calibration_drift.min_j_loss" in large.fired



def test_selection_null_holds_its_level_when_reference_and_audit_are_independent() -> None:
    """No drift: the reference and the audited data are independent draws of one distribution. The
    deployed (reference Youden) threshold's J loss on the audited data exceeds the null's 95 %
    quantile about 5 % of the time -- not the 17-28 % of a null judged on the audited curve itself,
    which leaves that curve's own noise out."""
    rng = np.random.default_rng(11)
    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.1).astype(int)
        return y, sigmoid(rng.normal(size=n) + 1.2 * y - 2.0)
    exceeded, reps = 0, 120
    for r in range(reps):
        (y_ref, p_ref), (y, p) = draw(200), draw(400)
        deployed = youden_threshold(y_ref, p_ref)
        values, j = weighted_j_curve(y, p, np.ones((1, len(y)), dtype=np.float32))
        j_loss = float(np.nanmax(j[0]) - j_at(values, j, deployed)[0])
        lab = LabelData(k=0, name="Atelectasis", rows=np.arange(len(y)), y=y, logits=np.log(p / (1 - p)), probs=p,
                        threshold=deployed, reference={"n": 200, "prevalence": float(y_ref.mean())})
        replicas = bootstrap_counts(len(y), 1000, [r, 1])
        exceeded += j_loss > _selection_null(lab, 0.05, [r], replicas)["j_loss_selection_quantile"]
    assert exceeded / reps <= 0.12  # 0.083 measured; the null judged on this data's own curve: 0.25


def test_selection_null_is_none_not_a_number_when_no_replica_holds_both_classes() -> None:
    y = np.array([1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.3, 0.1, 0.4, 0.5])
    lab = LabelData(k=0, name="Atelectasis", rows=np.arange(6), y=y, logits=np.log(p / (1 - p)), probs=p,
                    threshold=0.5, reference={"n": 20, "prevalence": 0.2})
    no_positive = np.tile(np.array([0, 2, 1, 1, 1, 1], dtype=np.float32), (10, 1))
    assert _selection_null(lab, 0.05, [0], no_positive) is None
    assert _selection_null(lab, 0.05, [0], np.ones((10, 6), dtype=np.float32)) is not None

# ------------------------------------------------------------------------------------------------
# Clean data: no false alarms


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_clean_data_raises_no_alarm(world, seed: int) -> None:
    d, bundle = world
    data = _clean(world, n=1500, seed=seed)
    _, ref_f = _draw(d, 600, seed + 100)
    ctx = MonitorContext(bundle, data, parent=bundle, parent_data=data, reference_features=ref_f)
    facts = run_monitors(ctx, MonitorConfig())
    assert facts == [], [(f.kind, f.label, f.message) for f in facts]


# ------------------------------------------------------------------------------------------------
# Each monitor fires on its fault, with the right kind and label


def test_calibration_drift_fires_on_a_logit_shift(world) -> None:
    clean = _clean(world)
    facts = run_monitors(MonitorContext(world[1], clean.with_logits(clean.logits + 1.5)), MonitorConfig(),
                         ["calibration_drift"])
    drift = _of(facts, "calibration_drift")
    assert {f.label for f in drift} == set(CHEXNET_LABELS)
    intact = 0
    for f in drift:
        # a constant logit shift keeps the ranking: "ranking intact" is exactly the AUROC ratio test
        ratio_ok = f.measured["auroc"] >= 0.95 * f.reference["auroc"]
        assert f.measured["auroc_intact"] is ratio_ok and f.evidence["auroc_intact"] is ratio_ok
        intact += ratio_ok
        for key in ("youden_threshold", "deployed_threshold", "ece", "auroc"):
            assert key in f.measured and key in f.evidence
        assert f.measured["ece"] > f.reference["ece"] + 0.05
        assert f.measured["youden_threshold"] > f.measured["deployed_threshold"] + 0.1
        assert f.severity in ("medium", "high")
        assert set(f.evidence["criteria"]) <= {"ece", "operating_point", "threshold_displacement"}
    assert intact >= 12
    assert sum("operating_point" in f.evidence["criteria"] for f in drift) >= 7


def test_calibration_drift_thresholds_come_from_config(world) -> None:
    clean = _clean(world)
    shifted = MonitorContext(world[1], clean.with_logits(clean.logits + 1.0))
    assert _of(run_monitors(shifted, MonitorConfig(), ["calibration_drift"]), "calibration_drift")
    lax = MonitorConfig(calibration_drift={"ece_increase": 0.5, "threshold_shift": 0.9,
                                           "max_threshold_displacement": 50})
    assert not _of(run_monitors(shifted, lax), "calibration_drift")


def test_calibration_drift_ignores_a_prevalence_change(world) -> None:
    d, bundle = world
    y, f = _draw(d, 3000, 41)
    k = CHEXNET_LABELS.index("Effusion")
    pos, neg = np.flatnonzero(y[:, k] == 1), np.flatnonzero(y[:, k] == 0)
    rows = np.sort(np.r_[pos, neg[: len(pos)]])  # Effusion prevalence 0.2 -> 0.5, same model, same P(x|y)
    facts = run_monitors(MonitorContext(bundle, _featureset(d, y[rows], f[rows])), MonitorConfig())
    assert not [x for x in _of(facts, "calibration_drift") if x.label == "Effusion"]
    assert [x.label for x in _of(facts, "prevalence_shift")] == ["Effusion"]


def test_fp_cluster_finds_the_planted_shortcut(world) -> None:
    d, bundle = world
    y, f = _draw(d, 1500, 51)
    f2, planted = _plant(d, y, f, 0.4, seed=1)
    data = _featureset(d, y, f2)
    facts = run_monitors(MonitorContext(bundle, data), MonitorConfig())
    clusters = _of(facts, "fp_cluster")
    assert [c.label for c in clusters] == [SHORTCUT_LABEL]
    fact = clusters[0]
    assert set(fact.evidence["channels"][:3]) == set(SHORTCUT_CHANNELS)
    assert fact.evidence["n_channels_needed"] is not None and fact.evidence["n_channels_needed"] <= 3
    assert fact.measured["n_channels_needed"] == fact.evidence["n_channels_needed"]
    members = set(fact.evidence["member_ids"])
    planted_ids = {data.image_names[i] for i in planted}
    assert len(members & planted_ids) / len(members) >= 0.95
    assert fact.measured["cluster_size"] >= 0.9 * len(planted)
    assert len(members) == fact.measured["cluster_size"]  # every member listed: verification judges them all
    for key in ("n_fp", "n_tp", "cluster_size", "share", "separation_auroc", "negative_separation_auroc"):
        assert key in fact.measured
    assert fact.measured["share"] >= 0.5 and fact.measured["separation_auroc"] >= 0.9
    assert fact.measured["negative_separation_auroc"] >= 0.8


def test_fp_cluster_when_nearly_every_fp_is_the_shortcut(world) -> None:
    """A strong model has almost no natural FPs: the cluster is (nearly) the whole FP set."""
    d = _design(mu=1.2)
    bundle = _bundle(d)
    y, f = _draw(d, 1000, 52)
    f2, planted = _plant(d, y, f, 0.1, seed=2, boost=8.0)
    clusters = _of(run_monitors(MonitorContext(bundle, _featureset(d, y, f2)), MonitorConfig()), "fp_cluster")
    assert [c.label for c in clusters] == [SHORTCUT_LABEL]
    assert clusters[0].measured["share"] >= 0.9
    assert set(clusters[0].evidence["channels"][:3]) == set(SHORTCUT_CHANNELS)


def test_recall_collapse_on_weaker_positives(world) -> None:
    d, bundle = world
    y, f = _draw(d, 1500, 61)
    k = CHEXNET_LABELS.index("Nodule")
    f = f.copy()
    f[np.ix_(np.flatnonzero(y[:, k] == 1), d["signal"][k])] -= 0.8 * d["mu"]  # small findings fade
    facts = run_monitors(MonitorContext(bundle, _featureset(d, y, f)), MonitorConfig())
    collapse = _of(facts, "recall_collapse")
    assert [c.label for c in collapse] == ["Nodule"]
    fact = collapse[0]
    assert fact.measured["recall"] < 0.6 * fact.reference["sensitivity"]
    assert fact.measured["positives"] == int(y[:, k].sum())
    assert "auroc" in fact.measured and fact.evidence["n_missed"] == fact.measured["fn"]


def test_auroc_drop_on_scrambled_ranking(world) -> None:
    d, bundle = world
    data = _clean(world, seed=71)
    k = CHEXNET_LABELS.index("Effusion")
    z = data.logits.copy()
    rng = np.random.default_rng(0)
    rows = rng.choice(len(z), len(z) // 2, replace=False)
    z[rows, k] = rng.permutation(z[rows, k])
    facts = run_monitors(MonitorContext(bundle, data.with_logits(z)), MonitorConfig(), ["auroc_drop"])
    assert [f.label for f in _of(facts, "auroc_drop")] == ["Effusion"]
    fact = _of(facts, "auroc_drop")[0]
    assert fact.measured["auroc_ci_high"] < fact.reference["auroc"] - 0.05


def test_auroc_drop_needs_more_than_noise(world) -> None:
    """A small drop inside the bootstrap noise of 60 positives does not fire."""
    d, bundle = world
    data = _clean(world, n=300, seed=72)
    z = data.logits.copy()
    k = CHEXNET_LABELS.index("Effusion")
    z[:, k] += np.random.default_rng(1).normal(0, 0.4, len(z))  # mild extra noise: AUROC down ~0.02
    assert auroc(data.labels[:, k], z[:, k]) < world[1].meta.reference_metrics["Effusion"]["auroc"]
    assert not _of(run_monitors(MonitorContext(bundle, data.with_logits(z)), MonitorConfig()), "auroc_drop")


def test_compression_fidelity(world) -> None:
    d, bundle = world
    parent_data = _clean(world, n=400, seed=81)
    noise = np.random.default_rng(0).normal(0, 0.05, parent_data.logits.shape)
    compressed = parent_data.with_logits(parent_data.logits + noise)
    order = np.random.default_rng(1).permutation(len(parent_data))  # parent rows in another order
    ctx = MonitorContext(bundle, compressed, parent=bundle, parent_data=parent_data.subset(order))
    facts = _of(run_monitors(ctx, MonitorConfig()), "compression_fidelity")
    assert len(facts) == 1 and facts[0].label is None
    assert facts[0].measured["max_logit_delta"] == pytest.approx(np.abs(noise).max(), rel=1e-4)
    assert set(facts[0].evidence["per_label_max_delta"]) == set(CHEXNET_LABELS)
    worst = int(np.abs(noise).max(axis=1).argmax())
    assert facts[0].evidence["worst_ids"][0] == parent_data.image_names[worst]
    # within tolerance, or no parent: silent
    tiny = parent_data.with_logits(parent_data.logits + noise * 1e-3)
    assert not _of(run_monitors(MonitorContext(bundle, tiny, parent=bundle, parent_data=parent_data),
                                MonitorConfig()), "compression_fidelity")
    assert not _of(run_monitors(MonitorContext(bundle, compressed), MonitorConfig()), "compression_fidelity")


def test_prevalence_shift(world) -> None:
    d, bundle = world
    y, f = _draw(d, 1500, 91)
    k = CHEXNET_LABELS.index("Atelectasis")
    pos = np.flatnonzero(y[:, k] == 1)
    drop = set(np.random.default_rng(0).choice(pos, int(0.8 * len(pos)), replace=False).tolist())
    rows = np.array([i for i in range(len(y)) if i not in drop])
    facts = run_monitors(MonitorContext(bundle, _featureset(d, y[rows], f[rows])), MonitorConfig())
    shift = _of(facts, "prevalence_shift")
    assert [s.label for s in shift] == ["Atelectasis"] and shift[0].severity == "info"
    assert shift[0].measured["prevalence"] < shift[0].reference["prevalence"] - 0.1


def test_input_drift(world) -> None:
    d, bundle = world
    data = _clean(world, n=600, seed=101)
    _, ref_f = _draw(d, 600, 102)
    assert not _of(run_monitors(MonitorContext(bundle, data, reference_features=ref_f), MonitorConfig()),
                   "input_drift")
    moved = data.features.copy()
    moved[:, 40:56] += 0.4  # channels no classifier row weighs: invisible to every other monitor
    ctx = MonitorContext(bundle, FeatureSet(data.image_names, data.patient_ids, data.labels, moved, data.logits,
                                            "w", "m"), reference_features=ref_f, reference_source="training set")
    facts = run_monitors(ctx, MonitorConfig())
    assert [f.kind for f in facts] == ["input_drift"]
    assert facts[0].severity == "info" and facts[0].evidence["reference_source"] == "training set"
    assert set(facts[0].evidence["most_shifted_channels"][:5]) <= set(range(40, 56))
    # no reference sample: said so, not compared with itself
    none = _of(run_monitors(MonitorContext(bundle, data), MonitorConfig()), "cannot_assess")
    assert [f.monitor for f in none] == ["input_drift"]


# ------------------------------------------------------------------------------------------------
# run_monitors, config


def test_run_monitors_order_and_selection(world, scenarios) -> None:
    ctx = scenarios["shifted"]
    facts = run_monitors(ctx, MonitorConfig())
    rank = {n: i for i, n in enumerate(available_monitors())}
    label_rank = {n: i for i, n in enumerate(ctx.bundle.labels)}
    keys = [(rank[f.monitor], -1 if f.label is None else label_rank[f.label]) for f in facts]
    assert keys == sorted(keys)
    only = run_monitors(ctx, MonitorConfig(), ["auroc_drop"])
    assert {f.monitor for f in only} <= {"auroc_drop", *ALWAYS_RUN}
    with pytest.raises(ValueError, match="Unknown monitor"):
        run_monitors(ctx, MonitorConfig(), ["calibration"])


def test_config_overrides_and_errors() -> None:
    config = MonitorConfig.model_validate({"recall_collapse": {"min_recall_ratio": 0.5},
                                           "overrides": {"Pneumothorax": {"recall_collapse": {"min_recall_ratio": 0.8}}}})
    assert config.for_label("Pneumothorax").recall_collapse.min_recall_ratio == 0.8
    assert config.for_label("Mass").recall_collapse.min_recall_ratio == 0.5
    assert config.value("recall_collapse.min_recall_ratio", "Pneumothorax") == 0.8
    with pytest.raises(ValueError, match=r"overrides\.Pneumothorax\.recall_collapse\.min_recall"):
        MonitorConfig.model_validate({"overrides": {"Pneumothorax": {"recall_collapse": {"min_recall": 0.8}}}})
    with pytest.raises(ValueError, match="unknown label 'Pneumothorx'"):
        MonitorConfig.model_validate({"overrides": {"Pneumothorx": {}}})
    with pytest.raises(ValueError, match="extra"):
        MonitorConfig.model_validate({"fp_cluster": {"min_shares": 0.5}})


def test_per_label_override_changes_the_decision(world) -> None:
    d, bundle = world
    y, f = _draw(d, 1500, 61)
    k = CHEXNET_LABELS.index("Nodule")
    f = f.copy()
    f[np.ix_(np.flatnonzero(y[:, k] == 1), d["signal"][k])] -= 0.8 * d["mu"]
    ctx = MonitorContext(bundle, _featureset(d, y, f))
    off = MonitorConfig.model_validate({"overrides": {"Nodule": {"recall_collapse": {"enabled": False}}}})
    assert not _of(run_monitors(ctx, off), "recall_collapse")


def test_a_labels_facts_do_not_depend_on_other_labels_switches(scenarios) -> None:
    """The loop re-checks only treated labels by switching the others off: same facts for the rest."""
    ctx = scenarios["shifted"]
    full = run_monitors(ctx, MonitorConfig())
    off = {name: {section: {"enabled": False} for section in
                  ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop", "prevalence_shift")}
           for name in CHEXNET_LABELS if name != "Effusion"}
    kept = run_monitors(ctx, MonitorConfig(overrides=off))
    assert [f for f in kept if f.label == "Effusion"] == [f for f in full if f.label == "Effusion"]
    assert [f for f in full if f.label == "Effusion" and f.actionable]


# ------------------------------------------------------------------------------------------------
# Statistics helpers agree with the plain metrics


def test_weighted_bootstrap_helpers_match_plain_metrics() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    s = np.round(rng.normal(y * 1.0, 1.0), 1)  # ties on purpose
    ones = np.ones((1, len(y)), dtype=np.float32)
    assert weighted_auroc(y, s, ones)[0] == pytest.approx(auroc(y, s))
    p = sigmoid(s)
    assert weighted_ece(y, p, ones, 10)[0] == pytest.approx(expected_calibration_error(y, p))
    assert weighted_youden_threshold(y, p, ones)[0] == pytest.approx(youden_threshold(y, p))
    counts = bootstrap_counts(len(y), 50, [0])
    assert counts.shape == (50, len(y)) and np.all(counts.sum(axis=1) == len(y))
    idx = np.repeat(np.arange(len(y)), counts[0].astype(int))
    assert weighted_auroc(y, s, counts[:1])[0] == pytest.approx(auroc(y[idx], s[idx]))


# ------------------------------------------------------------------------------------------------
# End to end: a quickly trained model, an injected scanner shift, the CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from model.bundle import save_bundle
    from model.data import load_nih_dataset
    from model.data.faults import inject_fault
    from model.data.phantom import generate_phantoms
    from model.train import train_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    ph = generate_phantoms(root / "ph", 240, size=32, seed=1)
    bundle, _ = train_bundle(load_nih_dataset(ph, "train_val"), preset="densenet121", image_size=32, epochs=1,
                             seed=1)
    save_bundle(bundle, root / "m.safetensors")
    inject_fault(ph, "scanner_shift", root / "shift", seed=2)
    return root


def _monitor_cli(root: Path, data: str, out: str, monkeypatch, tmp_path: Path) -> list[dict]:
    import cli

    # a fresh feature cache per dataset: the cache key does not cover pixel content (see report)
    monkeypatch.setenv("CXR_TRIAGE_CACHE", str(tmp_path / f"cache_{data}"))
    policy = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
    rc = cli.main(["monitor", "--model", str(root / "m.safetensors"), "--data", str(root / data),
                   "--policy", str(policy), "--json", str(tmp_path / out)])
    assert rc == 0
    doc = json.loads((tmp_path / out).read_text())
    for fact in doc["facts"]:
        fid = fact.pop("fact_id")
        assert IssueFact.model_validate(fact).fact_id == fid
    return doc["facts"]


def test_end_to_end_scanner_shift_is_calibration_drift(trained, monkeypatch, tmp_path) -> None:
    shifted = _monitor_cli(trained, "shift", "facts.json", monkeypatch, tmp_path)
    clean = _monitor_cli(trained, "ph", "clean.json", monkeypatch, tmp_path)
    assert [f for f in shifted if f["kind"] == "calibration_drift"]
    assert not [f for f in clean if f["kind"] == "calibration_drift"]
    assert not [f for f in clean if f["kind"] in ("fp_cluster", "recall_collapse", "auroc_drop")]
