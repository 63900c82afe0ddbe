"""``cli.py monitor``: run every monitor on a labelled dataset and report the issue facts.

A reporting command: it exits 0 whether or not issues were found (``triage`` is the one that acts
and signals "needs approval"). Facts go to a JSON file (``--json``) and a table on the terminal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from engine.commands.common import add_data_args, load_data, load_model
from engine.console import console, err_console, progress_task
from engine.core.errors import BundleError, PolicyError
from engine.core.facts import IssueFact
from engine.monitors import MonitorConfig, MonitorContext, available_monitors, run_monitors
from engine.core.storage import atomic_write_json
from model.data import SPLIT_FILES, load_nih_dataset
from model.features import extract_features
from rules.policy import load_policy

__all__ = ["register", "run", "load_monitor_config", "facts_document"]

_SEVERITY_STYLE = {"info": "dim", "low": "cyan", "medium": "yellow", "high": "bold red", "critical": "bold white on red"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="run the diagnostic monitors on a labelled dataset and report issue facts (no changes made)",
        description="Extract (or reuse cached) pooled features and logits of the dataset under the model, run "
        "every monitor (calibration drift, FP clusters, recall collapse, AUROC drop, compression fidelity, "
        "prevalence shift, input drift) against the bundle's reference metrics and thresholds, and write the "
        "issue facts. Thresholds come from the policy's 'monitors:' section. Exit status 0 whether or not "
        "issues were found.",
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle (.safetensors)")
    add_data_args(p, default_split="test")
    p.add_argument("--policy", type=Path, metavar="P",
                   help="policy YAML whose 'monitors:' section sets the thresholds (default: built-in defaults)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the facts (with fact ids) as JSON here")
    p.add_argument("--parent", type=Path, metavar="BUNDLE",
                   help="the compressed model's parent bundle, for the compression-fidelity monitor")
    p.add_argument("--reference-data", type=Path, metavar="DIR",
                   help="dataset whose features are the input-drift reference (e.g. the training folder)")
    p.add_argument("--reference-split", choices=("auto", "all", "train_val", "test"), default="auto",
                   help="rows of --reference-data to use; 'auto' = train_val when listed, else all "
                   "(default: %(default)s)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute features instead of reading/writing the feature cache")
    p.add_argument("--monitors", metavar="NAMES",
                   help=f"comma-separated subset of: {', '.join(available_monitors())} (validity always runs)")
    p.set_defaults(func=run)


def load_monitor_config(path: Path | None) -> MonitorConfig:
    """The policy's ``monitors`` section (built-in defaults without a policy)."""
    if path is None:
        return MonitorConfig()
    return load_policy(path).monitors


def facts_document(facts: list[IssueFact], **meta: Any) -> dict[str, Any]:
    """JSON form: each fact's ``model_dump`` plus its ``fact_id`` (the loop's decision.json uses the same)."""
    return {**meta, "n_facts": len(facts), "n_actionable": sum(f.actionable for f in facts),
            "facts": [{**f.model_dump(mode="json"), "fact_id": f.fact_id} for f in facts]}


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _figures(fact: IssueFact) -> str:
    """'measured vs reference' for the keys both sides share (else the first measured values)."""
    common = [k for k in fact.measured if k in fact.reference][:2]
    if common:
        return "; ".join(f"{k} {_fmt(fact.measured[k])} vs {_fmt(fact.reference[k])}" for k in common)
    return "; ".join(f"{k} {_fmt(v)}" for k, v in list(fact.measured.items())[:2])


def _reference_split(root: Path, split: str) -> str:
    if split != "auto":
        return split
    return "train_val" if (root / SPLIT_FILES["train_val"]).is_file() else "all"


def run(args: argparse.Namespace) -> int:
    config = load_monitor_config(args.policy)
    names = None
    if args.monitors:
        names = [n.strip() for n in args.monitors.split(",") if n.strip()]
        unknown = [n for n in names if n not in available_monitors()]
        if unknown:
            raise PolicyError(f"--monitors: unknown monitor(s) {unknown}; expected from {', '.join(available_monitors())}")
    bundle = load_model(args.model)
    dataset = load_data(args)
    with progress_task("features", total=len(dataset)) as progress:
        data = extract_features(bundle, dataset, use_cache=not args.no_cache, skip_bad=args.skip_bad,
                                progress=progress)

    parent = parent_data = None
    if args.parent is not None:
        parent = load_model(args.parent)
        recorded = bundle.meta.parent_hash
        if recorded is not None and parent.content_hash() != recorded:
            raise BundleError(f"--parent {args.parent}: content hash {parent.content_hash()[:16]}... does not match "
                              f"the parent_hash {recorded[:16]}... recorded in {args.model}")
        if recorded is None:
            err_console.print(f"[yellow]note:[/] {escape(str(args.model))} records no parent; comparing with "
                              f"{escape(str(args.parent))} anyway")
        with progress_task("parent features", total=len(dataset)) as progress:
            parent_data = extract_features(parent, dataset, use_cache=not args.no_cache, skip_bad=args.skip_bad,
                                           progress=progress)

    reference = reference_source = None
    if args.reference_data is not None:
        ref_ds = load_nih_dataset(args.reference_data, _reference_split(args.reference_data, args.reference_split),
                                  skip_bad=args.skip_bad)
        with progress_task("reference features", total=len(ref_ds)) as progress:
            reference = extract_features(bundle, ref_ds, use_cache=not args.no_cache, skip_bad=args.skip_bad,
                                         progress=progress).features
        is_training = ref_ds.manifest_hash() == bundle.meta.train_manifest_hash
        reference_source = (f"{args.reference_data} (split {ref_ds.split}, {len(ref_ds)} images"
                            f"{', the training set' if is_training else ''})")

    ctx = MonitorContext(bundle, data, parent=parent, parent_data=parent_data,
                         reference_features=reference, reference_source=reference_source)
    facts = run_monitors(ctx, config, names)

    table = Table(title=f"{args.model.name} on {args.data} (split {dataset.split}, {len(data)} images): "
                        f"{len(facts)} fact(s), {sum(f.actionable for f in facts)} actionable")
    table.add_column("kind", no_wrap=True)
    table.add_column("label", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("measured vs reference", overflow="fold", ratio=1)
    table.add_column("message", overflow="fold", ratio=2)
    for f in facts:
        style = _SEVERITY_STYLE.get(f.severity, "")
        table.add_row(f.kind, f.label or "(model)", f"[{style}]{f.severity}[/]" if style else f.severity,
                      escape(_figures(f)), escape(f.message))
    console.print(table)
    if not any(f.actionable for f in facts):
        console.print("[green]no actionable issues[/]")
    if args.json:
        doc = facts_document(
            facts,
            model=str(args.model), model_hash=bundle.content_hash(), data=str(args.data), split=dataset.split,
            n_images=len(data), manifest_hash=dataset.manifest_hash(),
            skipped=len(dataset.skipped) + len(dataset) - len(data),
            policy=str(args.policy) if args.policy else None, monitors=names or list(available_monitors()),
            monitor_config=config.model_dump(mode="json"),
            parent=str(args.parent) if args.parent else None, reference=reference_source,
        )
        atomic_write_json(args.json, doc)
        console.print(f"Wrote {args.json}")
    return 0
