"""Argument helpers shared by the CLI commands (dataset/bundle loading with the documented defaults)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.bundle import Bundle, load_bundle
from model.data import SPLIT_FILES, NIHDataset, load_nih_dataset

__all__ = ["add_data_args", "resolve_split", "load_data", "load_model"]


def add_data_args(parser: argparse.ArgumentParser, *, default_split: str) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="dataset folder in the NIH ChestX-ray14 layout (CSV + images/ [+ split lists])")
    parser.add_argument("--split", choices=("auto", "all", "train_val", "test"), default="auto",
                        help=f"rows to use; 'auto' = {default_split} when its list file exists, else all "
                        "(default: %(default)s)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable rows/images (counted in the output) instead of stopping")
    parser.set_defaults(default_split=default_split)


def resolve_split(data: Path, split: str, default_split: str) -> str:
    if split != "auto":
        return split
    return default_split if (data / SPLIT_FILES[default_split]).is_file() else "all"


def load_data(args: argparse.Namespace) -> NIHDataset:
    return load_nih_dataset(args.data, resolve_split(args.data, args.split, args.default_split),
                            skip_bad=args.skip_bad)


def load_model(path: Path) -> Bundle:
    return load_bundle(path)
