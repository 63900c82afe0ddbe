"""Distillation: after the layer-wise re-fits, train the whole compressed network to its parent's logits.

Why. The least-squares re-fits reproduce each consumer's output given the compressed prefix, one
layer at a time; what is left is the error they cannot see -- how small per-layer errors add up
at the logits. A short end-to-end fit of the compressed network (the student) to the parent's
logits (the teacher) on the calibration images removes most of it (Hinton et al. 2015; the
standard recovery step after channel pruning). The targets are the parent's logits on the same
input, so no label is used and every image is a sample; fresh shift and intensity jitter per
epoch keeps a 3,000-image calibration set from being memorised.

Batch norms stay in inference mode (their running statistics are what the re-fits folded biases
into), only weights move, and the epoch whose held-out mean |Δlogit| is smallest is kept -- the
re-fitted network itself when no epoch improves on it. Deterministic under the seed on CPU with
the same thread count, so a history entry replays it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.compression.measure import batched_logits
from model.compression.settings import Progress
from model.nets.pruned import PrunedDenseNet

__all__ = ["DISTILL_BATCH", "distill"]

#: Images per optimisation step.
DISTILL_BATCH = 32


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random shifts (edge padding) and intensity jitter of a batch of model inputs."""
    n, _, h, w = x.shape
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w] for i in range(n)])
    gain = 1.0 + 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    return out * gain + shift


def _mean_dev(net: PrunedDenseNet, x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(batched_logits(net, x) - ref).mean()) if len(x) else 0.0


def distill(student: PrunedDenseNet, teacher: torch.nn.Module, fit: torch.Tensor, hold: torch.Tensor, *,
            epochs: int, lr: float, seed: int, keep_epoch: int | None = None,
            progress: Progress | None = None) -> tuple[PrunedDenseNet, dict[str, Any]]:
    """``student`` trained to ``teacher``'s logits on ``fit`` for ``epochs``; the best epoch on ``hold``.

    Returns the chosen network (a copy; ``student`` is not changed) and a JSON-able record: the
    held-out mean |Δlogit| before and after every epoch, and which epoch was kept (0 = none).
    ``keep_epoch`` (a replay of a record) runs the same schedule up to that epoch and keeps it.
    """
    teacher = teacher.eval()
    hold_ref = batched_logits(teacher, hold) if len(hold) else np.zeros((0, 0))
    best_net = copy.deepcopy(student).eval()
    best_dev = _mean_dev(best_net, hold, hold_ref)
    record: dict[str, Any] = {"epochs": int(epochs), "lr": float(lr), "batch": DISTILL_BATCH,
                              "holdout_mean_dlogit": [round(best_dev, 6)], "kept_epoch": 0}
    if epochs <= 0 or len(fit) == 0 or keep_epoch == 0:
        return best_net, record
    net = copy.deepcopy(student).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * ((len(fit) + DISTILL_BATCH - 1) // DISTILL_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed * 7 + 12345)
    for epoch in range(1, (keep_epoch or epochs) + 1):
        order = torch.randperm(len(fit), generator=gen)
        for s in range(0, len(fit), DISTILL_BATCH):
            xb = _jitter(fit[order[s : s + DISTILL_BATCH]], gen)
            with torch.no_grad():
                target = teacher(xb)
            with torch.enable_grad():
                loss = F.mse_loss(net(xb), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
        dev = _mean_dev(net, hold, hold_ref)
        record["holdout_mean_dlogit"].append(round(dev, 6))
        if dev < best_dev or epoch == keep_epoch:
            best_dev, best_net, record["kept_epoch"] = dev, copy.deepcopy(net).eval(), epoch
        if progress is not None:
            progress(epoch, epochs)
    opt.zero_grad(set_to_none=True)
    for p in best_net.parameters():
        p.grad = None
    return best_net, record
