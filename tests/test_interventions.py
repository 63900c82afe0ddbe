"""Per-plugin tests of zeroing, partial_retrain, augmentation and full_retrain.

Classifier-level plugins are tested on synthetic pooled features with a hand-set classifier: the
ground truth of which channels carry the finding and which carry a planted shortcut is known, and
a second draw from the same distribution is the held-out verify split. Backbone plugins run on a
tiny DenseNet over small PNG datasets written on the fly; their effect is tested in a "tube world"
where the fault injector's chest tube is the only thing that predicts the label in training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_rows, write_nih_dataset
from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from interventions.attribution import contributions, head_logits, top_channels
from interventions.augmentation import _draw_tube_grey, intensity_jitter
from interventions.base import TreatmentContext
from interventions.registry import get_intervention
from interventions.full_retrain import preset_of
from interventions.partial_retrain import fit_head, patient_folds
from model.bundle import Bundle, load_bundle, new_bundle, save_bundle
from model.data import load_nih_dataset
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, confusion_at, sigmoid
from model.nets import arch_config, tiny_densenet

PTX = CHEXNET_LABELS.index("Pneumothorax")
EFF = CHEXNET_LABELS.index("Effusion")
SIGNAL = [0, 1, 2, 3, 4]
ARTEFACT = [10, 11, 12]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny convolutions gain nothing from two, and on a loaded machine the
    OpenMP threads' spin-waiting makes them 20-30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Synthetic features with a known shortcut


def hand_set_bundle(seed: int = 0, ptx_bias: float = -4.5) -> Bundle:
    """Tiny DenseNet whose classifier is set by hand.

    Each label k != Pneumothorax reads its own channel 14+k. Pneumothorax reads five signal
    channels AND three artefact channels (the shortcut it "learned").
    """
    torch.manual_seed(seed)
    model = tiny_densenet().eval()
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (14, 32))
    for k in range(14):
        w[k, 14 + k] = 3.0
    w[PTX] = rng.normal(0, 0.05, 32)
    w[PTX, SIGNAL] = 1.2
    w[PTX, ARTEFACT] = 1.5
    b = np.full(14, -2.0)
    b[PTX] = ptx_bias
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(w).float())
        model.classifier.bias.copy_(torch.from_numpy(b).float())
    return new_bundle(model, config=arch_config("tiny"), input_size=32)


def synthetic_features(
    bundle: Bundle, *, n: int = 400, seed: int = 0, prefix: str = "s", cluster_share: float = 0.08,
    artefact_on_positives: float = 0.0, artefact_baseline: float = 0.0,
) -> tuple[FeatureSet, np.ndarray]:
    """Pooled features of ``n`` images; a share of Pneumothorax negatives carries the artefact.

    Returns the FeatureSet (logits from the bundle's own head) and the rows of the planted cluster.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 14)) < 0.15).astype(np.uint8)
    f = np.abs(rng.normal(0.1, 0.1, (n, 32)))
    f[:, ARTEFACT] += artefact_baseline  # every image activates the artefact channels a little
    for k in range(14):
        if k != PTX:
            f[labels[:, k] == 1, 14 + k] += 1.5
    pos = labels[:, PTX] == 1
    f[np.ix_(pos, SIGNAL)] += rng.uniform(0.8, 2.0, (pos.sum(), 1))
    if artefact_on_positives:
        carriers = np.flatnonzero(pos)[: int(artefact_on_positives * pos.sum())]
        f[np.ix_(carriers, ARTEFACT)] += 3.0
    negatives = np.flatnonzero(~pos)
    cluster = np.sort(rng.choice(negatives, int(cluster_share * n), replace=False))
    f[np.ix_(cluster, ARTEFACT)] += rng.uniform(2.8, 3.5, (len(cluster), 1))
    f = f.astype(np.float32)
    names = tuple(f"{prefix}{i:05d}.png" for i in range(n))
    patients = np.array([f"{prefix}{i // 2}" for i in range(n)], dtype=object)
    fs = FeatureSet(names, patients, labels, f, head_logits(bundle, f), bundle.weights_hash(), f"manifest-{prefix}")
    return fs, cluster


def fp_fact(fs: FeatureSet, cluster: np.ndarray, *, members: bool = True, channels=(10, 11, 12, 3)) -> IssueFact:
    evidence = {"channels": list(channels)}
    if members:
        evidence["member_ids"] = [fs.image_names[i] for i in cluster]
    return IssueFact(kind="fp_cluster", monitor="fp_cluster", label="Pneumothorax", severity="high",
                     message="planted shortcut cluster", evidence=evidence)


def ctx_for(bundle: Bundle, fact: IssueFact, fit: FeatureSet, **kw) -> TreatmentContext:
    return TreatmentContext(bundle=bundle, fact=fact, fit=fit, fit_dataset=None, **kw)


def state_bytes(bundle: Bundle) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in bundle.model.state_dict().items()}


