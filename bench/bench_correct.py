"""Surgical correction of reported false positives (issue 18): the paper's claims measured on our models.

Per model (the 4,000-phantom DenseNet121 and the NIH-sample one) and per label with at least
``--min-positives`` (5) test positives, the label's 3 most confident test false positives are each
reported alone and corrected by :func:`interventions.zeroing_reported.correct_reported` (exactly what
``cli.py correct`` applies) at k = 5 and k = 10 channels. The fit split (the label's true positives
that define the attribution baseline and that no correction may lose) is the train_val split: a
half of the NIH sample's 104 test images holds no true positive of most labels. Per image: Δprob,
crossed below the threshold, true positives lost on fit (train_val) and on test, the label's test
AUROC change, the wall time.

Attribution atomicity (the paper's thesis that compression makes it atomic): for the same images,
the share of positive evidence (the positive part of ``w_c (f_c - mean over the fit TPs)``) carried
by the top-5 and top-10 channels, in the parent and in its −50 % compressed model (``--compressed-*``,
else made here with ``cli.py compress --target-reduction 0.5143``).

Paper: Δprob −0.13 with 5 channels, 0 true positives lost.

Usage (from the repository root)::

    python bench/bench_correct.py [--compressed-phantom P] [--compressed-nih P] [--work .bench_work/correct]
        [--json bench/results/correct.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.errors import InterventionError
from engine.core.storage import atomic_write_json
from interventions.attribution import classifier_row, head_logits, truth_index
from interventions.zeroing_reported import correct_reported, true_positive_rows
from model.bundle import Bundle, load_bundle
from model.data import load_nih_dataset
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, sigmoid

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "phantom": (Path("/tmp/cxr_bench_compress/phantom_phantoms4000_densenet121_e8.safetensors"),
                Path("/tmp/cxr_bench_compress/phantoms4000")),
    "nih": (Path("/tmp/cxr_bench_compress/nih_nih1000_densenet121_e8.safetensors"),
            REPO.parent / "shared" / "data" / "nih1000"),
}
PAPER = {"delta_prob_k5": -0.13, "tp_lost": 0, "channels": 5, "wall_time_s": 5.0}
KS = (5, 10)


def _cli(*args: str) -> None:
    cmd = [sys.executable, str(REPO / "cli.py"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _quick_world(work: Path) -> tuple[Path, Path]:
    """A smoke-test world (never a result): 300 phantoms at 32 px and a tiny DenseNet, one epoch."""
    data, model = work / "quick_phantoms", work / "quick_model.safetensors"
    if not (data / "test_list.txt").is_file():
        _cli("phantom", "--out", str(data), "--n", "300", "--size", "32", "--seed", "1")
    if not model.is_file():
        _cli("train", "--data", str(data), "--out", str(model), "--arch", "tiny", "--image-size", "32",
             "--epochs", "1", "--seed", "1")
    return model, data


def _compressed(name: str, model: Path, data: Path, given: Path | None, work: Path) -> tuple[Path | None, float | None]:
    """The −50 % model: ``given``, or made with ``cli.py compress`` (its wall time); None: ``--skip-compressed``."""
    if given is not None and str(given) == "skip":
        return None, None
    if given is not None:
        return given, None
    out = work / f"{name}_compressed.safetensors"
    if out.is_file():
        return out, None
    t = time.perf_counter()
    cmd = [sys.executable, str(REPO / "cli.py"), "compress", "--model", str(model), "--data", str(data),
           "--out", str(out), "--target-reduction", "0.5143"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return out, time.perf_counter() - t


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    v = auroc(y.astype(int), s)
    return None if np.isnan(v) else float(v)


def _shares(bundle: Bundle, fit: FeatureSet, feats: np.ndarray, label: str) -> dict[str, float | None]:
    """Share of the image's positive evidence against the fit TPs carried by its top-5 / top-10 channels."""
    k, w, _ = classifier_row(bundle, label)
    y = fit.labels[:, truth_index(label)].astype(bool)
    tp = true_positive_rows(fit, fit.logits[:, k], y, float(bundle.meta.thresholds[k]))
    if not len(tp):
        return {f"top{n}": None for n in KS} | {"n_channels": int(len(w)), "reason": "no fit true positive"}
    a = np.clip(w * (feats.astype(np.float64) - fit.features[tp].astype(np.float64).mean(axis=0)), 0, None)
    total = float(a.sum())
    top = np.sort(a)[::-1]
    out: dict[str, Any] = {f"top{n}": (float(top[:n].sum()) / total if total > 0 else None) for n in KS}
    return out | {"n_channels": int(len(w))}


