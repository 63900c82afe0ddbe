"""Augmentation's resolution mode: the sharpness estimate, the matched jitter, and the plugin on a tiny model.

The blur fault (``model.data.faults.apply_blur``) is what the mode answers, so the estimate is checked
against it: known blurs of step edges are read back, and phantoms blurred by the fault read blurrier
than the same phantoms unblurred.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_rows, write_nih_dataset

from engine.core.facts import IssueFact
from interventions.base import TreatmentContext
from interventions.registry import get_intervention
from interventions.resolution import (
    down_up,
    jitter_range,
    matched_factor,
    resolution_jitter,
)
from model.bundle import new_bundle
from model.data import load_nih_dataset
from model.data.faults import apply_blur
from model.data.phantom import render_phantom
from model.data.sharpness import image_blur_sigma, measure_sharpness
from model.features import extract_features
from model.nets import arch_config, tiny_densenet


def squares(width: int = 64, seed: int = 0) -> np.ndarray:
    """Grey squares on black: step edges in both directions, with room between them."""
    rng = np.random.default_rng(seed)
    img = np.zeros((width, width))
    for _ in range(8):
        x, y = rng.integers(0, width - width // 5, 2)
        img[y : y + width // 5, x : x + width // 5] = rng.uniform(0.3, 1.0)
    return img


@pytest.mark.parametrize("sigma", [0.75, 1.5, 3.0])
def test_a_known_blur_of_step_edges_is_read_back_within_10_percent(sigma):
    assert image_blur_sigma(apply_blur(squares(), sigma)) == pytest.approx(sigma, rel=0.10)
    assert image_blur_sigma(apply_blur(squares(128), sigma)) == pytest.approx(sigma, rel=0.10)  # 64-px units


def test_phantoms_blurred_by_the_fault_read_blurrier_than_the_same_phantoms():
    rng = np.random.default_rng(0)
    sharp = np.stack([render_phantom(np.zeros(14, int), 64, rng) for _ in range(6)]).astype(np.float64) / 255.0
    blurred = np.stack([apply_blur(im, 1.5) for im in sharp])
    a, b = measure_sharpness(sharp), measure_sharpness(blurred)
    assert all(x < y for x, y in zip(a.sigmas64, b.sigmas64, strict=True))  # every image, not just on average
    assert a.quantile(0.9) < 1.0 and 1.3 < b.quantile(0.5) < 2.0  # in quadrature with the rendering's own ~0.5
    rec = b.record()
    assert rec["n_images"] == 6 and rec["n_without_edges"] == 0 and "re-blur gradient ratio" in rec["method"]


def test_a_set_without_edges_says_it_cannot_be_measured():
    m = measure_sharpness(np.full((3, 32, 32), 0.4))
    assert m.quantile(0.9) is None and m.record()["sigma64_median"] is None and m.record()["n_without_edges"] == 3


def test_down_up_factor_is_matched_to_the_blur():
    assert torch.equal(down_up(torch.ones(1, 1, 8, 8), 1.0), torch.ones(1, 1, 8, 8))
    f1, f2 = matched_factor(1.0, 64), matched_factor(2.0, 64)
    assert 1.0 < f1 < f2
    edge = torch.zeros(1, 1, 9, 64)
    edge[..., 32:] = 1.0
    assert image_blur_sigma(down_up(edge, f2)[0, 0].numpy()) >= 1.5
    sigma_max, factor_max = jitter_range(0.1, 32, 1.0)
    assert sigma_max == 2.0 and factor_max > 1.0  # never under one pixel: the estimate does not resolve less


def test_resolution_jitter_is_deterministic_and_only_blurs():
    aug = resolution_jitter(2.0, matched_factor(2.0, 32))
    x = torch.from_numpy(np.stack([squares(32, s) for s in range(8)])).float().unsqueeze(1).repeat(1, 3, 1, 1)
    a = aug(x.clone(), torch.Generator().manual_seed(3))
    b = aug(x.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    before = measure_sharpness(x[:, 0].numpy()).sigmas64
    after = measure_sharpness(a[:, 0].numpy()).sigmas64
    assert np.median(after) > np.median(before)


# -- the plugin -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    root = write_nih_dataset(tmp_path_factory.mktemp("res") / "ds", random_rows(64, seed=5, n_patients=32), size=32)
    torch.manual_seed(0)
    return new_bundle(tiny_densenet().eval(), config=arch_config("tiny"), input_size=32), load_nih_dataset(root)


def _ctx(image_setup, kind: str, **params) -> TreatmentContext:
    bundle, dataset = image_setup
    fact = IssueFact(kind=kind, monitor=kind, label="Pneumothorax", severity="high", message="x")
    return TreatmentContext(bundle=bundle, fact=fact, fit=extract_features(bundle, dataset, use_cache=False),
                            fit_dataset=dataset, params={"epochs": 1, **params}, seed=3)


def test_resolution_mode_runs_is_deterministic_and_records_its_sharpness(image_setup):
    ctx = _ctx(image_setup, "recall_collapse")
    plugin = get_intervention("augmentation")
    ok, why = plugin.applicable(ctx)
    assert ok and "augmentation (resolution)" in why
    before = {k: v.clone() for k, v in ctx.bundle.model.state_dict().items()}
    first, second = plugin.apply(ctx), get_intervention("augmentation").apply(ctx)
    assert all(torch.equal(before[k], v) for k, v in ctx.bundle.model.state_dict().items())  # input untouched
    assert first.bundle.content_hash() == second.bundle.content_hash()
    assert first.changes == second.changes
    changes = first.changes
    assert changes["mode"] == "resolution" and first.bundle.meta.history[-1]["mode"] == "resolution"
    sharp, jitter = changes["sharpness"], changes["jitter"]
    assert sharp["n_images"] == len(ctx.fit_dataset) and sharp["sigma64_q90"] is not None
    assert jitter["blur_sigma64"][0] == 0.0 and jitter["blur_sigma64"][1] >= sharp["sigma64_q90"]
    assert jitter["down_up_factor"][0] == 1.0 and jitter["down_up_factor"][1] > 1.0
    assert jitter["blur"] == "model.data.faults.apply_blur"


@pytest.mark.parametrize(("kind", "mode"), [("auroc_drop", "resolution"), ("calibration_drift", "intensity"),
                                            ("fp_cluster", "shortcut")])
def test_auto_mode_follows_the_issue_kind(image_setup, kind, mode):
    ok, why = get_intervention("augmentation").applicable(_ctx(image_setup, kind))
    assert ok and f"augmentation ({mode})" in why


def test_applicable_says_why_for_a_kind_it_does_not_treat(image_setup):
    ok, why = get_intervention("augmentation").applicable(_ctx(image_setup, "compression_fidelity"))
    assert not ok
    assert why == ("augmentation does not treat compression_fidelity "
                   "(it treats calibration_drift, fp_cluster, recall_collapse, auroc_drop)")
