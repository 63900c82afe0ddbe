"""``cli.py train``: train a CheXNet-layout DenseNet bundle from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from engine.commands.common import add_data_args, check_out_file, load_data
from engine.console import console, progress_task
from model.bundle import save_bundle
from model.nets import ARCH_PRESETS, count_parameters
from model.train import default_device, train_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a DenseNet bundle (safetensors) on an NIH-layout dataset",
        description="Train a CheXNet-layout DenseNet from scratch on the train_val split (or all images). "
        "A patient-disjoint part is held out for early stopping; Youden-J thresholds and reference "
        "metrics measured on it are stored in the bundle for later monitoring.",
    )
    add_data_args(p, default_split="train_val")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL", help="output bundle (.safetensors)")
    p.add_argument("--arch", choices=sorted(ARCH_PRESETS), default="densenet121",
                   help="architecture preset (default: %(default)s; 'tiny'/'small' for quick tests)")
    p.add_argument("--image-size", type=int, default=64, help="input size in pixels (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="maximum epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of patients held out for early stopping and reference metrics (default: %(default)s)")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default: %(default)s)")
    p.add_argument("--no-augment", action="store_true", help="disable shift/intensity augmentation")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None, help=f"torch device (default: {default_device()})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise SystemExit("cli.py train: error: --epochs must be >= 1")
    check_out_file(args.out)  # before training, not after
    dataset = load_data(args)
    console.print(f"Training [bold]{args.arch}[/] on {len(dataset)} images of {args.data} "
                  f"(split {dataset.split}) at {args.image_size} px, seed {args.seed}")

    def on_epoch(epoch: int, loss: float, val_auroc: float) -> None:
        console.print(f"  epoch {epoch}: train loss {loss:.4f}, validation mean AUROC {val_auroc:.3f}")

    with progress_task("training") as progress:
        bundle, report = train_bundle(
            dataset, preset=args.arch, image_size=args.image_size, epochs=args.epochs, seed=args.seed,
            batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, patience=args.patience,
            augment=not args.no_augment, device=args.device, progress=progress, on_epoch=on_epoch,
        )
    digest = save_bundle(bundle, args.out)
    table = Table(title=f"Reference metrics on the held-out {report['n_val']} images")
    for col in ("label", "positives", "AUROC", "threshold"):
        table.add_column(col, justify="right" if col != "label" else "left")
    for name, row in bundle.meta.reference_metrics.items():
        auc = row.get("auroc")
        table.add_row(name, f"{int(row['positives'] or 0)}", "n/a" if auc is None else f"{auc:.3f}",
                      f"{row['threshold']:.3f}")
    console.print(table)
    console.print(f"Wrote {args.out} ({count_parameters(bundle.model):,} parameters, sha256 {digest[:12]}…); "
                  f"validation mean AUROC {report['val_mean_auroc']:.3f} after {report['epochs_run']} epoch(s)")
    return 0