@pytest.fixture(scope="module")
def shortcut():
    bundle = hand_set_bundle()
    fit, cluster = synthetic_features(bundle, seed=0, prefix="f")
    verify, v_cluster = synthetic_features(bundle, seed=1, prefix="v")
    return bundle, fit, cluster, verify, v_cluster


# --------------------------------------------------------------------------------------------
# attribution


def test_contributions_sum_to_logits(shortcut):
    bundle, fit, *_ = shortcut
    w = bundle.model.classifier.weight.detach().double().numpy()[PTX]
    b = float(bundle.model.classifier.bias.detach()[PTX])
    logits = contributions(fit.features, w).sum(axis=1) + b
    np.testing.assert_allclose(logits, fit.logits[:, PTX], rtol=1e-5, atol=1e-5)


def test_top_channels_against_reference_finds_the_artefact(shortcut):
    bundle, fit, cluster, *_ = shortcut
    w = bundle.model.classifier.weight.detach().double().numpy()[PTX]
    c = contributions(fit.features, w)
    tps = np.flatnonzero(fit.labels[:, PTX] == 1)
    top = top_channels(c, cluster, k=3, against=tps)
    assert sorted(t["channel"] for t in top) == ARTEFACT


# --------------------------------------------------------------------------------------------
# zeroing


def test_zeroing_picks_exactly_the_planted_channels_and_spares_everything_else(shortcut):
    bundle, fit, cluster, verify, v_cluster = shortcut
    before_state = state_bytes(bundle)
    result = get_intervention("zeroing").apply(ctx_for(bundle, fp_fact(fit, cluster), fit))
    assert state_bytes(bundle) == before_state  # input untouched
    assert result.changes["channels"] == ARTEFACT  # all three needed, none of the signal channels
    m = result.fit_metrics["Pneumothorax"]
    assert m["tp"]["after"] == m["tp"]["before"]
    assert m["cluster_fp_removed_share"] >= 0.5

    # Held-out verify split: the cluster is gone, no TP lost, other 13 labels bit-identical.
    old = torch.from_numpy(head_logits(bundle, verify.features))
    new = torch.from_numpy(head_logits(result.bundle, verify.features))
    others = [k for k in range(14) if k != PTX]
    assert torch.equal(old[:, others], new[:, others])
    thr = result.bundle.meta.thresholds[PTX]
    y = verify.labels[:, PTX].astype(bool)
    p_old, p_new = sigmoid(old[:, PTX].numpy()), sigmoid(new[:, PTX].numpy())
    cluster_before = int((p_old[v_cluster] >= thr).sum())
    cluster_after = int((p_new[v_cluster] >= thr).sum())
    assert cluster_before >= 20 and cluster_after <= 0.5 * cluster_before
    assert int(((p_new >= thr) & y).sum()) == int(((p_old >= thr) & y).sum())
    # Replayable: the history entry reproduces the weights from the parent.
    op = result.bundle.meta.history[-1]
    assert op["op"] == "zero_classifier_weights" and op["row"] == PTX
    replay = bundle.copy()
    with torch.no_grad():
        replay.model.classifier.weight[op["row"], op["channels"]] = op["value"]
        replay.model.classifier.bias[op["row"]] = op["bias_new"]
    assert replay.weights_hash() == result.bundle.weights_hash()
    assert result.bundle.meta.parent_hash == bundle.content_hash()


