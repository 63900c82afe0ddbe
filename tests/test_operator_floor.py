"""bench/operator_floor.py: a skeleton runs the same operators as its model, on one channel each."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import DenseNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from operator_floor import floor_breakdown, skeleton  # noqa: E402

from model.nets.pruned import PrunedDenseNet, from_densenet  # noqa: E402


def _small_densenet() -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2, num_classes=3).eval()


def _pruned() -> PrunedDenseNet:
    # Block 1 (input 8): layer 1 reads a prefix, layer 2 a gather, layer 3 removed; block 2 gathers.
    return PrunedDenseNet({
        "in_channels": 3, "num_classes": 3, "stem": 8,
        "blocks": [{"layers": [{"i": "0-7", "m": 6, "o": 4}, {"i": "0,2,5-11", "m": 5, "o": 3},
                               {"i": "", "m": 0, "o": 0}]},
                   {"layers": [{"i": "1-5", "m": 4, "o": 4}, {"i": "0,6-9", "m": 4, "o": 2}]}],
        "transitions": [{"i": "0-3,9-14", "o": 6}],
        "head": "0,3-11",
    }).eval()


def _operators(model: nn.Module, size: int = 32) -> Counter:
    """Operator name -> calls in one inference forward pass (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize("build", [_small_densenet, lambda: from_densenet(_small_densenet()).eval(), _pruned])
def test_skeleton_runs_the_same_operators_on_one_channel(build) -> None:
    model = build()
    skel = skeleton(model)
    assert _operators(skel) == _operators(model)
    layer_convs = [m for n, m in skel.named_modules() if n.endswith(("conv1", "conv2"))]
    assert layer_convs and all(c.out_channels == 1 for c in layer_convs)
    if isinstance(skel, PrunedDenseNet):  # block inputs two channels wide (torchvision's transitions halve)
        assert all(c.out_channels <= 2 for c in skel.modules() if isinstance(c, nn.Conv2d))
    assert skel(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_skeleton_keeps_removed_layers_removed_and_gathers_gathering() -> None:
    model, skel = _pruned(), skeleton(_pruned())
    assert [list(b) for b in skel.blocks()] == [list(b) for b in model.blocks()]
    for blk, sblk in zip(model.blocks(), skel.blocks()):
        assert [layer.norm1.prefix for layer in blk.values()] == [layer.norm1.prefix for layer in sblk.values()]
    assert [t.norm.prefix for t in skel.transitions()] == [t.norm.prefix for t in model.transitions()]


def test_floor_breakdown_separates_overhead_from_arithmetic() -> None:
    out = floor_breakdown({"parent": 0.010, "small": 0.007}, {"parent": 0.004, "small": 0.005})
    assert out["parent"]["arithmetic_s"] == pytest.approx(0.006)
    assert out["small"]["arithmetic_speedup"] == pytest.approx(3.0)
    assert out["small"]["speedup"] == pytest.approx(10 / 7)
    # x1.3 needs the whole pass at 7.69 ms: 2.69 ms of arithmetic after a 5 ms floor
    assert out["small"]["needed_arithmetic_speedup_for_1.3"] == pytest.approx(0.006 / (0.010 / 1.3 - 0.005))
    # a floor above parent / 1.3 makes x1.3 unreachable for any pruning
    assert floor_breakdown({"parent": 0.010, "m": 0.009}, {"parent": 0.004, "m": 0.008})["m"][
        "needed_arithmetic_speedup_for_1.3"] is None


def test_skeleton_refuses_other_networks() -> None:
    with pytest.raises(TypeError, match="no skeleton for Linear"):
        skeleton(nn.Linear(2, 2))
