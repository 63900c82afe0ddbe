"""``cli.py evaluate``: per-label metrics of a bundle on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from engine.commands.common import add_data_args, check_out_file, load_data, load_model
from engine.console import console, progress_task
from engine.core.storage import atomic_write_json
from model.evaluate import evaluate_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-label AUROC (95%% CI), AUPRC, ECE, sensitivity/specificity at the bundle thresholds",
        description="Evaluate a bundle on a dataset. Features are cached per (model, data) so later "
        "commands do not run the backbone again.",
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle (.safetensors)")
    add_data_args(p, default_split="test")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the metrics as JSON here")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--write-reference", type=Path, metavar="MODEL2",
                   help="write a copy of the bundle whose reference metrics and Youden-J thresholds are measured "
                   "on this data (for an imported checkpoint: the baseline later monitoring compares against)")
    p.set_defaults(func=run)


def _fmt(value: float | None, spec: str = ".3f", reason: str | None = None) -> str:
    """A number, or ``n/a (reason)`` for a value that cannot be estimated (the JSON's ``<name>_reason``)."""
    if value is None:
        return f"n/a ({reason})" if reason else "n/a"
    return format(value, spec)


def _cell(row: dict, key: str, spec: str = ".3f") -> str:
    return _fmt(row.get(key), spec, row.get(f"{key}_reason"))


def run(args: argparse.Namespace) -> int:
    for option, path in (("--json", args.json), ("--write-reference", args.write_reference)):
        if path is not None:
            check_out_file(path, option)
    bundle = load_model(args.model)
    dataset = load_data(args)
    with progress_task("features") as progress:
        result = evaluate_bundle(bundle, dataset, n_boot=args.n_boot, seed=args.seed, skip_bad=args.skip_bad,
                                 progress=progress)
    s = result["summary"]
    table = Table(title=f"{args.model.name} on {args.data} (split {dataset.split}, {s['n_images']} images)")
    for col in ("label", "pos", "AUROC", "95% CI", "AUPRC", "ECE", "cal. slope", "thr", "sens", "spec"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for name, row in result["labels"].items():
        ci = (_fmt(None, reason=row.get("auroc_ci_low_reason")) if row["auroc_ci_low"] is None
              else f"{row['auroc_ci_low']:.2f}–{row['auroc_ci_high']:.2f}")
        table.add_row(name, str(row["positives"]), _cell(row, "auroc"), ci, _cell(row, "auprc"), _cell(row, "ece"),
                      _cell(row, "calibration_slope", ".2f"), _cell(row, "threshold"),
                      _cell(row, "sensitivity", ".2f"), _cell(row, "specificity", ".2f"))
    console.print(table)
    if s["mean_auroc_ci_low"] is not None:
        ci = f" (95% CI {s['mean_auroc_ci_low']:.3f}–{s['mean_auroc_ci_high']:.3f})"
    else:
        ci = f" (95% CI n/a: {s['mean_auroc_ci_low_reason']})" if s.get("mean_auroc_ci_low_reason") else ""
    console.print(f"mean AUROC over {s['labels_with_positives']} labels with positives: "
                  f"[bold]{_fmt(s['mean_auroc'], reason=s.get('mean_auroc_reason'))}[/]{ci}")
    if s["skipped"]:
        console.print(f"[yellow]skipped {len(s['skipped'])} unreadable row(s)/image(s)[/]")
    if args.json:
        atomic_write_json(args.json, result)
        console.print(f"Wrote {args.json}")
    if args.write_reference:
        from model.bundle import save_bundle
        from model.features import extract_features
        from model.train import reference_from_holdout

        fs = extract_features(bundle, dataset, skip_bad=args.skip_bad)
        referenced = reference_from_holdout(bundle, fs.labels, fs.logits)
        referenced = referenced.with_meta(parent_hash=bundle.content_hash(), history=[
            *bundle.meta.history,
            {"op": "set_reference", "data_manifest_hash": fs.manifest_hash, "split": dataset.split}])
        digest = save_bundle(referenced, args.write_reference)
        console.print(f"Wrote {args.write_reference} with reference metrics and thresholds from this data "
                      f"(sha256 {digest[:12]}…)")
    return 0
