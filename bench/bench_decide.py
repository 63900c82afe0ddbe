#!/usr/bin/env python3
"""Decision latency: durable-rules candidates + selection, per issue fact.

Builds ``--facts`` actionable facts of every kind (varying positives, channels, AUROC so that
conditions pass and fail), then times ``rules.decide.decide`` over all of them ``--repeats``
times and reports the median per call and per fact. The first call (which registers the
policy's ruleset) is reported separately.

    python bench/bench_decide.py --policy policies/default.yaml --facts 100 --repeats 15 [--json decide.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.facts import IssueFact  # noqa: E402
from engine.core.storage import atomic_write_json  # noqa: E402
from model.labels import CHEXNET_LABELS  # noqa: E402
from rules.decide import decide  # noqa: E402
from rules.policy import load_policy  # noqa: E402


def make_facts(n: int) -> list[IssueFact]:
    facts = []
    for i in range(n):
        label = CHEXNET_LABELS[i % len(CHEXNET_LABELS)]
        kind = ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop", "compression_fidelity")[i % 5]
        facts.append(IssueFact(
            kind=kind, monitor=kind, label=None if kind == "compression_fidelity" else label, severity="medium",
            message=f"bench fact {i}",
            measured={"auroc": 0.6 + (i % 30) / 100, "positives": i % 25, "auroc_intact": i % 3 != 0},
            reference={"auroc": 0.85},
            evidence={"n_channels_needed": i % 16},
        ))
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=Path, default=Path(__file__).resolve().parents[1] / "policies" / "default.yaml")
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    policy = load_policy(args.policy)
    facts = make_facts(args.facts)
    context = {"has_compression_history": True}

    start = time.perf_counter()
    first = decide(facts, policy, run_id="bench-0", context=context)
    first_s = time.perf_counter() - start

    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        out = decide(facts, policy, run_id=f"bench-{r + 1}", context=context)
        times.append(time.perf_counter() - start)
        assert [d.to_dict() for d in out] == [d.to_dict() for d in first], "decisions changed between runs"

    med = statistics.median(times)
    n_cand = sum(len(d.candidates) for d in first)
    chosen = {}
    for d in first:
        key = d.chosen.intervention if d.chosen else "escalate"
        chosen[key] = chosen.get(key, 0) + 1
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    print(f"policy {policy.name} ({policy.content_hash[:12]}), {len(facts)} facts, {n_cand} candidates, "
          f"choices {dict(sorted(chosen.items()))}")
    print(f"first call (registers the ruleset): {first_s * 1e3:.1f} ms")
    print(f"median of {args.repeats} calls: {med * 1e3:.1f} ms per call, {med / len(facts) * 1e3:.3f} ms per fact "
          f"(min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms)")
    if args.json:
        atomic_write_json(args.json, {
            "policy": policy.name, "policy_hash": policy.content_hash, "facts": len(facts), "candidates": n_cand,
            "choices": dict(sorted(chosen.items())), "repeats": args.repeats, "first_call_s": first_s,
            "median_call_s": med, "median_per_fact_s": med / len(facts), "min_call_s": min(times),
            "max_call_s": max(times), "calls_s": times,
            "environment": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        })
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
