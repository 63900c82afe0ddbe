"""Forward passes through a pruned DenseNet that the walk needs, and where it samples them.

The walk fits one consumer at a time, so it runs the network piecewise: the stem, one block and
its transition, the rest from a block's input to the logits. The original network's pass over
all calibration inputs also records each consumer's input ranges (what the exact stage calls dead
or constant), and a backward pass gives every re-fitted output's logit sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import DataError
from model.compression.calibration import Calibration
from model.compression.settings import CompressSettings
from model.nets.pruned import PrunedDenseNet

__all__ = [
    "Samples",
    "spatial_sizes",
    "sample_positions",
    "check_problem_sizes",
    "logits_from_block",
    "stem_output",
    "through_transition",
    "consumer_names",
    "logit_sensitivities",
    "original_pass",
]

#: Per block: the sampled fit images, their positions for 1x1 problems, the first of those for 3x3.
Samples = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def spatial_sizes(input_size: int, n_blocks: int) -> list[int]:
    h = (input_size + 2 * 3 - 7) // 2 + 1
    h = (h + 2 * 1 - 3) // 2 + 1
    sizes = [h]
    for _ in range(n_blocks - 1):
        h //= 2
        sizes.append(h)
    return sizes


def sample_positions(parent: PrunedDenseNet, n_fit: int, input_size: int, settings: CompressSettings) -> Samples:
    """The images and spatial positions each block's least-squares problems are sampled at.

    Seeded per block (``seed * 1000 + block``), so every walk over the same network and settings
    samples the same rows; the number of images is capped by the memory allowance.
    """
    out = []
    for b, s in enumerate(spatial_sizes(input_size, len(parent.blocks()))):
        hw = s * s
        n_b = min(n_fit, max(256, math.ceil(settings.positions / hw)))
        width = parent.blocks()[b].out_width
        cap = max(32, int(settings.memory_mb * 2**20 // (2 * 4 * width * hw * 3)))
        n_b = min(n_b, max(cap, 1))
        gen = torch.Generator().manual_seed(settings.seed * 1000 + b)
        imgs = torch.sort(torch.randperm(n_fit, generator=gen)[:n_b]).values
        q1 = min(hw, max(1, math.ceil(settings.positions / n_b)))
        q2 = min(q1, max(1, math.ceil(settings.positions_3x3 / n_b)))
        pos = torch.stack([torch.randperm(hw, generator=gen)[:q1] for _ in range(n_b)])
        out.append((imgs, pos, pos[:, :q2].contiguous()))
    return out


def check_problem_sizes(net: PrunedDenseNet, calib: Calibration, samples: Samples) -> None:
    """The least-squares problems must have more samples than unknowns; say which one does not."""
    problems = []
    n_fit = calib.fit.shape[0]
    for b, blk in enumerate(net.blocks()):
        imgs, pos1, pos2 = samples[b]
        n1 = pos1.numel()
        n2 = pos2.numel()
        for lname, layer in blk.items():
            if n1 < layer.norm1.num_features + 1:
                problems.append(f"denseblock{b + 1}.{lname}: {layer.norm1.num_features + 1} unknowns, {n1} samples")
            if n2 < 9 * layer.conv1.out_channels + 1:
                problems.append(f"denseblock{b + 1}.{lname} (3x3): {9 * layer.conv1.out_channels + 1} unknowns, "
                                f"{n2} samples")
        if b < len(net.blocks()) - 1:
            t = net.transitions()[b]
            if n1 < t.norm.num_features + 1:
                problems.append(f"transition{b + 1}: {t.norm.num_features + 1} unknowns, {n1} samples")
    head = net.features.norm5.num_features + 1
    n_head = samples[-1][0].numel()
    if n_head < head:
        problems.append(f"head: {head} unknowns, {n_head} samples")
    if problems:
        need = math.ceil(head / max(calib.views, 1))
        raise DataError(
            f"calibration set too small for the least-squares reconstruction: {calib.n_images} fitted images x "
            f"{calib.views} views = {n_fit} inputs; " + "; ".join(problems[:4])
            + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
            + f". Use at least ~{need} calibration images (or more --views)."
        )


def logits_from_block(net: PrunedDenseNet, block: int, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``net`` given block ``block``'s input ``x`` (no grad, batched)."""
    outs = []
    names = [n for n, _ in net.features.named_children()]
    start = names.index(f"denseblock{block + 1}")
    with torch.no_grad():
        for s in range(0, x.shape[0], 64):
            h = x[s : s + 64]
            for name in names[start:]:
                h = getattr(net.features, name)(h)
            h = torch.flatten(F.adaptive_avg_pool2d(F.relu(h), 1), 1)
            outs.append(net.classifier(h))
    return torch.cat(outs) if outs else torch.zeros(0, net.classifier.out_features)