def test_mean_ablation_keeps_true_positives_where_plain_zeroing_cannot():
    # The artefact channels carry a baseline of 0.8 on every image (3.6 logits through the row);
    # the bias is lower by as much, so the operating point is the same as in the plain scenario.
    bundle = hand_set_bundle(ptx_bias=-4.5 - 3 * 1.5 * 0.8)
    fit, cluster = synthetic_features(bundle, seed=0, prefix="f", artefact_baseline=0.8)
    verify, v_cluster = synthetic_features(bundle, seed=1, prefix="v", artefact_baseline=0.8)
    plugin = get_intervention("zeroing")
    with pytest.raises(InterventionError, match="true positive"):  # plain zeroing drops everything 3.6 logits
        plugin.apply(ctx_for(bundle, fp_fact(fit, cluster), fit, params={"compensate_bias": False}))
    result = plugin.apply(ctx_for(bundle, fp_fact(fit, cluster), fit))
    assert result.changes["channels"] == ARTEFACT
    op = result.bundle.meta.history[-1]
    assert op["bias_new"] > op["bias_old"]  # the baseline went into the bias
    old, new = head_logits(bundle, verify.features)[:, PTX], head_logits(result.bundle, verify.features)[:, PTX]
    y = verify.labels[:, PTX] == 1
    thr = bundle.meta.thresholds[PTX]
    assert abs(float((new[y] - old[y]).mean())) < 0.1
    assert int((sigmoid(new[y]) >= thr).sum()) == int((sigmoid(old[y]) >= thr).sum())
    assert (sigmoid(new[v_cluster]) >= thr).sum() <= 0.5 * (sigmoid(old[v_cluster]) >= thr).sum()


def test_zeroing_widens_the_cluster_from_channel_evidence_when_members_are_elsewhere(shortcut):
    bundle, fit, cluster, *_ = shortcut
    fact = fp_fact(fit, cluster, members=False)  # e.g. all members fell into the verify split
    result = get_intervention("zeroing").apply(ctx_for(bundle, fact, fit))
    assert result.changes["cluster"]["how"] == "channels"
    assert set(result.changes["channels"]) <= set(ARTEFACT) and result.changes["channels"]
    assert result.fit_metrics["Pneumothorax"]["tp"]["after"] == result.fit_metrics["Pneumothorax"]["tp"]["before"]


def test_zeroing_refuses_when_true_positives_rely_on_the_same_channels():
    bundle = hand_set_bundle()
    fit, cluster = synthetic_features(bundle, seed=0, prefix="f", artefact_on_positives=1.0)
    with torch.no_grad():  # positives are only above threshold thanks to the artefact channels
        bundle.model.classifier.weight[PTX, SIGNAL] = 0.2
    fit = fit.with_logits(head_logits(bundle, fit.features))
    plugin = get_intervention("zeroing")
    ctx = ctx_for(bundle, fp_fact(fit, cluster), fit)
    assert plugin.applicable(ctx)[0]
    with pytest.raises(InterventionError, match="true positive|positives"):
        plugin.apply(ctx)


def test_zeroing_not_applicable_without_evidence_or_cluster_fps(shortcut):
    bundle, fit, cluster, *_ = shortcut
    plugin = get_intervention("zeroing")
    bare = IssueFact(kind="fp_cluster", monitor="fp_cluster", label="Pneumothorax", severity="high", message="x")
    ok, why = plugin.applicable(ctx_for(bundle, bare, fit))
    assert not ok and "evidence" in why
    healthy = fit.subset(np.flatnonzero(fit.labels[:, PTX] == 1))  # only positives: no FP at all
    ok, why = plugin.applicable(ctx_for(bundle, fp_fact(fit, cluster), healthy))
    assert not ok and "none of the cluster" in why
    drift = IssueFact(kind="calibration_drift", monitor="c", label="Pneumothorax", severity="high", message="x")
    assert not plugin.applicable(ctx_for(bundle, drift, fit))[0]


