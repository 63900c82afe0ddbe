"""``f_reopt``: re-fitting a compressed model to its parent on shifted data restores fidelity.

Compress a tiny DenseNet on one image distribution, shift the distribution (contrast and
brightness), then re-fit on shifted images: the deviation from the parent on *held-out* shifted
images must drop. The plugin must refuse clearly without a parent, without a compression history,
with the wrong parent, or on an uncompressed model.
"""

from __future__ import annotations

import pytest
import torch

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from interventions.base import TreatmentContext
from interventions.registry import get_intervention
from model.bundle import Bundle
from model.compression import CompressSettings, compress_bundle
from model.compression.accepted import accepted_fidelity
from model.data import load_nih_dataset, read_images
from model.features import FeatureSet, compute_features, to_model_input
from test_compress import tiny_bundle, write_textures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FACT = IssueFact(kind="compression_fidelity", monitor="compression_fidelity", severity="high",
                 message="compressed model drifted from its parent")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("freopt")
    parent = tiny_bundle(seed=4)
    source = load_nih_dataset(write_textures(root / "a", 200, seed=11), "all")
    comp = compress_bundle(parent, source, CompressSettings(target_reduction=0.5, max_auroc_drop=None, max_flip_rate=None, views=2),
                           speed=False).bundle
    shifted = write_textures(root / "b", 240, seed=12, gain=0.3, offset=0.65, n_test=60)
    return parent, comp, load_nih_dataset(shifted, "train_val"), load_nih_dataset(shifted, "test")


def _ctx(bundle: Bundle, dataset, parent: Bundle | None, params: dict | None = None) -> TreatmentContext:
    _, images = read_images(dataset, bundle.meta.input_size)
    feats, logits = compute_features(bundle, images)
    fit = FeatureSet(tuple(dataset.image_names), dataset.patient_ids, dataset.labels, feats, logits,
                     bundle.weights_hash(), dataset.manifest_hash())
    return TreatmentContext(bundle=bundle, fact=FACT, fit=fit, fit_dataset=dataset, params=params or {},
                            seed=0, parent=parent)


def _dev(a: Bundle, b: Bundle, dataset) -> tuple[float, float]:
    """(max, mean) |Δlogit| between two bundles on a dataset's images."""
    _, images = read_images(dataset, a.meta.input_size)
    x = to_model_input(images, a.meta)
    with torch.no_grad():
        d = (a.model.eval()(x) - b.model.eval()(x)).abs()
    return float(d.max()), float(d.mean())


def test_f_reopt_restores_fidelity_on_held_out_shifted_images(world):
    parent, comp, shifted_fit, shifted_test = world
    before = _dev(comp, parent, shifted_test)
    result = get_intervention("f_reopt").apply(_ctx(comp, shifted_fit, parent))
    after = _dev(result.bundle, parent, shifted_test)
    assert after[0] < 0.8 * before[0] and after[1] < 0.6 * before[1], (before, after)
    assert not result.classifier_only
    assert result.bundle.meta.arch_config == comp.meta.arch_config  # same architecture, new weights
    assert result.bundle.meta.parent_hash == comp.content_hash()
    entry = result.bundle.meta.history[-1]
    assert entry["op"] == "f_reopt" and entry["parent_hash"] == parent.content_hash()
    assert entry["calibration"]["manifest_hash"] == shifted_fit.manifest_hash()
    assert result.fit_metrics["max_abs_dlogit_after"] < result.fit_metrics["max_abs_dlogit_before"]
    # the accepted fidelity stays the standard the verify split judges the re-fit against
    assert accepted_fidelity(result.bundle) == accepted_fidelity(comp) is not None
    # ... and it can be applied again (the newest entry carries the plan)
    again = get_intervention("f_reopt").apply(_ctx(result.bundle, shifted_fit, parent))
    assert _dev(again.bundle, result.bundle, shifted_test)[0] < 1e-4


def test_f_reopt_refuses_without_parent(world):
    _, comp, shifted_fit, _ = world
    plugin = get_intervention("f_reopt")
    ok, why = plugin.applicable(_ctx(comp, shifted_fit, None))
    assert not ok and "parent" in why
    with pytest.raises(InterventionError, match="needs the uncompressed parent"):
        plugin.apply(_ctx(comp, shifted_fit, None))


def test_f_reopt_refuses_without_history_or_wrong_parent(world):
    parent, comp, shifted_fit, _ = world
    plugin = get_intervention("f_reopt")
    bare = comp.with_meta(history=[])
    ok, why = plugin.applicable(_ctx(bare, shifted_fit, parent))
    assert not ok and "history" in why
    ok, why = plugin.applicable(_ctx(comp, shifted_fit, tiny_bundle(seed=5)))
    assert not ok and "compressed from" in why
    ok, why = plugin.applicable(_ctx(parent, shifted_fit, parent))
    assert not ok and "densenet_pruned" in why
    ok, why = plugin.applicable(_ctx(comp, shifted_fit, parent, params={"epochs": 3}))
    assert not ok and why == "f_reopt parameters: ==> At key: epochs: unknown key (expected one of: views)"
    ok, why = plugin.applicable(_ctx(comp, shifted_fit, parent, params={"views": 0}))
    assert not ok and why == "f_reopt parameters: ==> At key: views: must be an integer >= 1, got 0"
