#!/usr/bin/env python3
"""Benchmark the monitors: suite time on cached features, and detection / false-alarm rates on phantoms.

Part 1 (seconds): the whole monitor suite on a synthetic FeatureSet of ``--rows`` cached samples
(default 10,000) x 1024-d pooled features, 14 labels, with a reference feature sample and a
parent's logits so that every monitor runs; clean and faulted (logit shift + planted FP cluster).
No backbone: this is the cost of an audit once features are cached. Median of ``--repeats`` runs.

Part 2 (minutes): detection and false-alarm rates over ``--scenarios`` seeded scenarios per fault
on phantoms. One model is trained per scenario family and reused for all its scenarios:

* family ``clean-trained`` (model trained on clean phantoms): each scenario draws a NEW phantom
  set (new patients, seed s) and audits it clean (false alarms = any actionable fact), with
  ``scanner_shift`` (hit = calibration_drift), ``blur`` (hit = recall_collapse or auroc_drop on
  Nodule/Mass), ``prevalence:Effusion=0.5`` (hit = prevalence_shift on Effusion) and
  ``label_noise:0.2`` (hit = auroc_drop, recall_collapse or calibration_drift on any label); each
  fault is also counted under "(any fact)": any fact at all, informational prevalence_shift and
  input_drift included;
* family ``shortcut-trained`` (model trained on the train_val split of
  ``shortcut:LABEL,train_fraction=0.3`` phantoms: a drain on 30 % of the label's training
  positives, so the model learns the finding *and* the drain): each scenario audits the test split
  (80 % of a new phantom set's patients) with the shortcut injected (hit = fp_cluster on LABEL) and
  without (false alarm = any actionable fact).

Part 3 (minutes, with part 2): the level of calibration_drift's operating-point null on clean
data. The clean-trained model scores ``--null-population`` new phantoms; per label, ``--null-draws``
times, a reference of the model's reference size and an audit of ``--n-eval`` images are drawn
apart from them, the reference's Youden threshold plays the deployed one, and its J loss on the
audit is compared with the null's 95 % quantile. Without drift it should exceed it about 5 % of
the time. Beside the monitor's null (samples judged on independent bootstrap replicas of the
audit) the naive one that judges them on the audit's own J curve is measured.

Usage::

    python bench/bench_monitors.py                      # timing + 2 scenarios per fault (~10 min, 1 thread)
    python bench/bench_monitors.py --skip-detection     # timing only (seconds)
    python bench/bench_monitors.py --scenarios 5 --json bench_monitors.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.monitors import MonitorConfig, MonitorContext, available_monitors, get_monitor, run_monitors  # noqa: E402
from engine.monitors.base import (  # noqa: E402
    LabelData,
    bootstrap_counts,
    j_at,
    run_memo,
    sampled_youden_thresholds,
    weighted_j_curve,
)
from engine.monitors.calibration_drift import _SELECTION_DRAWS, _selection_null, reference_samples  # noqa: E402
from model.bundle import new_bundle  # noqa: E402
from model.features import FeatureSet  # noqa: E402
from model.labels import CHEXNET_LABELS  # noqa: E402
from model.metrics import numeric_rows, per_label_metrics, sigmoid, youden_threshold  # noqa: E402
from model.paired import wilson_interval  # noqa: E402

K = len(CHEXNET_LABELS)


# ------------------------------------------------------------------------------------------------
# Part 1: suite time on cached features


class _Head(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.classifier = nn.Linear(n_features, K)


def _synthetic(rows: int, n_features: int, seed: int = 0):
    """Bundle + clean/faulted FeatureSets: 4 signal channels per label, small weights elsewhere."""
    rng = np.random.default_rng(seed)
    mu, sigma, prev = 0.5, 0.5, 0.2
    w = rng.normal(0, 0.01, (K, n_features))
    b = np.zeros(K)
    signal = [np.arange(4 * k, 4 * k + 4) for k in range(K)]
    shortcut = np.arange(n_features - 3, n_features)
    k_sc = CHEXNET_LABELS.index("Pneumothorax")
    for k in range(K):
        w[k, signal[k]] = mu / sigma**2
        b[k] = np.log(prev / (1 - prev)) - ((4 * (1 + mu)) ** 2 - 16) / (2 * 4 * sigma**2) - w[k, 4 * K:].sum()
    w[k_sc, shortcut] = 0.8
    b[k_sc] -= 0.8 * 3

    def draw(n: int, s: int):
        r = np.random.default_rng(s)
        y = (r.random((n, K)) < prev).astype(np.uint8)
        f = (1.0 + sigma * r.standard_normal((n, n_features))).astype(np.float32)
        for k in range(K):
            f[:, signal[k]] += mu * y[:, k : k + 1]
        return y, f

    def fs(y, f, logits=None):
        z = (f.astype(np.float64) @ w.T + b) if logits is None else logits
        names = tuple(f"{i:08d}_000.png" for i in range(len(y)))
        return FeatureSet(names, np.array([str(i) for i in range(len(y))], dtype=object), y, f,
                          np.asarray(z, dtype=np.float32), "w", "m")

    ref_y, ref_f = draw(2000, seed + 1)
    ref_z = ref_f.astype(np.float64) @ w.T + b
    thresholds = [youden_threshold(ref_y[:, k], sigmoid(ref_z[:, k])) for k in range(K)]
    head = _Head(n_features)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor(w, dtype=torch.float32))
        head.classifier.bias.copy_(torch.tensor(b, dtype=torch.float32))
    bundle = new_bundle(head, config={"num_classes": K}, input_size=224, thresholds=thresholds,
                        reference_metrics=numeric_rows(
                            per_label_metrics(ref_y, ref_z, thresholds, CHEXNET_LABELS, n_boot=200)))
    y, f = draw(rows, seed + 2)
    clean = fs(y, f)
    neg = np.flatnonzero(y[:, k_sc] == 0)
    planted = rng.choice(neg, int(0.4 * len(neg)), replace=False)
    f2 = f.copy()
    f2[np.ix_(planted, shortcut)] += 3.0
    faulted = fs(y, f2)
    faulted = faulted.with_logits(faulted.logits + np.where(np.arange(K) == k_sc, 0.0, 1.5))
    parent = clean.with_logits(clean.logits + rng.normal(0, 1e-4, clean.logits.shape))
    return bundle, clean, faulted, parent, ref_f


def bench_timing(rows: int, n_features: int, repeats: int) -> dict:
    bundle, clean, faulted, parent, ref_f = _synthetic(rows, n_features)
    config = MonitorConfig()
    out: dict = {"rows": rows, "features": n_features, "labels": K, "repeats": repeats}
    for name, data in (("clean", clean), ("faulted", faulted)):
        ctx = MonitorContext(bundle, data, parent=bundle, parent_data=parent, reference_features=ref_f)
        run_monitors(ctx, config)  # warm-up (imports, BLAS)
        per: dict[str, list[float]] = {m: [] for m in available_monitors()}
        totals = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with run_memo():  # as run_monitors does
                for m in available_monitors():
                    t = time.perf_counter()
                    get_monitor(m).run(ctx, config)
                    per[m].append(time.perf_counter() - t)
            totals.append(time.perf_counter() - t0)
        facts = run_monitors(ctx, config)
        out[name] = {
            "median_s": statistics.median(totals),
            "per_monitor_median_s": {m: statistics.median(v) for m, v in per.items()},
            "facts": sorted({f"{f.kind}:{f.label}" for f in facts if f.kind != "cannot_assess"}),
        }
    return out


# ------------------------------------------------------------------------------------------------
# Part 2: detection / false alarms on phantoms


_ACTIONABLE = ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop", "compression_fidelity")


def _actionable(facts) -> list[str]:
    return [f"{f.kind}:{f.label}" for f in facts if f.actionable]


def _audit(bundle, root: Path, split: str):
    from model.data import load_nih_dataset
    from model.features import extract_features

    # No feature cache: an injected copy has the same image names and labels as its source.
    data = extract_features(bundle, load_nih_dataset(root, split), use_cache=False)
    return run_monitors(MonitorContext(bundle, data), MonitorConfig())


def bench_detection(args: argparse.Namespace, work: Path) -> dict:
    from model.data import load_nih_dataset
    from model.data.faults import inject_fault
    from model.data.phantom import generate_phantoms
    from model.train import train_bundle

    torch.set_num_threads(args.threads)
    results: dict = {"settings": {k: getattr(args, k) for k in ("scenarios", "n_train", "n_eval", "size", "epochs",
                                                                 "preset", "shortcut_label", "val_fraction",
                                                                 "train_fraction")}}
    t_start = time.perf_counter()

    def train(root: Path, seed: int):
        t = time.perf_counter()
        bundle, report = train_bundle(load_nih_dataset(root, "train_val"), preset=args.preset, image_size=args.size,
                                      epochs=args.epochs, seed=seed, val_fraction=args.val_fraction)
        return bundle, {"seconds": round(time.perf_counter() - t, 1), "val_mean_auroc": report.get("val_mean_auroc")}

    faults = {
        "scanner_shift": (lambda f: f.startswith("calibration_drift:")),
        "blur": (lambda f: f.split(":")[0] in ("recall_collapse", "auroc_drop") and f.split(":")[1] in ("Nodule", "Mass")),
        "prevalence:Effusion=0.5": (lambda f: f == "prevalence_shift:Effusion"),
        "label_noise:0.2": (lambda f: f.split(":")[0] in ("auroc_drop", "recall_collapse", "calibration_drift")),
    }
    if "clean-trained" in args.families:
        base = generate_phantoms(work / "train_clean", args.n_train, size=args.size, seed=0)
        bundle, info = train(base, 0)
        fam = {"model": info, "clean_false_alarm": [], **{f: [] for f in faults},
               **{f"{f} (any fact)": [] for f in faults}, "details": []}
        for s in range(args.scenarios):
            ev = generate_phantoms(work / f"eval{s}", args.n_eval, size=args.size, seed=100 + s)
            clean = _actionable(_audit(bundle, ev, "all"))
            fam["clean_false_alarm"].append(bool(clean))
            detail = {"seed": s, "clean": clean}
            for spec, hit in faults.items():
                out = work / f"eval{s}_{spec.split(':')[0]}"
                inject_fault(ev, spec, out, seed=s)
                facts = [f"{f.kind}:{f.label}" for f in _audit(bundle, out, "all")]
                fam[spec].append(any(hit(f) for f in facts))
                fam[f"{spec} (any fact)"].append(any(not f.startswith("cannot_assess") for f in facts))
                detail[spec] = [f for f in facts if not f.startswith("cannot_assess")]
            fam["details"].append(detail)
        results["clean-trained"] = fam
        if args.null_draws:
            results["null_level"] = bench_null_level(bundle, work, args)
    if "shortcut-trained" in args.families:
        label = args.shortcut_label
        base = generate_phantoms(work / "train_sc_src", args.n_train, size=args.size, seed=1)
        inject_fault(base, f"shortcut:{label},train_fraction={args.train_fraction}", work / "train_sc", seed=0)
        bundle, info = train(work / "train_sc", 1)
        fam = {"model": info, "clean_false_alarm": [], "shortcut": [], "details": []}
        for s in range(args.scenarios):
            ev = generate_phantoms(work / f"sc_eval{s}", args.n_eval, size=args.size, seed=200 + s, test_fraction=0.8)
            out = work / f"sc_eval{s}_tube"
            inject_fault(ev, f"shortcut:{label}", out, seed=s)
            clean = [f"{f.kind}:{f.label}" for f in _audit(bundle, ev, "test")]
            faulted = [f"{f.kind}:{f.label}" for f in _audit(bundle, out, "test")]
            fam["clean_false_alarm"].append(bool([f for f in clean if f.split(":")[0] in _ACTIONABLE]))
            fam["shortcut"].append(f"fp_cluster:{label}" in faulted)
            fam["details"].append({"seed": s, "clean": [f for f in clean if not f.startswith("cannot_assess")],
                                   "shortcut": [f for f in faulted if not f.startswith("cannot_assess")]})
        results["shortcut-trained"] = fam
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    return results


# ------------------------------------------------------------------------------------------------
# Part 3: the level of calibration_drift's operating-point null on clean data


def _own_curve_quantile(lab: LabelData, values: np.ndarray, j: np.ndarray, level: float, seed) -> float:
    """The naive null: reference-sized samples of the audit judged on the audit's own J curve."""
    rows = reference_samples(lab, _SELECTION_DRAWS, np.random.default_rng(seed))
    chosen = sampled_youden_thresholds(lab.y, lab.probs, rows)
    at = np.append(j, 0.0)[np.searchsorted(values, chosen, side="left")]
    return float(np.quantile(float(np.nanmax(j)) - at, level))