def _one(bundle: Bundle, fit: FeatureSet, fs: FeatureSet, row: int, label: str, k_max: int) -> dict[str, Any]:
    """One report of test image ``row`` corrected with at most ``k_max`` channels (fit: train_val)."""
    rep = fs.subset(np.array([row]))
    t = time.perf_counter()
    try:
        fix = correct_reported(bundle, fit, rep, label, max_channels=k_max)
    except InterventionError as exc:
        return {"k": k_max, "error": str(exc)}
    wall = time.perf_counter() - t
    k = fix.row
    thr = float(bundle.meta.thresholds[k])
    y = fs.labels[:, truth_index(label)].astype(bool)
    before, after = fs.logits[:, k], head_logits(fix.bundle, fs.features)[:, k]
    pv_b, pv_a = sigmoid(before.astype(np.float64)), sigmoid(after.astype(np.float64))
    tp_ver_lost = int(((pv_b >= thr) & y & (pv_a < thr)).sum())
    a_b, a_a = _auc(y, before), _auc(y, after)
    img = fix.images[0]
    return {"k": k_max, "n_channels": len(fix.channels), "channels": fix.channels, "delta_prob": img["delta_prob"],
            "prob_before": img["prob_before"], "prob_after": img["prob_after"], "crossed": img["crossed"],
            "tp_lost_fit": fix.tp_lost, "tp_lost_test": tp_ver_lost,
            "auroc_before": a_b, "auroc_after": a_a,
            "auroc_change": (a_a - a_b) if a_b is not None and a_a is not None else None, "wall_time_s": wall}


def _model_rows(name: str, model: Path, compressed: Path | None, data: Path, n_fp: int, min_pos: int) -> dict[str, Any]:
    ds, ds_fit = load_nih_dataset(data, "test"), load_nih_dataset(data, "train_val")
    parent = load_bundle(model)
    small = load_bundle(compressed) if compressed is not None else parent  # skipped: recorded as not measured
    t = time.perf_counter()
    fs, fit = extract_features(parent, ds), extract_features(parent, ds_fit)
    fs_c, fit_c = (extract_features(small, ds), extract_features(small, ds_fit)) if compressed is not None else (fs, fit)
    feat_s = time.perf_counter() - t
    rows = []
    for label in parent.labels:
        if label not in CHEXNET_LABELS:
            continue
        y = fs.labels[:, truth_index(label)].astype(bool)
        if int(y.sum()) < min_pos:
            continue
        k = parent.labels.index(label)
        p = sigmoid(fs.logits[:, k].astype(np.float64))
        fps = np.flatnonzero((p >= parent.meta.thresholds[k]) & ~y)
        for i in fps[np.argsort(-p[fps], kind="stable")][:n_fp]:
            rows.append({"label": label, "image": fs.image_names[i], "positives": int(y.sum()),
                         "corrections": [_one(parent, fit, fs, int(i), label, kk) for kk in KS],
                         "compressed_k5": _one(small, fit_c, fs_c, int(i), label, 5),
                         "atomicity": {"parent": _shares(parent, fit, fs.features[i], label),
                                       "compressed": _shares(small, fit_c, fs_c.features[i], label)}})
    return {"model": str(model), "compressed": str(compressed), "data": str(data), "n_test": len(ds),
            "n_fit": len(fit), "fit_split": "train_val", "feature_time_s": feat_s,
            "parameters": {"parent": sum(p.numel() for p in parent.model.parameters()),
                           "compressed": (sum(p.numel() for p in small.model.parameters())
                                          if compressed is not None else None)},
            "rows": rows, "summary": _summary(rows, measured_compressed=compressed is not None)}


