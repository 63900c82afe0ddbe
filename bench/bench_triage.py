"""Decision latency per issue and end-to-end triage time on 2,000 cached samples (no backbone).

The triage loop's own cost is everything after feature extraction: monitors, the rules engine,
classifier-level treatments, verification on the held-out split, the audit trail and the outputs.
To measure it without the backbone, the script writes a 2,000-image NIH-layout folder (tiny PNGs:
never decoded) and pre-populates the feature cache with DenseNet121-sized pooled features
(1,024-d, 14 labels) that carry each label's signal; the bundle's classifier is fitted to them and
its reference metrics measured, then three labels get a scanner-like logit shift (ranking intact),
so every run finds and treats three calibration drifts. The backbone is never run (asserted).

Usage (from the repository root)::

    python bench/bench_triage.py [--n 2000] [--repeats 5] [--threads 1]

Prints the median (and min/max) of: one ``decide`` call per issue, ``decide`` for all issues at
once, ``run_monitors`` on all rows, and ``run_triage`` end to end (with its stage breakdown).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.audit import AuditStore  # noqa: E402
from engine.triage import run_triage  # noqa: E402
from engine.monitors import MonitorContext, run_monitors  # noqa: E402
from model import features as features_module  # noqa: E402
from model.bundle import new_bundle  # noqa: E402
from model.data import load_nih_dataset  # noqa: E402
from model.features import extract_features, store_features  # noqa: E402
from model.labels import CHEXNET_LABELS  # noqa: E402
from model.nets import arch_config, build_model  # noqa: E402
from model.train import reference_from_holdout  # noqa: E402
from rules.decide import decide  # noqa: E402
from rules.policy import load_policy  # noqa: E402

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
SHIFTED = ("Atelectasis", "Effusion", "Cardiomegaly")
REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, labels: np.ndarray) -> Path:
    """NIH layout with 8x8 placeholder PNGs (the cache serves the features; pixels are never read)."""
    (root / "images").mkdir(parents=True)
    blank = root / "images" / "_blank.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(blank)
    data = blank.read_bytes()
    lines = [HEADER]
    for i, row in enumerate(labels):
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        (root / "images" / name).write_bytes(data)
        found = "|".join(CHEXNET_LABELS[k] for k in np.flatnonzero(row)) or "No Finding"
        lines.append(f"{name},{found},{i % 2},{i // 2 + 1},50,M,PA,8,8,0.1,0.1")
    blank.unlink()
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root


def label_directions(n_labels: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Each label lifts ~5 % of the channels (sparse, non-negative), like a finding's channels."""
    return np.abs(rng.normal(0, 1, size=(n_labels, dim))) * (rng.random((n_labels, dim)) < 0.05)


