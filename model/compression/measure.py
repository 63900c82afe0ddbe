"""Measurement: multiply-adds, CPU speed, fidelity to the parent, and the compression report."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from model.bundle import Bundle, bundle_to_bytes
from model.metrics import auroc_rows, sigmoid

__all__ = ["batched_logits", "compression_report", "count_macs", "decision_flips", "fidelity", "measure_speeds"]


def count_macs(model: nn.Module, input_size: int, in_channels: int) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image (BN/ReLU/pooling not counted)."""
    total = 0
    handles = []

    def conv_hook(mod: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = mod.kernel_size
        total += int(out.shape[2] * out.shape[3] * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw)

    def lin_hook(mod: nn.Linear, _inp, _out):
        nonlocal total
        total += int(mod.in_features * mod.out_features)

    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total


def measure_speeds(models: dict[str, nn.Module], input_size: int, in_channels: int, *, batch: int,
                   rounds: int = 7, inner: int = 2) -> dict[str, float]:
    """Median seconds per forward pass of a ``batch`` on CPU for each model, timed A/B interleaved.

    Each round runs every model ``inner`` times in turn, so a load change on a shared machine hits
    all of them alike; the median over ``rounds`` drops the rounds a burst disturbed. One warm-up
    pass each first (allocator, oneDNN primitive caches).
    """
    x = torch.randn(batch, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    was = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()(x)
            for _ in range(rounds):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        m(x)
                    times[name].append((time.perf_counter() - t0) / inner)
    finally:
        for name, m in models.items():
            m.train(was[name])
    return {name: float(np.median(t)) for name, t in times.items()}


def decision_flips(ref_logits: np.ndarray, new_logits: np.ndarray, ref_thresholds: np.ndarray,
                   new_thresholds: np.ndarray | None = None) -> np.ndarray:
    """Boolean (image, label) matrix: where the two models' decisions at their thresholds differ."""
    new_thr = ref_thresholds if new_thresholds is None else new_thresholds
    return ((sigmoid(np.asarray(new_logits, np.float64)) >= np.asarray(new_thr, np.float64))
            != (sigmoid(np.asarray(ref_logits, np.float64)) >= np.asarray(ref_thresholds, np.float64)))


def batched_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = [model(x[s : s + 64]) for s in range(0, x.shape[0], 64)]
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def fidelity(ref_logits: np.ndarray, new_logits: np.ndarray, labels: np.ndarray, label_names: list[str], *,
             n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """|Δlogit| and per-label ΔAUROC (new - reference) with a paired bootstrap 95 % CI."""
    d = np.abs(new_logits.astype(np.float64) - ref_logits.astype(np.float64))
    out: dict[str, Any] = {
        "n_images": int(len(ref_logits)),
        "max_abs_dlogit": float(d.max()) if d.size else 0.0,
        "mean_abs_dlogit": float(d.mean()) if d.size else 0.0,
        "labels": {},
    }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels))) if len(labels) else None
    deltas = []
    for k, name in enumerate(label_names):
        y = labels[:, k].astype(np.float64)
        row: dict[str, Any] = {"positives": int(y.sum())}
        if 0 < y.sum() < len(y):
            a_ref = float(auroc_rows(y[None], ref_logits[:, k][None].astype(np.float64))[0])
            a_new = float(auroc_rows(y[None], new_logits[:, k][None].astype(np.float64))[0])
            boot = (auroc_rows(y[idx], new_logits[:, k][idx].astype(np.float64))
                    - auroc_rows(y[idx], ref_logits[:, k][idx].astype(np.float64)))
            boot = boot[np.isfinite(boot)]
            lo, hi = (np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan))
            row.update(auroc_ref=a_ref, auroc_new=a_new, delta=a_new - a_ref,
                       ci_low=None if not np.isfinite(lo) else float(lo),
                       ci_high=None if not np.isfinite(hi) else float(hi))
            deltas.append(a_new - a_ref)
        else:
            row.update(auroc_ref=None, auroc_new=None, delta=None, ci_low=None, ci_high=None)
        out["labels"][name] = row
    out["mean_auroc_delta"] = float(np.mean(deltas)) if deltas else None
    out["mean_abs_auroc_delta"] = float(np.mean(np.abs(deltas))) if deltas else None
    out["max_abs_auroc_delta"] = float(np.max(np.abs(deltas))) if deltas else None
    ref_aucs = [r["auroc_ref"] for r in out["labels"].values() if r["auroc_ref"] is not None]
    new_aucs = [r["auroc_new"] for r in out["labels"].values() if r["auroc_new"] is not None]
    out["mean_auroc_ref"] = float(np.mean(ref_aucs)) if ref_aucs else None
    out["mean_auroc_new"] = float(np.mean(new_aucs)) if new_aucs else None
    return out


def compression_report(parent: Bundle, compressed: Bundle, x: torch.Tensor, labels: np.ndarray, *,
                       where: str, speed: bool = True, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Size, cost and fidelity of ``compressed`` against ``parent`` on held-out inputs ``x``."""
    meta = parent.meta
    rows: dict[str, Any] = {}
    for key, b in (("parent", parent), ("compressed", compressed)):
        r = {
            "parameters": int(sum(p.numel() for p in b.model.parameters())),
            "macs": count_macs(b.model, meta.input_size, meta.in_channels),
            "file_bytes": len(bundle_to_bytes(b)),
        }
        r["flops"] = 2 * r["macs"]
        rows[key] = r
    p, c = rows["parent"], rows["compressed"]
    if speed:  # both timed in the same run, interleaved
        models = {"parent": parent.model, "compressed": compressed.model}
        b1 = measure_speeds(models, meta.input_size, meta.in_channels, batch=1, rounds=15)
        b32 = measure_speeds(models, meta.input_size, meta.in_channels, batch=32, rounds=5)
        for key in models:
            rows[key]["latency_b1_ms"] = 1000 * b1[key]
            rows[key]["throughput_b32_img_s"] = 32 / b32[key]
    ratios = {
        "parameter_reduction": 1 - c["parameters"] / p["parameters"],
        "flop_reduction": 1 - c["macs"] / p["macs"],
        "file_size_reduction": 1 - c["file_bytes"] / p["file_bytes"],
    }
    if speed:
        ratios["speedup_b1"] = p["latency_b1_ms"] / c["latency_b1_ms"]
        ratios["speedup_b32"] = c["throughput_b32_img_s"] / p["throughput_b32_img_s"]
    fid = fidelity(batched_logits(parent.model, x), batched_logits(compressed.model, x), labels, list(meta.labels),
                   n_boot=n_boot, seed=seed)
    fid["where"] = where
    return {"size": rows, "ratios": ratios, "fidelity": fid, "torch_threads": torch.get_num_threads()}
