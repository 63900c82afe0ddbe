"""``cli.py analyze channels``: polarized classifier channels judged by label co-occurrence."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from engine.commands.common import load_model
from engine.console import console, progress_task
from engine.core.errors import BundleError, DataError
from engine.core.storage import atomic_write_json
from model.data import load_nih_dataset
from model.explain.channels import CATEGORIES, LabelStats, analyze_channels
from model.explain.evidence import check_bundle

__all__ = ["register", "run_channels"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="mechanistic analyses of a bundle (polarized classifier channels and label Jaccard)",
        description="Mechanistic analyses of a model bundle.",
    )
    inner = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    c = inner.add_parser(
        "channels",
        help="polarized classifier channels and the label Jaccard of what they separate",
        description="Find classifier channels with strong positive weight for some labels and strong negative "
        "weight for others (strong: |w_kc| above the P-th percentile of the label's row |w_k.|), and judge each "
        "by the image-set Jaccard between its positive and negative label sets: Perfect (J = 0), Legitimate "
        "(J < 0.1), Mixed (0.1 <= J < 0.3), Conflict (J >= 0.3). The label source is always printed: small "
        "samples show exclusivity that the full NIH table (--nih-labels) does not.",
    )
    c.add_argument("--model", required=True, type=Path, help="model bundle (.safetensors)")
    c.add_argument("--data", type=Path, metavar="DIR",
                   help="NIH-layout dataset whose labels are the default label source")
    c.add_argument("--split", choices=("all", "train_val", "test"), default="all",
                   help="rows of --data / --labels-from to count (default: %(default)s)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--labels-from", type=Path, metavar="DIR2",
                     help="count label co-occurrence in this NIH-layout dataset instead of --data")
    src.add_argument("--nih-labels", type=Path, metavar="CSV",
                     help="count label co-occurrence in an NIH label CSV (.csv or .csv.gz; no images needed), "
                     "e.g. ../shared/data/nih_labels/Data_Entry_2017_v2020.csv.gz")
    c.add_argument("--percentile", type=float, default=90.0,
                   help="strong-weight percentile P of each label's |weights| (default: %(default)s)")
    c.add_argument("--top", type=int, default=None, metavar="N",
                   help="list only the N highest-scoring polarized channels (default: all)")
    c.add_argument("--activations", action="store_true",
                   help="also report each channel's mean pooled activation on --data (runs the backbone once)")
    c.add_argument("--json", type=Path, metavar="OUT", help="write the analysis as JSON here")
    c.set_defaults(func=run_channels, usage_error=c.error)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _label_source(args: argparse.Namespace) -> LabelStats:
    if args.nih_labels is not None:
        return LabelStats.from_nih_csv(args.nih_labels)
    folder = args.labels_from or args.data
    if folder is None:
        args.usage_error("give --data DIR, --labels-from DIR2 or --nih-labels CSV as the label source")
    return LabelStats.from_dataset(load_nih_dataset(folder, args.split))


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def run_channels(args: argparse.Namespace) -> int:
    if not 0 < args.percentile < 100:
        args.usage_error(f"--percentile must be in (0, 100); got {args.percentile}")
    if args.top is not None and args.top < 1:
        args.usage_error(f"--top must be >= 1; got {args.top}")
    if args.activations and args.data is None:
        args.usage_error("--activations needs --data")
    bundle = load_model(args.model)
    check_bundle(bundle, str(args.model))
    stats = _label_source(args)
    labels = list(bundle.meta.labels)
    unknown = [x for x in labels if x not in stats.labels]
    if len(unknown) == len(labels):
        raise DataError(f"{stats.source}: none of the model's labels ({', '.join(labels[:4])} ...) occur in the "
                        "label source")
    mean_act = None
    if args.activations:
        from model.features import extract_features

        data = load_nih_dataset(args.data, args.split)
        with progress_task("features") as progress:
            fs = extract_features(bundle, data, progress=progress)
        mean_act = fs.features.mean(axis=0)
    weight = bundle.model.classifier.weight.detach().cpu().double().numpy()
    try:
        result = analyze_channels(weight, labels, stats, percentile=args.percentile, top=args.top,
                                  mean_activation=mean_act)
    except ValueError as exc:
        raise BundleError(f"{args.model}: {exc}") from exc

    table = Table(title=f"Polarized channels of {args.model.name} (strong: > P{args.percentile:g} of each label's "
                  f"|w|; {result.n_polarized} of {result.n_channels} channels)")
    for col in ("ch", "score", "votes for (w)", "votes against (w)", "J", "both/either", "category"):
        table.add_column(col, justify="left" if col.startswith("votes") or col == "category" else "right",
                         no_wrap=not col.startswith("votes"))
    if mean_act is not None:
        table.add_column("mean act.", justify="right")
    colour = {"Perfect": "green", "Legitimate": "cyan", "Mixed": "yellow", "Conflict": "red", "Undetermined": "dim"}
    for ch in result.channels:
        row = [str(ch.channel), f"{ch.score:.2f}",
               ", ".join(f"{x} {ch.weights[x]:+.2f}" for x in ch.positive),
               ", ".join(f"{x} {ch.weights[x]:+.2f}" for x in ch.negative),
               _fmt(ch.jaccard), f"{ch.images_both}/{ch.images_either}",
               f"[{colour[ch.category]}]{ch.category}[/]"]
        if mean_act is not None:
            row.append(_fmt(ch.mean_activation, ".3f"))
        table.add_row(*row)
    console.print(table)
    counts = result.category_counts
    console.print("categories: " + ", ".join(f"{c} {counts[c]}" for c in CATEGORIES if counts[c] or c != "Undetermined")
                  + f" (of {len(result.channels)} listed)")
    console.print(f"Label Jaccard from: [bold]{stats.source}[/]", highlight=False)
    if unknown:
        console.print(f"[yellow]labels without statistics in that source: {', '.join(unknown)}[/]")
    if args.json:
        out = result.to_dict()
        out["model"] = {"path": str(args.model), "content_hash": bundle.content_hash()}
        atomic_write_json(args.json, out)
        console.print(f"Wrote {args.json}")
    return 0

