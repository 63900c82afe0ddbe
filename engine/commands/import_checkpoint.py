"""``cli.py import``: turn a foreign DenseNet121 checkpoint (CheXNet ``model.pth.tar``, a torchvision or
torchxrayvision state dict) into a bundle, printing every key rename it needed and the next step."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from engine.commands.common import check_out_file
from engine.console import console
from model.bundle import save_bundle
from model.checkpoint import LAYOUTS, import_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a CheXNet / torchvision / torchxrayvision DenseNet121 checkpoint as a bundle",
        description="Load a DenseNet121 checkpoint with torch.load(weights_only=True) (data, never code) or as a "
        "safetensors state dict, rename its keys to torchvision's (module./densenet121. prefixes, legacy "
        "norm.1 keys, a classifier.0 head), report each rename with a count and an example, refuse a "
        "checkpoint that is not a 14- (CheXNet) or 18-output (torchxrayvision) DenseNet121 naming the layer, "
        "and write a bundle. Its thresholds are 0.5 and it has no reference metrics until "
        "`evaluate --write-reference` measures them on your data.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                   help="checkpoint (.pth.tar, .pth, .pt or a safetensors state dict; recognised by content)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="expected layout: chexnet = 14 outputs, xrv = 18 outputs, torchvision = torchvision's key "
                   "names with no renaming needed; auto reads it off the weights (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=224, metavar="PX",
                   help="input size the model is run at (default: %(default)s, as CheXNet)")
    p.add_argument("--out", required=True, type=Path, metavar="BUNDLE", help="output bundle (.safetensors)")
    p.set_defaults(func=run, usage_error=p.error)


def run(args: argparse.Namespace) -> int:
    if args.input_size < 1:
        args.usage_error(f"--input-size must be >= 1; got {args.input_size}")
    check_out_file(args.out)
    result = import_checkpoint(args.checkpoint, layout=args.layout, input_size=args.input_size)
    meta = result.bundle.meta
    console.print(f"Read {escape(str(args.checkpoint))}: {result.container}, layout {result.layout} "
                  f"({len(meta.labels)} labels, {meta.in_channels} input channel(s)), run at {meta.input_size} px")
    if result.remaps:
        table = Table(title="Keys renamed")
        for col in ("rule", "keys", "example"):
            table.add_column(col, justify="right" if col == "keys" else "left")
        for remap in result.remaps:
            table.add_row(escape(remap.rule), str(remap.count), escape(f"{remap.example[0]} -> {remap.example[1]}"))
        console.print(table)
    else:
        console.print("Keys already in torchvision's naming: nothing renamed")
    if result.added_buffers:
        console.print(f"Added {result.added_buffers} BatchNorm num_batches_tracked buffer(s) the checkpoint predates "
                      "(unused in evaluation)")
    console.print("All keys and shapes match DenseNet121: no missing, unexpected or mismatched keys")
    digest = save_bundle(result.bundle, args.out)
    console.print(f"Wrote {escape(str(args.out))} (sha256 {digest[:12]}…)")
    console.print("Next: measure its reference metrics and thresholds on your accepted validation data:\n"
                  f"  python cli.py evaluate --model {escape(str(args.out))} --data DATA --split test "
                  "--write-reference SITE.safetensors")
    return 0