def test_zeroing_rejects_unknown_and_bad_params(shortcut):
    bundle, fit, cluster, *_ = shortcut
    plugin = get_intervention("zeroing")
    ok, why = plugin.applicable(ctx_for(bundle, fp_fact(fit, cluster), fit, params={"max_chanels": 3}))
    assert not ok and why.startswith("zeroing parameters: ==> At key: max_chanels: unknown key (expected one of: "
                                     "max_channels, ")
    ok, why = plugin.applicable(ctx_for(bundle, fp_fact(fit, cluster), fit, params={"max_channels": 0}))
    assert not ok and why == "zeroing parameters: ==> At key: max_channels: must be an integer >= 1, got 0"


def test_zeroing_respects_the_channel_cap(shortcut):
    bundle, fit, cluster, *_ = shortcut
    with pytest.raises(InterventionError, match="remove only"):
        get_intervention("zeroing").apply(ctx_for(bundle, fp_fact(fit, cluster), fit,
                                                  params={"max_channels": 1, "min_fp_removed_share": 0.9}))


def test_zeroing_refuses_stale_features(shortcut):
    bundle, fit, cluster, *_ = shortcut
    stale = fit.with_logits(fit.logits + 1.0)
    with pytest.raises(InterventionError, match="another model"):
        get_intervention("zeroing").apply(ctx_for(bundle, fp_fact(stale, cluster), stale))


# --------------------------------------------------------------------------------------------
# partial_retrain


def _other_auroc_change(labels, old, new, skip):
    return max(abs(auroc(labels[:, k], new[:, k]) - auroc(labels[:, k], old[:, k])) for k in range(14) if k != skip)


def test_partial_retrain_resolves_a_recall_collapse_and_leaves_other_rows_bit_identical():
    healthy = hand_set_bundle()
    broken = healthy.copy()
    with torch.no_grad():  # a collapsed row: shrunk weights and a shifted bias
        broken.model.classifier.weight[EFF] *= 0.3
        broken.model.classifier.bias[EFF] -= 1.0
    fit, _ = synthetic_features(broken, seed=0, prefix="f")
    verify, _ = synthetic_features(broken, seed=1, prefix="v")
    y = verify.labels[:, EFF]
    assert confusion_at(y, sigmoid(verify.logits[:, EFF]), 0.5)["sensitivity"] < 0.1
    fact = IssueFact(kind="recall_collapse", monitor="recall_collapse", label="Effusion", severity="high", message="x")
    result = get_intervention("partial_retrain").apply(ctx_for(broken, fact, fit))
    new = head_logits(result.bundle, verify.features)
    old = head_logits(broken, verify.features)
    after = confusion_at(y, sigmoid(new[:, EFF]), result.bundle.meta.thresholds[EFF])
    assert after["sensitivity"] >= 0.9 and after["specificity"] >= 0.9
    others = [k for k in range(14) if k != EFF]
    assert np.array_equal(new[:, others], old[:, others])
    assert result.changes["per_label"][0]["retrained"]
    assert result.bundle.meta.history[-1]["op"] == "retrain_classifier_rows"


def test_partial_retrain_dissolves_a_planted_fp_cluster(shortcut):
    bundle, fit, cluster, verify, v_cluster = shortcut
    result = get_intervention("partial_retrain").apply(ctx_for(bundle, fp_fact(fit, cluster), fit))
    thr_old, thr_new = bundle.meta.thresholds[PTX], result.bundle.meta.thresholds[PTX]
    p_old = sigmoid(head_logits(bundle, verify.features)[:, PTX])
    p_new = sigmoid(head_logits(result.bundle, verify.features)[:, PTX])
    y = verify.labels[:, PTX]
    assert (p_new[v_cluster] >= thr_new).sum() <= 0.5 * (p_old[v_cluster] >= thr_old).sum()
    assert confusion_at(y, p_new, thr_new)["sensitivity"] >= confusion_at(y, p_old, thr_old)["sensitivity"] - 0.05


def test_partial_retrain_restores_ranking_after_an_auroc_drop():
    healthy = hand_set_bundle()
    broken = healthy.copy()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        broken.model.classifier.weight[EFF] = torch.from_numpy(rng.normal(0, 1.0, 32)).float()
    fit, _ = synthetic_features(broken, seed=0, prefix="f")
    verify, _ = synthetic_features(broken, seed=1, prefix="v")
    y = verify.labels[:, EFF]
    before = auroc(y, verify.logits[:, EFF])
    fact = IssueFact(kind="auroc_drop", monitor="auroc_drop", label="Effusion", severity="high", message="x")
    result = get_intervention("partial_retrain").apply(ctx_for(broken, fact, fit))
    after = auroc(y, head_logits(result.bundle, verify.features)[:, EFF])
    assert before < 0.8 and after > 0.95


