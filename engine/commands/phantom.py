"""``cli.py phantom``: write a phantom dataset in the NIH ChestX-ray14 layout (the embedded default data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands.common import check_out_folder
from engine.console import console, progress_task


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="generate procedurally rendered chest X-ray phantoms in the NIH layout",
        description="Write N phantom radiographs (PNG) with labels sampled from the real NIH ChestX-ray14 "
        "joint label distribution, patients with follow-ups, and a patient-disjoint "
        "train_val/test split. Same seed, same bytes.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (must be empty or new)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of patients in test_list.txt (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.data.phantom import generate_phantoms

    check_out_folder(args.out)
    with progress_task("phantoms", total=args.n) as progress:
        # bad arguments raise DataError (exit 1, no traceback) from generate_phantoms itself
        out = generate_phantoms(args.out, args.n, size=args.size, seed=args.seed,
                                test_fraction=args.test_fraction, progress=progress)
    console.print(f"Wrote {args.n} phantom images ({args.size} px, seed {args.seed}) to {out}")
    return 0