def stem_output(net: PrunedDenseNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = []
        for s in range(0, x.shape[0], 64):
            h = x[s : s + 64]
            for name in ("conv0", "norm0", "relu0", "pool0"):
                h = getattr(net.features, name)(h)
            out.append(h)
        return torch.cat(out)


def through_transition(net: PrunedDenseNet, b: int, x: torch.Tensor) -> torch.Tensor:
    blk = getattr(net.features, f"denseblock{b + 1}")
    tr = getattr(net.features, f"transition{b + 1}")
    with torch.no_grad():
        return torch.cat([tr(blk(x[s : s + 64])) for s in range(0, x.shape[0], 64)])


def consumer_names(net: PrunedDenseNet) -> list[str]:
    """Consumers in network order: ``denseblockB.denselayerL``, ``transitionB``, ``head``."""
    names = []
    for b, blk in enumerate(net.blocks()):
        names.extend(f"denseblock{b + 1}.{lname}" for lname in blk)
        if b < len(net.blocks()) - 1:
            names.append(f"transition{b + 1}")
    names.append("head")
    return names


def _consumer_modules(net: PrunedDenseNet, layer_parts: tuple[tuple[str, str], ...],
                      transition_part: str) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for the given parts of every dense layer (attribute, name suffix), then the
    given part of every transition: where the passes hook in, in network order."""
    for b, blk in enumerate(net.blocks()):
        for lname, layer in blk.items():
            for attr, suffix in layer_parts:
                yield f"denseblock{b + 1}.{lname}{suffix}", getattr(layer, attr)
    for b, tr in enumerate(net.transitions()):
        yield f"transition{b + 1}", getattr(tr, transition_part)


def logit_sensitivities(net: PrunedDenseNet, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per-channel logit sensitivity of every re-fitted output: ``E_img sum_pos (d(r.logits)/d out)^2``.

    ``r`` is a standard normal vector per image, so the expectation over ``r`` is the squared
    Jacobian norm: an error ``e`` on that channel moves ``||Δlogits||^2`` by about ``s * e^2``.
    """
    acc: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fwd(_mod, _inp, out):
            def back(grad):
                v = (grad.detach() ** 2).sum(dim=(0, 2, 3))
                acc[name] = acc.get(name, 0) + v
            out.register_hook(back)
        return fwd

    for name, module in _consumer_modules(net, (("conv1", ".conv1"), ("conv2", ".conv2")), "conv"):
        handles.append(module.register_forward_hook(hook(name)))
    gen = torch.Generator().manual_seed(seed + 101)
    was = net.training
    net.eval()
    try:
        for s in range(0, x.shape[0], 32):
            xb = x[s : s + 32]
            with torch.enable_grad():
                logits = net(xb)
                r = torch.randn(logits.shape, generator=gen)
                (logits * r).sum().backward()
        net.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    n = max(1, x.shape[0])
    out = {k: (v / n).double() for k, v in acc.items()}
    out["head"] = torch.ones(net.classifier.out_features, dtype=torch.float64)
    return out


def original_pass(net: PrunedDenseNet, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Every block's input under the original network for all inputs ``x``, and per-channel ranges.

    The ranges (min and max of each consumer's post-BN-ReLU inputs over ALL calibration inputs)
    decide what the exact stage calls dead or constant; the least-squares problems only see a
    sample of positions.
    """
    acc: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str, pooled: bool = False):
        def fwd(_mod, _inp, out):
            a = F.relu(out)
            if pooled:
                a = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)
                lo, hi = a.amin(0), a.amax(0)
            else:
                lo, hi = a.amin(dim=(0, 2, 3)), a.amax(dim=(0, 2, 3))
            if name in acc:
                acc[name] = [torch.minimum(acc[name][0], lo), torch.maximum(acc[name][1], hi)]
            else:
                acc[name] = [lo, hi]
        return fwd

    for name, module in _consumer_modules(net, (("norm1", ""), ("norm2", ".mid")), "norm"):
        handles.append(module.register_forward_hook(hook(name)))
    handles.append(net.features.norm5.register_forward_hook(hook("head", pooled=True)))
    n_blocks = len(net.blocks())
    try:
        inputs = [stem_output(net, x)]
        for b in range(n_blocks - 1):
            inputs.append(through_transition(net, b, inputs[-1]))
        logits_from_block(net, n_blocks - 1, inputs[-1])
    finally:
        for h in handles:
            h.remove()
    return inputs, {k: (v[0].double(), v[1].double()) for k, v in acc.items()}