def bench_null_level(bundle, work: Path, args: argparse.Namespace) -> dict:
    """Per label: how often a clean audit's J loss exceeds the null's 95 % quantile (both nulls)."""
    from model.data import load_nih_dataset
    from model.data.phantom import generate_phantoms
    from model.features import extract_features

    t0 = time.perf_counter()
    root = generate_phantoms(work / "null_population", args.null_population, size=args.size, seed=300)
    data = extract_features(bundle, load_nih_dataset(root, "all"), use_cache=False)
    y_all, p_all = data.labels.astype(int), sigmoid(data.logits.astype(np.float64))
    ref_n = int(next(iter(bundle.meta.reference_metrics.values()))["n"])  # the same held-out part for every label
    n_audit = min(args.n_eval, len(y_all) - ref_n)
    rng = np.random.default_rng(0)
    labels = {}
    for k, name in enumerate(CHEXNET_LABELS):
        counts = {"draws": 0, "replica": 0, "own_curve": 0}
        for r in range(args.null_draws):
            order = rng.permutation(len(y_all))
            ref, audit = order[:ref_n], order[ref_n : ref_n + n_audit]
            y_ref, y = y_all[ref, k], y_all[audit, k]
            if min(y_ref.sum(), y.sum()) < 2 or min((1 - y_ref).sum(), (1 - y).sum()) < 2:
                continue
            p = p_all[audit, k]
            deployed = youden_threshold(y_ref, p_all[ref, k])
            values, j = weighted_j_curve(y, p, np.ones((1, len(y)), dtype=np.float32))
            j_loss = float(np.nanmax(j[0]) - j_at(values, j, deployed)[0])
            lab = LabelData(k=k, name=name, rows=np.arange(len(y)), y=y, logits=np.log(p / (1 - p)), probs=p,
                            threshold=deployed, reference={"n": ref_n, "prevalence": float(y_ref.mean())})
            null = _selection_null(lab, 0.05, [r, k], bootstrap_counts(len(y), _SELECTION_DRAWS, [r, k, 1]))
            counts["draws"] += 1
            counts["replica"] += j_loss > null["j_loss_selection_quantile"]
            counts["own_curve"] += j_loss > _own_curve_quantile(lab, values, j[0], 0.95, [r, k])
        if counts["draws"]:
            labels[name] = {**counts, "positives_in_population": int(y_all[:, k].sum())}
    pooled = {}
    for null in ("replica", "own_curve"):
        hits, n = sum(v[null] for v in labels.values()), sum(v["draws"] for v in labels.values())
        ci = wilson_interval(hits, n)
        pooled[null] = {"exceeded": hits, "draws": n, "rate": ci.estimate, "ci_low": ci.low, "ci_high": ci.high}
    return {"population": args.null_population, "reference_n": ref_n, "audit_n": n_audit,
            "draws_per_label": args.null_draws, "nominal": 0.05, "labels": labels, "pooled": pooled,
            "seconds": round(time.perf_counter() - t0, 1)}


