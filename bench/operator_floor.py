"""The operator floor: what a network's forward pass costs with (next to) no arithmetic left in it.

At 64 px and batch 1 a DenseNet121 forward pass is some 2,900 operator calls on maps of 16x16 px
and smaller, so much of its time is per-call overhead (dispatch, allocation, oneDNN/THNN setup)
that no channel pruning removes. To tell that part from the arithmetic the network is rebuilt as a
*skeleton*: the same modules in the same order, one channel per dense layer and two per block
input, every consumer still gathering (or slicing, or reading whole) its inputs the way the real
one does. Its time is the floor; the real time less the floor is the arithmetic (and memory
traffic) that pruning can cut. Used by ``bench/bench_compress.py``, whose speed table it explains::

    floor = skeleton(model)            # same operator graph, (next to) no channels
    t = measure_speeds({"m": model, "floor": floor}, 64, 3, batch=1)
    arithmetic = t["m"] - t["floor"]
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import DenseNet

from model.nets.pruned import PrunedDenseNet, SubsetBatchNorm2d, encode_index

__all__ = ["floor_breakdown", "skeleton"]


def _skeleton_index(index: SubsetBatchNorm2d, width: int) -> str:
    """Read the way ``index`` reads: all channels stays all (no copy), a shorter prefix a slice of
    one channel, a gather a gather of one channel (where the skeleton has two to choose from)."""
    if index.prefix and index.num_features == index.in_width:
        return encode_index(range(width))
    return encode_index([0] if index.prefix else [width - 1])


def _pruned_skeleton(net: PrunedDenseNet) -> PrunedDenseNet:
    cfg: dict[str, Any] = {"in_channels": net.config["in_channels"], "num_classes": net.config["num_classes"],
                           "stem": 2, "blocks": [], "transitions": []}
    width = 2  # block inputs are two channels wide, so a block's first gather still has one to pick
    transitions = net.transitions()
    for b, blk in enumerate(net.blocks()):
        layers, pos = [], width
        for j in range(len(net.config["blocks"][b]["layers"])):
            name = f"denselayer{j + 1}"
            if name not in blk:  # a removed layer is no module at all: keep it removed
                layers.append({"i": "", "m": 0, "o": 0})
                continue
            layers.append({"i": _skeleton_index(blk[name].norm1, pos), "m": 1, "o": 1})
            pos += 1
        cfg["blocks"].append({"layers": layers})
        if b < len(transitions):
            cfg["transitions"].append({"i": _skeleton_index(transitions[b].norm, pos), "o": 2})
            width = 2
        else:
            width = pos
    cfg["head"] = _skeleton_index(net.features.norm5, width)
    return PrunedDenseNet(cfg)


def skeleton(model: nn.Module) -> nn.Module:
    """``model``'s operator graph with (next to) no channels: a pruned DenseNet's skeleton has one per
    dense layer and two per block input; a torchvision DenseNet's growth rate and stem are 1."""
    if isinstance(model, PrunedDenseNet):
        out: nn.Module = _pruned_skeleton(model)
    elif isinstance(model, DenseNet):
        blocks = [len(m) for n, m in model.features.named_children() if n.startswith("denseblock")]
        out = DenseNet(growth_rate=1, block_config=tuple(blocks), num_init_features=1, bn_size=1,
                       num_classes=model.classifier.out_features)
    else:
        raise TypeError(f"no skeleton for {type(model).__name__}: expected a DenseNet or a PrunedDenseNet")
    return out.eval()


def floor_breakdown(times: dict[str, float], floors: dict[str, float], parent: str = "parent") -> dict[str, Any]:
    """Per model: time, floor, arithmetic part (time - floor) and the speed-ups of time and arithmetic.

    ``needed_arithmetic_speedup_for_1.3`` is how much faster the arithmetic would have to run for the
    whole pass to be x1.3 faster than the parent with this model's floor (None: the floor alone
    already exceeds parent/1.3, so no pruning can get there).
    """
    out: dict[str, Any] = {}
    t_p, a_p = times[parent], times[parent] - floors[parent]
    for name, t in times.items():
        f = floors[name]
        a = t - f
        room = t_p / 1.3 - f
        out[name] = {"time_s": t, "floor_s": f, "floor_share": f / t if t > 0 else None, "arithmetic_s": a,
                     "speedup": t_p / t if t > 0 else None,
                     "arithmetic_speedup": a_p / a if a > 0 else None,
                     "needed_arithmetic_speedup_for_1.3": a_p / room if room > 0 else None}
    return out
