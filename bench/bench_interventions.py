"""Intervention benchmark: wall time and effect of every treatment, beside the paper's cost matrix.

Run by hand (defaults: about 5 minutes on 2 CPU cores; every size is a flag):

    python bench/bench_interventions.py
    python bench/bench_interventions.py --n 2000 --preset densenet121 --epochs 8 --repeats 5
    python bench/bench_interventions.py --nih none --no-backbone        # classifier-level only

Scenarios (phantoms from ``model.data.phantom`` with faults from ``model.data.faults``; models from
``model.train.train_bundle``; the audit set is the test split, divided patient-disjoint into a FIT
half that the intervention sees and a VERIFY half that judges it, as ``triage`` does):

* ``shortcut``: a model trained on ``shortcut:Pneumothorax`` train_val, audited on its test split
  (tubes on half of the Pneumothorax negatives) -> the fp_cluster fact;
* ``scanner_shift``: a model trained on clean phantoms, audited on a ``scanner_shift`` test split
  -> the most severe calibration_drift fact;
* ``recall_collapse``: the clean model with one label's bias shifted by ``--collapse-shift``;
* ``operating_point``: per-label F1 and recall on VERIFY at threshold 0.5, at Youden thresholds
  fitted on FIT (``threshold`` with scope all), and after ``partial_retrain`` with scope all — on
  the clean phantom model and on a model trained on the real NIH sample (``--nih``), whose images
  are split by patient into 60 % training and 40 % audit.

For each (scenario, intervention): median wall time over ``--repeats`` runs (one run for backbone
interventions), the target label's metrics on VERIFY before -> after, the cluster's false
positives (shortcut: the tubed negatives, ground truth from ``fault.json``), and collateral: the
largest AUROC drop on another label and whether the other labels' logits are bit-identical.
Figures are written as JSON (``--out``) and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.errors import InterventionError  # noqa: E402
from engine.core.facts import IssueFact  # noqa: E402
from engine.core.storage import atomic_write_json  # noqa: E402
from interventions.attribution import (  # noqa: E402
    contributions, finite_or_none, head_logits, top_channels, truth_index,
)
from interventions.base import InterventionResult, TreatmentContext  # noqa: E402
from interventions.registry import get_intervention  # noqa: E402
from model.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from model.data import NIHDataset, load_nih_dataset, patient_disjoint_split  # noqa: E402
from model.features import FeatureSet, extract_features  # noqa: E402
from model.labels import CHEXNET_LABELS  # noqa: E402
from model.metrics import auroc, confusion_at, expected_calibration_error, sigmoid  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NIH1000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih1000"
#: The paper's cost matrix (wall time per treatment) that the measured times are set beside.
PAPER_COST = {"threshold": "< 1 s", "zeroing": "< 5 s (5 channels, target FP dprob -0.13, 0 TP lost)",
              "partial_retrain": "85 s (F1 x1.6, recall x7 over threshold 0.5)"}
CLASSIFIER_LEVEL = ("threshold", "zeroing", "partial_retrain")


# --------------------------------------------------------------------------------------------
# Data and models


def _phantoms(args: argparse.Namespace) -> Path:
    from model.data.phantom import generate_phantoms

    root = args.workdir / f"phantoms_n{args.n}_s{args.size}_seed{args.seed}"
    if not root.exists():
        print(f"[data] generating {args.n} phantoms at {args.size} px ...", flush=True)
        generate_phantoms(root, args.n, size=args.size, seed=args.seed)
    return root


def _injected(clean: Path, spec: str, seed: int) -> Path:
    from model.data.faults import inject_fault

    out = clean.parent / f"{clean.name}__{spec.replace(':', '_').replace('=', '')}"
    if not out.exists():
        print(f"[data] injecting {spec} ...", flush=True)
        inject_fault(clean, spec, out, seed=seed)
    return out


def _trained(dataset: NIHDataset, tag: str, args: argparse.Namespace, epochs: int) -> Bundle:
    from model.train import train_bundle

    ident = f"{tag}_{args.preset}_{args.size}px_e{epochs}_seed{args.seed}_{dataset.manifest_hash()[:12]}"
    path = args.workdir / f"model_{ident}.safetensors"
    if path.exists():
        return load_bundle(path)
    print(f"[train] {tag}: {args.preset} on {len(dataset)} images, {epochs} epochs ...", flush=True)
    start = time.perf_counter()
    bundle, report = train_bundle(dataset, preset=args.preset, image_size=args.size, epochs=epochs, seed=args.seed,
                                  device="cpu")
    print(f"[train] {tag}: {time.perf_counter() - start:.0f} s, holdout mean AUROC {report['val_mean_auroc']:.3f}",
          flush=True)
    save_bundle(bundle, path)
    return bundle


class Audit:
    """An audit set under one model, split patient-disjoint into FIT and VERIFY halves."""

    def __init__(self, bundle: Bundle, dataset: NIHDataset, seed: int) -> None:
        self.bundle, self.dataset = bundle, dataset
        self.features = extract_features(bundle, dataset)
        self.fit_idx, self.verify_idx = patient_disjoint_split(dataset, 0.5, seed)
        self.fit = self.features.subset(self.fit_idx)
        self.verify = self.features.subset(self.verify_idx)
        self.fit_ds = dataset.subset(self.fit_idx)
        self.verify_ds = dataset.subset(self.verify_idx)

    def context(self, fact: IssueFact, params: dict[str, Any], seed: int) -> TreatmentContext:
        return TreatmentContext(bundle=self.bundle, fact=fact, fit=self.fit, fit_dataset=self.fit_ds,
                                params=params, seed=seed)

    def verify_logits(self, result: InterventionResult) -> np.ndarray:
        if result.classifier_only:
            return head_logits(result.bundle, self.verify.features)
        return extract_features(result.bundle, self.verify_ds).logits


# --------------------------------------------------------------------------------------------
# Effects


def _f(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def label_metrics(y: np.ndarray, logits: np.ndarray, thr: float) -> dict[str, Any]:
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    c = confusion_at(y, p, thr)
    return {"auroc": _f(auroc(y, p)), "ece": _f(expected_calibration_error(y, p)), "threshold": float(thr),
            **{k: _f(c[k]) if isinstance(c[k], float) else int(c[k])
               for k in ("tp", "fp", "fn", "sensitivity", "specificity", "precision", "f1")}}


def effect(audit: Audit, result: InterventionResult, label: str, cluster_rows: np.ndarray | None) -> dict[str, Any]:
    k = audit.bundle.labels.index(label)
    y = audit.verify.labels[:, truth_index(label)]
    before, after = audit.verify.logits, audit.verify_logits(result)
    thr0, thr1 = audit.bundle.meta.thresholds[k], result.bundle.meta.thresholds[k]
    out: dict[str, Any] = {"before": label_metrics(y, before[:, k], thr0), "after": label_metrics(y, after[:, k], thr1)}
    if cluster_rows is not None and len(cluster_rows):
        p0, p1 = sigmoid(before[cluster_rows, k].astype(np.float64)), sigmoid(after[cluster_rows, k].astype(np.float64))
        out["cluster_fp"] = {"before": int((p0 >= thr0).sum()), "after": int((p1 >= thr1).sum()),
                             "mean_delta_prob": float((p1 - p0).mean())}
    others = [j for j, name in enumerate(audit.bundle.labels) if j != k and name in CHEXNET_LABELS]
    drops = {}
    for j in others:
        yj = audit.verify.labels[:, truth_index(audit.bundle.labels[j])]
        if 0 < yj.sum() < len(yj):
            drops[audit.bundle.labels[j]] = float(auroc(yj, before[:, j]) - auroc(yj, after[:, j]))
    worst = max(drops, key=drops.get) if drops else None
    out["collateral"] = {"max_other_auroc_drop": drops.get(worst) if worst else None, "worst_label": worst,
                         "other_logits_bit_identical": bool(np.array_equal(before[:, others], after[:, others]))}
    return out


def run_intervention(name: str, audit: Audit, fact: IssueFact, params: dict[str, Any], args: argparse.Namespace,
                     cluster_rows: np.ndarray | None = None) -> dict[str, Any]:
    plugin = get_intervention(name)
    ctx = audit.context(fact, params, args.seed)
    ok, why = plugin.applicable(ctx)
    if not ok:
        return {"applicable": False, "reason": why}
    repeats = args.repeats if name in CLASSIFIER_LEVEL else 1
    times, result = [], None
    for _ in range(repeats):
        try:
            result = plugin.apply(ctx)
        except InterventionError as exc:
            return {"applicable": True, "refused": str(exc)}
        times.append(result.wall_time_s)
    row = {"applicable": True, "wall_time_s_median": statistics.median(times), "wall_times_s": times,
           "classifier_only": result.classifier_only,
           "changes": {k: v for k, v in result.changes.items() if k in (
               "channels", "n_channels", "l2_chosen", "retrained", "thresholds", "epochs_run", "mode", "preset",
               "method", "n_parameters")}}
    row.update(effect(audit, result, fact.label, cluster_rows))
    return row


def _print_row(scenario: str, name: str, row: dict[str, Any]) -> None:
    if not row.get("applicable"):
        print(f"  {scenario:16s} {name:16s} not applicable: {row.get('reason')}")
        return
    if "refused" in row:
        print(f"  {scenario:16s} {name:16s} refused: {row['refused']}")
        return
    b, a = row["before"], row["after"]
    cl = row.get("cluster_fp")
    cl_txt = f" cluster FP {cl['before']}->{cl['after']} (dprob {cl['mean_delta_prob']:+.3f})" if cl else ""
    col = row["collateral"]
    drop = col["max_other_auroc_drop"]

    def pair(key: str, spec: str) -> str:
        """``before->after``; '-' where a metric is undefined (e.g. AUROC with no positives on VERIFY)."""
        return "->".join("-" if m[key] is None else format(m[key], spec) for m in (b, a))

    print(f"  {scenario:16s} {name:16s} {row['wall_time_s_median']:7.2f} s | "
          f"AUROC {pair('auroc', '.3f')} sens {pair('sensitivity', '.2f')} spec {pair('specificity', '.2f')} "
          f"F1 {pair('f1', '.2f')} TP {b['tp']}->{a['tp']}"
          f" FP {b['fp']}->{a['fp']} ECE {pair('ece', '.3f')}{cl_txt} | other AUROC drop "
          f"{'n/a' if drop is None else f'{drop:+.4f}'}"
          f"{' (bit-identical)' if col['other_logits_bit_identical'] else ''}", flush=True)


# --------------------------------------------------------------------------------------------
# Facts


def _monitor_facts(audit: Audit) -> list[IssueFact]:
    from engine.monitors import MonitorContext, run_monitors
    from rules.policy import load_policy

    policy = load_policy(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")
    return list(run_monitors(MonitorContext(audit.bundle, audit.features), policy.monitors))


def _shortcut_fact(audit: Audit, label: str, facts: list[IssueFact]) -> tuple[IssueFact, str]:
    found = [f for f in facts if f.kind == "fp_cluster" and f.label == label]
    if found:
        return found[0], "fp_cluster monitor"
    # The monitor missed it: build the fact a monitor would, from the label's FPs, so the treatments
    # can still be measured (the JSON says which).
    k = audit.bundle.labels.index(label)
    y = audit.features.labels[:, truth_index(label)]
    fp = np.flatnonzero((audit.features.probs[:, k] >= audit.bundle.meta.thresholds[k]) & (y == 0))
    w = audit.bundle.model.classifier.weight.detach().double().numpy()[k]
    c = contributions(audit.features.features, w)
    top = [t["channel"] for t in top_channels(c, fp, 10, against=np.flatnonzero(y == 1))]
    fact = IssueFact(kind="fp_cluster", monitor="bench", label=label, severity="high",
                     message=f"{label}: {len(fp)} false positives (constructed by the benchmark)",
                     evidence={"member_ids": [audit.features.image_names[i] for i in fp], "channels": top})
    return fact, "constructed (the fp_cluster monitor did not fire)"


# --------------------------------------------------------------------------------------------
# Scenarios


def scenario_shortcut(args: argparse.Namespace, clean_root: Path) -> dict[str, Any]:
    label = "Pneumothorax"
    root = _injected(clean_root, f"shortcut:{label}", args.seed)
    bundle = _trained(load_nih_dataset(root, "train_val"), "shortcut", args, args.epochs)
    audit = Audit(bundle, load_nih_dataset(root, "test"), args.seed)
    tubed = {m["image"] for m in json.loads((root / "fault.json").read_text())["modified_images"]
             if m.get("split") == "test" and not m.get("label_positive")}
    cluster_rows = np.array([i for i, n in enumerate(audit.verify.image_names) if n in tubed], dtype=int)
    facts = _monitor_facts(audit)
    fact, source = _shortcut_fact(audit, label, facts)
    out: dict[str, Any] = {"label": label, "fact_source": source, "fact": fact.model_dump(mode="json"),
                           "n_fit": len(audit.fit), "n_verify": len(audit.verify),
                           "n_tubed_negatives_verify": int(len(cluster_rows)), "results": {}}
    out["fact"]["evidence"] = {k: v for k, v in out["fact"]["evidence"].items() if k != "member_ids"}
    names = ["zeroing", "partial_retrain"] + (["augmentation", "full_retrain"] if args.backbone else [])
    for name in names:
        row = run_intervention(name, audit, fact, _params(name, args), args, cluster_rows)
        out["results"][name] = row
        _print_row("shortcut", name, row)
    if args.zeroing_max_channels_sweep:
        out["zeroing_channel_sweep"] = {}
        for cap in args.zeroing_max_channels_sweep:
            row = run_intervention("zeroing", audit, fact, {"max_channels": cap}, args, cluster_rows)
            out["zeroing_channel_sweep"][str(cap)] = row
            _print_row("shortcut", f"zeroing(cap {cap})", row)
    return out


def scenario_scanner_shift(args: argparse.Namespace, clean_root: Path, clean: Bundle) -> dict[str, Any]:
    root = _injected(clean_root, "scanner_shift", args.seed)
    audit = Audit(clean, load_nih_dataset(root, "test"), args.seed)
    facts = [f for f in _monitor_facts(audit) if f.kind == "calibration_drift" and f.label is not None]
    out: dict[str, Any] = {"facts": [f"{f.label} ({f.severity})" for f in facts], "results": {}}
    if not facts:
        print("  scanner_shift: no calibration_drift fact on the shifted test split", flush=True)
        return out
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
    fact = sorted(facts, key=lambda f: (order[f.severity], f.label))[0]
    out["label"] = fact.label
    names = ["threshold", "partial_retrain"] + (["augmentation", "full_retrain"] if args.backbone else [])
    for name in names:
        row = run_intervention(name, audit, fact, _params(name, args), args)
        out["results"][name] = row
        _print_row("scanner_shift", name, row)
    return out


def scenario_recall_collapse(args: argparse.Namespace, clean_root: Path, clean: Bundle) -> dict[str, Any]:
    test = load_nih_dataset(clean_root, "test")
    label = CHEXNET_LABELS[int(np.argmax(test.labels.sum(axis=0)))]
    k = clean.labels.index(label)
    broken = clean.copy()
    with torch.no_grad():
        broken.model.classifier.bias[k] -= args.collapse_shift
    audit = Audit(broken, test, args.seed)
    fact = IssueFact(kind="recall_collapse", monitor="bench", label=label, severity="high",
                     message=f"{label}: bias shifted by -{args.collapse_shift}")
    out: dict[str, Any] = {"label": label, "bias_shift": -args.collapse_shift, "results": {}}
    for name in ("threshold", "partial_retrain"):
        row = run_intervention(name, audit, fact, _params(name, args), args)
        out["results"][name] = row
        _print_row("recall_collapse", name, row)
    return out


def _macro(audit: Audit, logits: np.ndarray, thresholds: list[float], labels: list[int]) -> dict[str, float]:
    f1, rec = [], []
    for k in labels:
        y = audit.verify.labels[:, k]
        c = confusion_at(y, sigmoid(logits[:, k].astype(np.float64)), thresholds[k])
        f1.append(c["f1"])
        rec.append(c["sensitivity"])
    return {"macro_f1": float(np.mean(f1)), "macro_recall": float(np.mean(rec))}


def scenario_operating_point(args: argparse.Namespace, bundle: Bundle, dataset: NIHDataset, tag: str) -> dict[str, Any]:
    audit = Audit(bundle, dataset, args.seed)
    labels = [k for k in range(14) if audit.verify.labels[:, k].sum() > 0 and audit.fit.labels[:, k].sum() > 1]
    fact = IssueFact(kind="recall_collapse", monitor="bench", label=None, severity="high", message="operating point")
    base = _macro(audit, audit.verify.logits, [0.5] * 14, labels)
    out: dict[str, Any] = {"n_fit": len(audit.fit), "n_verify": len(audit.verify),
                           "labels": [CHEXNET_LABELS[k] for k in labels], "threshold_0.5": base}
    youden = get_intervention("threshold").apply(audit.context(fact, {"scope": "all"}, args.seed))
    out["youden_thresholds"] = _macro(audit, audit.verify.logits, youden.bundle.meta.thresholds, labels)
    out["youden_thresholds"]["wall_time_s"] = youden.wall_time_s
    try:
        times, pr = [], None
        for _ in range(args.repeats):
            pr = get_intervention("partial_retrain").apply(audit.context(fact, {"scope": "all", "min_positives": 3},
                                                                          args.seed))
            times.append(pr.wall_time_s)
        logits = head_logits(pr.bundle, audit.verify.features)
        out["partial_retrain"] = _macro(audit, logits, pr.bundle.meta.thresholds, labels)
        yv = audit.verify.labels
        out["partial_retrain"].update(
            wall_time_s_median=statistics.median(times), n_rows_retrained=int(sum(pr.changes["retrained"])),
            mean_auroc_before=float(np.nanmean([auroc(yv[:, k], audit.verify.logits[:, k]) for k in labels])),
            mean_auroc_after=float(np.nanmean([auroc(yv[:, k], logits[:, k]) for k in labels])))
    except InterventionError as exc:
        out["partial_retrain"] = {"refused": str(exc)}
    for key in ("youden_thresholds", "partial_retrain"):
        if "macro_f1" in out[key]:
            out[key]["f1_ratio_vs_0.5"] = _ratio(out[key]["macro_f1"], base["macro_f1"])
            out[key]["recall_ratio_vs_0.5"] = _ratio(out[key]["macro_recall"], base["macro_recall"])
    if "macro_f1" in out.get("partial_retrain", {}):
        out["partial_retrain"]["f1_ratio_vs_youden"] = _ratio(out["partial_retrain"]["macro_f1"],
                                                              out["youden_thresholds"]["macro_f1"])
        out["partial_retrain"]["recall_ratio_vs_youden"] = _ratio(out["partial_retrain"]["macro_recall"],
                                                                  out["youden_thresholds"]["macro_recall"])
    print(f"  {'operating_point':16s} {tag:16s} macro F1/recall on verify ({len(labels)} labels): 0.5 "
          f"{base['macro_f1']:.3f}/{base['macro_recall']:.3f}; Youden {out['youden_thresholds']['macro_f1']:.3f}/"
          f"{out['youden_thresholds']['macro_recall']:.3f}; partial_retrain "
          + (f"{out['partial_retrain']['macro_f1']:.3f}/{out['partial_retrain']['macro_recall']:.3f} "
             f"({out['partial_retrain']['wall_time_s_median']:.2f} s)" if "macro_f1" in out["partial_retrain"]
             else out["partial_retrain"].get("refused", "")), flush=True)
    return out


def scenario_head_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of the classifier-level interventions at DenseNet121's head size (1024 x 14).

    Synthetic pooled features (no backbone): ``--timing-rows`` audit rows split into FIT/VERIFY,
    one label with a planted 5-channel false-positive cluster. Measures cost, not clinical effect.
    """
    from model.bundle import new_bundle
    from model.nets import arch_config, build_model

    rng = np.random.default_rng(args.seed)
    n, f, k = args.timing_rows, 1024, CHEXNET_LABELS.index("Pneumothorax")
    config = arch_config("densenet121")
    model = build_model("densenet", config).eval()
    w = rng.normal(0, 0.02, (14, f))
    w[:, :14 * 8] = 0
    for j in range(14):
        w[j, j * 8:(j + 1) * 8] = 0.6
    artefact = np.arange(900, 905)
    w[k, artefact] = 0.8
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(w).float())
        model.classifier.bias.fill_(-3.0)
    bundle = new_bundle(model, config=config, input_size=224)
    labels = (rng.random((n, 14)) < 0.1).astype(np.uint8)
    feats = np.abs(rng.normal(0.3, 0.2, (n, f)))
    for j in range(14):
        feats[labels[:, j] == 1, j * 8:(j + 1) * 8] += 1.0
    cluster = np.flatnonzero((labels[:, k] == 0) & (rng.random(n) < 0.05))
    feats[np.ix_(cluster, artefact)] += 1.5
    feats = feats.astype(np.float32)
    names = tuple(f"{i:08d}_000.png" for i in range(n))
    pids = np.array([str(i // 2) for i in range(n)], dtype=object)
    fs = FeatureSet(names, pids, labels, feats, head_logits(bundle, feats), bundle.weights_hash(), "timing")
    fit = fs.subset(np.arange(0, n, 2))
    facts = {
        "threshold": IssueFact(kind="calibration_drift", monitor="bench", label="Pneumothorax", severity="high",
                               message="timing"),
        "zeroing": IssueFact(kind="fp_cluster", monitor="bench", label="Pneumothorax", severity="high",
                             message="timing", evidence={"member_ids": [names[i] for i in cluster],
                                                         "channels": artefact.tolist()}),
        "partial_retrain": IssueFact(kind="auroc_drop", monitor="bench", label="Pneumothorax", severity="high",
                                     message="timing"),
    }
    out: dict[str, Any] = {"rows_fit": len(fit), "features": f, "labels": 14}
    runs = [("threshold", {}), ("zeroing", {}), ("partial_retrain", {}), ("partial_retrain", {"scope": "all"})]
    for name, params in runs:
        ctx = TreatmentContext(bundle=bundle, fact=facts[name], fit=fit, fit_dataset=None, params=params,
                               seed=args.seed)
        times = [get_intervention(name).apply(ctx).wall_time_s for _ in range(args.repeats)]
        key = name + ("(scope all)" if params else "")
        out[key] = {"wall_time_s_median": statistics.median(times), "wall_times_s": times}
        print(f"  {'head_timing':16s} {key:27s} {statistics.median(times):7.2f} s on {len(fit)} x {f} cached features"
              f" (paper: {PAPER_COST.get(name, '-')})", flush=True)
    return out


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _params(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "augmentation":
        return {"epochs": args.aug_epochs}
    if name == "full_retrain":
        return {"epochs": args.retrain_epochs}
    if name == "zeroing":
        return {"max_channels": args.zeroing_max_channels}
    return {}


def _nih_split(root: Path, seed: int) -> tuple[NIHDataset, NIHDataset]:
    ds = load_nih_dataset(root, "all")
    train_idx, audit_idx = patient_disjoint_split(ds, 0.4, seed)
    return ds.subset(train_idx, split="bench_train"), ds.subset(audit_idx, split="bench_audit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="phantoms to generate (default 1000)")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    ap.add_argument("--preset", default="small", help="DenseNet preset to train: tiny | small | densenet121")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs of the scenario models (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per classifier-level intervention (median)")
    ap.add_argument("--backbone", action=argparse.BooleanOptionalAction, default=True,
                    help="also run augmentation and full_retrain (default on)")
    ap.add_argument("--aug-epochs", type=int, default=2)
    ap.add_argument("--retrain-epochs", type=int, default=3)
    ap.add_argument("--zeroing-max-channels", type=int, default=10, help="zeroing's channel cap (policy default 10)")
    ap.add_argument("--zeroing-max-channels-sweep", type=int, nargs="*", default=[20, 40],
                    help="extra zeroing runs with these caps on the shortcut scenario")
    ap.add_argument("--collapse-shift", type=float, default=3.0, help="bias shift of the recall-collapse scenario")
    ap.add_argument("--nih", default=str(NIH1000), help="real NIH sample folder, or 'none' to skip")
    ap.add_argument("--nih-epochs", type=int, default=8)
    ap.add_argument("--timing-rows", type=int, default=2000,
                    help="audit rows of the head-timing scenario (half are FIT; default 2000)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-bench-interventions"))
    ap.add_argument("--out", type=Path, default=RESULTS / "interventions.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CXR_TRIAGE_CACHE", str(args.workdir / "cache"))
    start = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paper_cost_matrix": PAPER_COST,
    }
    print("[bench] classifier-level cost at DenseNet121 head size:", flush=True)
    report["head_timing"] = scenario_head_timing(args)
    clean_root = _phantoms(args)
    clean = _trained(load_nih_dataset(clean_root, "train_val"), "clean", args, args.epochs)
    print("[bench] scenarios (effects on the VERIFY half of the audit set):", flush=True)
    report["shortcut"] = scenario_shortcut(args, clean_root)
    report["scanner_shift"] = scenario_scanner_shift(args, clean_root, clean)
    report["recall_collapse"] = scenario_recall_collapse(args, clean_root, clean)
    report["operating_point"] = {"phantoms": scenario_operating_point(args, clean, load_nih_dataset(clean_root, "test"),
                                                                     "phantoms")}
    if args.nih != "none" and Path(args.nih).is_dir():
        train, audit = _nih_split(Path(args.nih), args.seed)
        nih_model = _trained(train, "nih", args, args.nih_epochs)
        report["operating_point"]["nih"] = scenario_operating_point(args, nih_model, audit, "nih")
    report["total_wall_time_s"] = time.perf_counter() - start
    atomic_write_json(args.out, finite_or_none(json.loads(json.dumps(report, default=_json_default))))
    print(f"[bench] {report['total_wall_time_s']:.0f} s; figures in {args.out}", flush=True)
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