def synthetic_features(labels: np.ndarray, directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Non-negative pooled-feature-like vectors (AUROC about 0.8-0.93 per label with a linear head)."""
    base = rng.gamma(2.0, 0.25, size=(len(labels), directions.shape[1]))
    return np.maximum(base + labels @ directions * 0.1, 0).astype(np.float32)


def fit_head(weight_out: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> None:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    gram = z.T @ z + 100.0 * np.eye(z.shape[1])
    coef = np.linalg.solve(gram, z.T @ (4.0 * y - 2.0))  # (dim+1, 14)
    with torch.no_grad():
        weight_out.weight.copy_(torch.from_numpy((coef[:-1] / sd[:, None]).T).float())
        weight_out.bias.copy_(torch.from_numpy(coef[-1] - (coef[:-1] * (mu / sd)[:, None]).sum(0)).float())


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1e3:9.1f} ms  (min {min(values) * 1e3:.1f}, "
            f"max {max(values) * 1e3:.1f}, n={len(values)})")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench_triage_"))
    try:
        return _bench(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(work: Path) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--policy", type=Path, default=REPO / "policies" / "default.yaml")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["CXR_TRIAGE_CACHE"] = str(work / "cache")
    rng = np.random.default_rng(0)
    prevalence = rng.uniform(0.08, 0.3, size=14)
    labels = (rng.random((args.n, 14)) < prevalence).astype(np.uint8)

    # A DenseNet121-layout bundle: only its classifier (1024 -> 14) is ever used here.
    config = arch_config("densenet121")
    torch.manual_seed(0)
    bundle = new_bundle(build_model("densenet", config), config=config, input_size=64)
    dim = bundle.model.classifier.in_features
    directions = label_directions(14, dim, np.random.default_rng(1))
    ref_labels = (rng.random((args.n, 14)) < prevalence).astype(np.uint8)
    fit_head(bundle.model.classifier, synthetic_features(ref_labels, directions, np.random.default_rng(2)), ref_labels)
    feats = synthetic_features(labels, directions, np.random.default_rng(3))
    with torch.no_grad():
        logits = bundle.model.classifier(torch.from_numpy(feats)).numpy()
    bundle = reference_from_holdout(bundle, labels, logits)  # reference = the site before the shift
    with torch.no_grad():
        for name in SHIFTED:
            bundle.model.classifier.bias[CHEXNET_LABELS.index(name)] += 1.5
        logits = bundle.model.classifier(torch.from_numpy(feats)).numpy()

    dataset = load_nih_dataset(write_folder(work / "data", labels))
    store_features(bundle.weights_hash(), dataset, feats, logits)

    def no_backbone(*a, **k):  # the point of the benchmark
        raise AssertionError("the backbone ran: the feature cache was not used")

    features_module.compute_features = no_backbone
    policy = load_policy(args.policy)
    data = extract_features(bundle, dataset)

    monitor_times, facts = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        facts = run_monitors(MonitorContext(bundle, data), policy.monitors)
        monitor_times.append(time.perf_counter() - t)
    actionable = [f for f in facts if f.actionable]
    per_issue, batch = [], []
    for r in range(args.repeats):
        for i, fact in enumerate(actionable):
            t = time.perf_counter()
            decide([fact], policy, run_id=f"bench-{r}-{i}")
            per_issue.append(time.perf_counter() - t)
        t = time.perf_counter()
        decide(actionable, policy, run_id=f"bench-batch-{r}")
        batch.append(time.perf_counter() - t)

    e2e, last = [], None
    for r in range(args.repeats):
        with AuditStore(work / "audit.db") as audit:
            t = time.perf_counter()
            last = run_triage(bundle, dataset, policy, seed=0, audit=audit, out_dir=work / f"run{r}")
            e2e.append(time.perf_counter() - t)
    assert last is not None
    stages = {}
    with AuditStore(work / "audit.db") as audit:
        finished = [rec for rec in audit.records(last.run_id) if rec.kind == "run_finished"][-1]
        stages = finished.payload["wall_times_s"]

    print(f"triage benchmark: {args.n} cached samples, {dim}-d features, 14 labels, torch threads {args.threads}")
    print(f"facts: {len(facts)} ({len(actionable)} actionable: "
          + ", ".join(f"{f.kind}/{f.label}" for f in actionable) + ")")
    print(f"run_monitors (all rows)      {summary(monitor_times)}")
    print(f"decide, one issue            {summary(per_issue)}")
    print(f"decide, {len(actionable)} issues at once     {summary(batch)}")
    print(f"run_triage end to end        {summary(e2e)}")
    print(f"  outcome {last.outcome} (exit {last.exit_code}); treatments: "
          + ", ".join(f"{t['label']}:{t['intervention'] or t['outcome']}" for t in last.decision["treatments"]))
    print("  stages of the last run (s): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "n": args.n, "threads": args.threads, "monitors_s": monitor_times, "decide_one_issue_s": per_issue,
            "decide_batch_s": batch, "triage_s": e2e, "stages_s": stages, "outcome": last.outcome,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
