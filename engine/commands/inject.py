"""``cli.py inject``: write a copy of a dataset with a realistic fault and its ground truth (fault.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from engine.commands.common import check_out_folder
from engine.console import console, progress_task
from model.data.faults import FAULT_FILE, FAULT_SYNTAX, inject_fault, parse_fault

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inject",
        help="copy a dataset with an injected fault (scanner shift, shortcut, blur, prevalence, label noise)",
        description="Write a copy of an NIH-layout dataset with a realistic fault, plus fault.json recording "
        "the spec, the seed and exactly which images/rows/labels were changed. Unmodified images are copied "
        "byte for byte; nothing is written outside --out. Same seed, same bytes.",
        epilog="fault specs:\n" + "\n".join(f"  {s}" for s in FAULT_SYNTAX.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="source dataset (NIH layout)")
    p.add_argument("--fault", required=True, metavar="SPEC", help="fault to inject (see the list below)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR2", help="output folder (must be new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = parse_fault(args.fault)  # fail on a bad spec before reading any image
    check_out_folder(args.out)
    with progress_task(f"inject {spec.name}") as progress:
        record = inject_fault(args.data, spec, args.out, seed=args.seed, progress=progress)
    table = Table(title=f"{escape(spec.text)} (seed {args.seed}) → {escape(str(args.out))}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("parameters", escape(", ".join(f"{k}={v}" for k, v in record["params"].items())))
    table.add_row("images written", str(record["n_images"]))
    table.add_row("images modified", str(record["n_modified"]))
    if record["removed_images"]:
        table.add_row("rows removed", str(len(record["removed_images"])))
    if record["label_flips"]:
        table.add_row("labels flipped", str(len(record["label_flips"])))
    table.add_row("affected labels", ", ".join(record["affected_labels"]) or "-")
    table.add_row("expected issues", "; ".join(f"{e['kind']} ({', '.join(e['labels'])})"
                                               for e in record["expected_issues"]))
    console.print(table)
    console.print(f"Ground truth: {escape(str(args.out / FAULT_FILE))}")
    return 0