def test_partial_retrain_scope_all_keeps_collateral_small(shortcut):
    bundle, fit, cluster, verify, _ = shortcut
    result = get_intervention("partial_retrain").apply(ctx_for(bundle, fp_fact(fit, cluster), fit,
                                                               params={"scope": "all"}))
    old = head_logits(bundle, verify.features)
    new = head_logits(result.bundle, verify.features)
    assert _other_auroc_change(verify.labels, old, new, PTX) <= 0.01
    assert len(result.changes["rows"]) == 14


def test_partial_retrain_l2_pull_keeps_weights_near_init(shortcut):
    bundle, fit, *_ = shortcut
    x, y = fit.features.astype(float), fit.labels[:, [PTX]].astype(float)
    w0 = bundle.model.classifier.weight.detach().double().numpy()[[PTX]]
    b0 = bundle.model.classifier.bias.detach().double().numpy()[[PTX]]
    kw = dict(sample_weight=np.ones_like(y), active=np.array([True]), max_iter=200)
    w_strong, _ = fit_head(x, y, w0, b0, l2=np.array([1e4]), **kw)
    w_weak, _ = fit_head(x, y, w0, b0, l2=np.array([1e-3]), **kw)
    assert np.linalg.norm(w_strong - w0) < 0.01 < np.linalg.norm(w_weak - w0)
    w_same, b_same = fit_head(x, y, w0, b0, l2=np.array([1e-3]), sample_weight=np.ones_like(y),
                              active=np.array([False]), max_iter=200)
    assert np.array_equal(w_same, w0) and np.array_equal(b_same, b0)


def test_patient_folds_keep_a_patient_in_one_fold():
    pids = np.array(["a", "a", "b", "c", "c", "c", "d", "e"], dtype=object)
    folds = patient_folds(pids, 3, seed=0)
    for p in set(pids):
        assert len(set(folds[pids == p])) == 1
    assert np.array_equal(folds, patient_folds(pids, 3, seed=0))


def test_partial_retrain_not_applicable_with_few_positives(shortcut):
    bundle, fit, *_ = shortcut
    fact = IssueFact(kind="recall_collapse", monitor="r", label="Effusion", severity="high", message="x")
    few = fit.subset(np.r_[np.flatnonzero(fit.labels[:, EFF] == 1)[:4], np.flatnonzero(fit.labels[:, EFF] == 0)])
    ok, why = get_intervention("partial_retrain").applicable(ctx_for(bundle, fact, few))
    assert not ok and "min_positives" in why and "4 positive" in why
    ok, why = get_intervention("partial_retrain").applicable(ctx_for(bundle, fact, few, params={"scope": "none"}))
    assert not ok and why == ("partial_retrain parameters: ==> At key: scope: must be one of 'label' or 'all', "
                              "got 'none'")


# --------------------------------------------------------------------------------------------
# augmentation and full_retrain (tiny DenseNet on PNGs)


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    root = write_nih_dataset(tmp_path_factory.mktemp("aug") / "ds", random_rows(96, seed=4, n_patients=48), size=32)
    dataset = load_nih_dataset(root)
    torch.manual_seed(0)
    bundle = new_bundle(tiny_densenet().eval(), config=arch_config("tiny"), input_size=32)
    return bundle, dataset


def _image_ctx(image_setup, kind: str, label: str = "Effusion", **kw) -> TreatmentContext:
    bundle, dataset = image_setup
    fit = extract_features(bundle, dataset, use_cache=False)
    fact = IssueFact(kind=kind, monitor=kind, label=label, severity="high", message="x")
    return TreatmentContext(bundle=bundle, fact=fact, fit=fit, fit_dataset=dataset, **kw)