def _summary(rows: list[dict[str, Any]], measured_compressed: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"n_images": len(rows), "n_labels": len({r["label"] for r in rows})}
    for j, kk in enumerate(KS):
        ok = [r["corrections"][j] for r in rows if "error" not in r["corrections"][j]]
        out[f"k{kk}"] = {
            "n": len(ok), "errors": len(rows) - len(ok),
            "median_delta_prob": float(np.median([c["delta_prob"] for c in ok])) if ok else None,
            "crossed": sum(c["crossed"] for c in ok),
            "tp_lost_fit": sum(max(c["tp_lost_fit"], 0) for c in ok),
            "tp_lost_test": sum(c["tp_lost_test"] for c in ok),
            "median_auroc_change": (float(np.median([c["auroc_change"] for c in ok if c["auroc_change"] is not None]))
                                    if any(c["auroc_change"] is not None for c in ok) else None),
            "max_wall_time_s": max((c["wall_time_s"] for c in ok), default=None)}
    for model in ("parent", "compressed"):
        for n in KS:
            vals = [r["atomicity"][model][f"top{n}"] for r in rows if r["atomicity"][model].get(f"top{n}") is not None]
            out[f"share_top{n}_{model}"] = float(np.median(vals)) if vals else None
    c5 = [r["compressed_k5"] for r in rows if "error" not in r["compressed_k5"]]
    out["compressed_k5_median_delta_prob"] = float(np.median([c["delta_prob"] for c in c5])) if c5 else None
    if not measured_compressed:
        for key in [k for k in out if k.endswith("_compressed") or k.startswith("compressed_")]:
            out[key] = None
        out["compressed_reason"] = "not measured (--compressed-NAME skip)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    for name in MODELS:
        ap.add_argument(f"--model-{name}", type=Path, default=MODELS[name][0])
        ap.add_argument(f"--data-{name}", type=Path, default=MODELS[name][1])
        ap.add_argument(f"--compressed-{name}", type=Path, default=None,
                        help="its -50 %% model (default: made with cli.py compress; 'skip': no atomicity comparison)")
    ap.add_argument("--fps", type=int, default=3, help="most confident test false positives per label")
    ap.add_argument("--min-positives", type=int, default=None, help="test positives a label needs (default 5; 1 in "
                    "--quick)")
    ap.add_argument("--work", type=Path, default=REPO / ".bench_work" / "correct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test on a tiny phantom world (not a result)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "correct.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"bench": "correct", "quick": bool(args.quick), "paper": PAPER, "machine": platform.processor() or platform.machine(),
                           "threads": torch.get_num_threads(), "datasets": {}}
    for name in (["quick"] if args.quick else args.datasets):
        model, data = _quick_world(args.work) if args.quick else (getattr(args, f"model_{name}"),
                                                                  getattr(args, f"data_{name}"))
        given = None if args.quick else getattr(args, f"compressed_{name}")
        compressed, c_time = _compressed(name, model, data, given, args.work)
        min_pos = args.min_positives if args.min_positives is not None else (1 if args.quick else 5)
        doc["datasets"][name] = _model_rows(name, model, compressed, data, args.fps, min_pos)
        doc["datasets"][name]["compress_time_s"] = c_time
        print(name, json.dumps(doc["datasets"][name]["summary"], indent=1), flush=True)
    doc["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(args.json, doc)
    print(f"wrote {args.json} ({doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