def _rate(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000, help="cached samples in the timing run (default: %(default)s)")
    p.add_argument("--features", type=int, default=1024, help="pooled-feature width (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats; the median is reported (default: %(default)s)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-detection", action="store_true")
    p.add_argument("--scenarios", type=int, default=2, help="seeded scenarios per fault (default: %(default)s)")
    p.add_argument("--families", nargs="+", default=["clean-trained", "shortcut-trained"],
                   choices=["clean-trained", "shortcut-trained"])
    p.add_argument("--n-train", type=int, default=600, help="phantoms to train each family's model on")
    p.add_argument("--n-eval", type=int, default=400, help="phantoms per evaluation scenario")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--preset", default="densenet121")
    p.add_argument("--val-fraction", type=float, default=0.3,
                   help="held-out share of the training patients the reference metrics are measured on; rank "
                   "comparisons need min_comparison_positives there (default: %(default)s)")
    p.add_argument("--shortcut-label", default="Effusion",
                   help="label whose positives get the tube (default: %(default)s; Pneumothorax is the classic "
                   "case but has ~5%% prevalence, too few positives for small phantom sets)")
    p.add_argument("--train-fraction", type=float, default=0.3,
                   help="share of the label's training positives that get the drain (default: %(default)s)")
    p.add_argument("--null-draws", type=int, default=150,
                   help="part 3: (reference, audit) draws per label for the null's level; 0 skips it "
                   "(default: %(default)s)")
    p.add_argument("--null-population", type=int, default=3000,
                   help="part 3: clean phantoms the draws are taken from (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if not os.environ.get("CXR_TRIAGE_CACHE"):  # (setdefault would create a temp folder even when set)
        os.environ["CXR_TRIAGE_CACHE"] = tempfile.mkdtemp(prefix="cxr-bench-cache-")

    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": args.threads}}
    if not args.skip_timing:
        t = bench_timing(args.rows, args.features, args.repeats)
        results["timing"] = t
        print(f"monitor suite on {t['rows']:,} cached samples x {t['features']}-d features, {K} labels "
              f"(median of {t['repeats']}):")
        for name in ("clean", "faulted"):
            per = ", ".join(f"{m} {v * 1000:.0f} ms" for m, v in t[name]["per_monitor_median_s"].items())
            print(f"  {name:8s} {t[name]['median_s']:.3f} s  ({per})")
        print(f"  faulted-run facts: {', '.join(t['faulted']['facts'])}")
    if not args.skip_detection:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
            d = bench_detection(args, Path(tmp))
        results["detection"] = d
        print(f"detection on phantoms ({args.scenarios} scenario(s) per fault, {d['seconds']:.0f} s):")
        for fam in ("clean-trained", "shortcut-trained"):
            if fam not in d:
                continue
            r = d[fam]
            print(f"  {fam}: model trained in {r['model']['seconds']} s, val mean AUROC "
                  f"{r['model']['val_mean_auroc']:.3f}")
            print(f"    false alarms on clean data: {_rate(r['clean_false_alarm'])}")
            for key, values in r.items():
                if key not in ("model", "clean_false_alarm", "details"):
                    print(f"    detected {key}: {_rate(values)}")
        level = d.get("null_level")
        if level:
            print(f"  operating-point null on clean data ({level['draws_per_label']} draws per label, reference "
                  f"{level['reference_n']}, audit {level['audit_n']}; nominal 5 %):")
            for null, v in level["pooled"].items():
                print(f"    {null}: exceeded {v['exceeded']}/{v['draws']} = {v['rate']:.3f} "
                      f"(95 % CI {v['ci_low']:.3f}-{v['ci_high']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
