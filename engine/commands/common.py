"""Argument helpers shared by the CLI commands (dataset/bundle loading with the documented defaults)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.core.errors import UsageError
from model.bundle import Bundle, load_bundle
from model.data import SPLIT_FILES, NIHDataset, load_nih_dataset

__all__ = ["add_data_args", "check_out_file", "check_out_folder", "load_data", "load_model", "resolve_split"]


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


def _blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (nothing can be created below it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_out_folder(path: Path, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be one before any work starts (not a traceback at the end)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is a file, not a folder; give a new or existing folder")
    blocking = _blocking_ancestor(path)
    if blocking is not None:
        raise UsageError(f"{option} {path}: cannot create a folder there, {blocking} is a file")
    return path


def check_out_file(path: Path, option: str = "--out") -> Path:
    """Refuse an output file path that is a folder (or lies below a file) before any work starts."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file path")
    blocking = _blocking_ancestor(path)
    if blocking is not None:
        raise UsageError(f"{option} {path}: cannot write there, {blocking} is a file")
    return path