def test_counterfactuals_carry_the_injectors_tube_as_a_thin_curve():
    """Augmentation draws the fault injector's own tube (one drawer for injection and treatment)."""
    from PIL import Image

    from model.data.faults import draw_tube

    img = np.full((64, 64), 0.3, dtype=np.float32)
    out = _draw_tube_grey(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.max() > 0.9
    changed = (out - img) > 0.05
    assert 0.01 < changed.mean() < 0.15  # a line, not a blob
    im = Image.fromarray(np.round(img * 255.0).astype(np.uint8), mode="L")
    draw_tube(im, np.random.default_rng(0))
    assert np.array_equal(out, np.asarray(im, dtype=np.float32) / 255.0)


def test_intensity_jitter_is_deterministic_and_changes_intensity(image_setup):
    bundle, _ = image_setup
    aug = intensity_jitter(bundle.meta)
    x = torch.zeros(4, 3, 16, 16)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape


@pytest.mark.parametrize("kind", ["fp_cluster", "calibration_drift"])
def test_augmentation_changes_only_the_top_of_the_backbone(image_setup, kind):
    ctx = _image_ctx(image_setup, kind, params={"epochs": 1})
    plugin = get_intervention("augmentation")
    assert plugin.applicable(ctx)[0]
    result = plugin.apply(ctx)
    old, new = ctx.bundle.model.state_dict(), result.bundle.model.state_dict()
    top = ("features.denseblock4", "features.norm5", "classifier")
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith(top))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith(top))
    rec = result.bundle.meta.history[-1]
    assert rec["op"] == "fine_tune" and rec["mode"] == ("shortcut" if kind == "fp_cluster" else "intensity")
    assert rec["result_weights_hash"] == result.bundle.weights_hash()
    assert not result.classifier_only
    if kind == "fp_cluster":
        assert rec["counterfactual"]["n"] > 0 and rec["counterfactual"]["label"] == "Effusion"


def test_augmentation_refuses_when_nothing_matches_the_trainable_prefixes(image_setup):
    ctx = _image_ctx(image_setup, "calibration_drift", params={"trainable": ["backbone.head"]})
    ok, why = get_intervention("augmentation").applicable(ctx)
    assert not ok and "backbone.head" in why


def test_full_retrain_records_a_replayable_recipe(image_setup, tmp_path):
    ctx = _image_ctx(image_setup, "auroc_drop", params={"epochs": 1})
    result = get_intervention("full_retrain").apply(ctx)
    rec = result.bundle.meta.history[-1]
    assert rec["op"] == "full_retrain" and rec["preset"] == "tiny" and rec["seed"] == 0
    assert rec["data_manifest_hash"] == ctx.fit_dataset.manifest_hash()
    assert result.bundle.meta.parent_hash == ctx.bundle.content_hash()
    assert result.bundle.meta.train_manifest_hash == ctx.fit_dataset.manifest_hash()
    # The saved bundle round-trips with its history.
    save_bundle(result.bundle, tmp_path / "m.safetensors")
    assert load_bundle(tmp_path / "m.safetensors").meta.history[-1] == json.loads(json.dumps(rec))


def test_full_retrain_preset_for_compressed_bundles(image_setup):
    bundle, _ = image_setup
    assert preset_of(bundle) == ("tiny", "the bundle's architecture config")
    pruned = bundle.with_meta(arch="pruned_densenet", arch_config={"stem": 16})
    name, why = preset_of(pruned)
    assert name is None and "pruned_densenet" in why and "preset" in why
    assert preset_of(pruned, parent=bundle)[0] == "tiny"
    noted = pruned.with_meta(notes={"training": {"preset": "small"}})
    assert preset_of(noted)[0] == "small"
    fact = IssueFact(kind="auroc_drop", monitor="a", label="Effusion", severity="high", message="x")
    fit = extract_features(bundle, image_setup[1], use_cache=False)
    ok, why = get_intervention("full_retrain").applicable(
        TreatmentContext(bundle=pruned, fact=fact, fit=fit, fit_dataset=image_setup[1]))
    assert not ok and "cannot tell which architecture" in why


# --------------------------------------------------------------------------------------------
# A shortcut world on images: a tube means "Effusion" in training, and nothing else does


def _tube_world(root, n: int, seed: int, tube_rule) -> tuple:
    """Flat grey 32-px images; Effusion labels at random; tubes (the injector's) where ``tube_rule`` says."""
    from PIL import Image

    from model.data.faults import draw_tube as inject_tube

    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    rows = [(f"{seed:02d}{i:06d}_000.png", "Effusion" if y[i] else "No Finding", seed * 10000 + i) for i in range(n)]
    write_nih_dataset(root, rows, size=32, seed=seed)
    tubes = tube_rule(y, rng)
    for i, (name, _, _) in enumerate(rows):
        img = np.clip(0.4 + 0.05 * rng.standard_normal((32, 32)), 0, 1)
        im = Image.fromarray((img * 255).astype(np.uint8), mode="L")
        if tubes[i]:
            inject_tube(im, rng)
        im.save(root / "images" / name)
    return load_nih_dataset(root), tubes, y


@pytest.fixture(scope="module")
def tube_world(tmp_path_factory):
    from model.train import train_bundle

    tmp = tmp_path_factory.mktemp("tubes")
    train, _, _ = _tube_world(tmp / "train", 200, 1, lambda y, r: y.copy())  # tube <=> positive
    verify, tubes, y = _tube_world(tmp / "verify", 120, 3, lambda y, r: ~y & (r.random(len(y)) < 0.5))
    bundle, _ = train_bundle(train, preset="tiny", image_size=32, epochs=15, seed=0, augment=False, lr=1e-2,
                             device="cpu")
    fact = IssueFact(kind="fp_cluster", monitor="fp_cluster", label="Effusion", severity="high",
                     message="tubes", evidence={"channels": [0]})
    return bundle, verify, tubes, y, fact, tmp


def _tube_gap(bundle, verify, tubes, y) -> float:
    """Mean Effusion logit of tubed negatives minus that of clean negatives: the shortcut's push."""
    z = extract_features(bundle, verify, use_cache=False).logits[:, EFF]
    return float(z[tubes & ~y].mean() - z[~tubes & ~y].mean())


def test_counterfactual_augmentation_unlearns_the_tube(tube_world):
    bundle, verify, tubes, y, fact, tmp = tube_world
    # The audit's fit split has no tubes at all: only the counterfactuals can teach "tube != Effusion".
    fit_ds, _, _ = _tube_world(tmp / "fit", 120, 2, lambda y, r: np.zeros_like(y))
    fit = extract_features(bundle, fit_ds, use_cache=False)
    before = _tube_gap(bundle, verify, tubes, y)
    gaps = {}
    for mode in ("shortcut", "intensity"):
        ctx = TreatmentContext(bundle=bundle, fact=fact, fit=fit, fit_dataset=fit_ds, seed=0,
                               params={"mode": mode, "epochs": 6, "lr": 1e-2, "patience": 20})
        gaps[mode] = _tube_gap(get_intervention("augmentation").apply(ctx).bundle, verify, tubes, y)
    assert before > 0.5  # the model did learn the shortcut
    assert gaps["shortcut"] < 0.6 * before  # counterfactual negatives remove most of the tube's push
    assert gaps["shortcut"] < gaps["intensity"] - 0.1  # ... and it is the counterfactuals that do it


def test_full_retrain_on_audit_data_drops_the_shortcut(tube_world):
    bundle, verify, tubes, y, _, tmp = tube_world
    # Audit data where tubes sit on negatives: a model retrained on it has no reason to like tubes.
    fit_ds, _, _ = _tube_world(tmp / "fit_tubed", 160, 4, lambda y, r: ~y & (r.random(len(y)) < 0.5))
    fit = extract_features(bundle, fit_ds, use_cache=False)
    fact = IssueFact(kind="fp_cluster", monitor="fp_cluster", label="Effusion", severity="high", message="tubes",
                     evidence={"channels": [0]})
    ctx = TreatmentContext(bundle=bundle, fact=fact, fit=fit, fit_dataset=fit_ds, seed=0,
                           params={"epochs": 8, "lr": 1e-2, "augment": False, "patience": 20})
    before = _tube_gap(bundle, verify, tubes, y)
    after = _tube_gap(get_intervention("full_retrain").apply(ctx).bundle, verify, tubes, y)
    assert before > 0.5 and after < 0.0
