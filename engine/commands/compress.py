"""``cli.py compress``: a physically smaller DenseNet that reproduces its parent (see ``model.compression``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from engine.commands.common import check_out_file, load_model, resolve_split
from engine.console import console, progress_task
from engine.core.errors import DataError
from engine.core.storage import atomic_write_json
from model.bundle import save_bundle
from model.compression import CompressSettings, compress_bundle
from model.data import SPLIT_FILES, load_nih_dataset, read_images
from model.features import to_model_input

__all__ = ["register", "run"]

#: The tolerance mode's defaults (the settings' own).
DEFAULT_AUROC_DROP = CompressSettings.model_fields["max_auroc_drop"].default
DEFAULT_FLIP_RATE = CompressSettings.model_fields["max_flip_rate"].default


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="prune a DenseNet bundle by exact channel elimination + least-squares reconstruction",
        description="Write a physically smaller DenseNet (arch densenet_pruned) that reproduces MODEL on "
        "calibration images: channels that are dead, constant or linearly dependent are removed exactly, then "
        "each convolution reading a concatenation keeps a subset of its inputs and is re-fitted by least "
        "squares to reproduce its original output, layer by layer. The bundle records its parent's hash and a "
        "replayable history. Fidelity (|Δlogit|, per-label ΔAUROC with paired bootstrap CI), parameters, "
        "FLOPs, file size and CPU speed are reported on held-out images.",
        epilog="--target-reduction alone always delivers at least that share of fewer parameters (and "
        "--target-flop-reduction that share of fewer multiply-adds); with --max-auroc-drop/--max-flip-rate/"
        "--max-logit-delta as well, the tolerances win. Without a target the tolerances steer how far to go, "
        "judged with intervals on the held-out calibration part (defaults: --max-auroc-drop 0.001, "
        "--max-flip-rate 0.005). --distill-epochs N then trains the re-fitted network to the parent's "
        "logits (the best held-out epoch kept).",
    )
    p.add_argument("--model", required=True, type=Path, help="DenseNet bundle to compress (.safetensors)")
    p.add_argument("--data", required=True, type=Path, metavar="CALIB",
                   help="calibration dataset in the NIH layout (its labels are used only for held-out checks)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL2", help="output bundle (.safetensors)")
    p.add_argument("--target-reduction", type=float, metavar="R",
                   help="share of parameters to remove, in (0, 1), e.g. 0.5")
    p.add_argument("--target-flop-reduction", type=float, metavar="F",
                   help="share of multiply-adds to remove as well, in (0, 1), e.g. 0.4: the budgets weigh FLOPs "
                   "more until the plan meets it (an error names the most a plan reaches)")
    p.add_argument("--max-auroc-drop", type=float, metavar="A",
                   help="AUROC tolerance on the held-out calibration part: |mean ΔAUROC| <= A and every "
                   "label's |ΔAUROC| <= 5A, failed when the paired-bootstrap interval lies beyond it "
                   "(default 0.001 unless --target-reduction is given alone)")
    p.add_argument("--max-flip-rate", type=float, metavar="P",
                   help="largest share of image-label decisions flipped at the bundle thresholds on the held-out "
                   "part, judged by its Wilson upper bound (default 0.005 unless --target-reduction is given alone)")
    p.add_argument("--max-logit-delta", type=float, metavar="D",
                   help="largest |Δlogit| allowed on the held-out calibration part")
    p.add_argument("--exact-only", action="store_true",
                   help="only remove dead, constant and linearly dependent channels (lossless to float tolerance)")
    p.add_argument("--calib-split", choices=("auto", "all", "train_val", "test"), default="auto",
                   help="calibration rows; 'auto' = train_val when its list exists, else all (default: %(default)s)")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of calibration patients held out for the acceptance checks (default: %(default)s)")
    p.add_argument("--report-split", choices=("auto", "holdout", "test"), default="auto",
                   help="images for the report: 'auto' = the test split when calibrating on train_val and "
                   "test_list.txt exists, else the calibration holdout (default: %(default)s)")
    p.add_argument("--views", type=int, default=None,
                   help="augmented views per calibration image (default: automatic, about 1000 fitted inputs)")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="relative ridge of the re-fits, towards the old weights (default: %(default)s)")
    p.add_argument("--flops-weight", type=float, default=0.5,
                   help="how much saved multiply-adds count against saved parameters when budgets are shared "
                   "out (0: parameters only; 1: equal; default: %(default)s)")
    p.add_argument("--max-passes", type=int, default=6,
                   help="target passes tried when tolerances steer the reduction: a bisection for the largest "
                   "reduction inside them, each pass as fast as one --target-reduction run (default: %(default)s)")
    p.add_argument("--distill-epochs", type=int, default=0,
                   help="epochs of end-to-end distillation to the parent's logits after the re-fits; the best "
                   "held-out epoch is kept, the re-fit itself when none improves (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, augmentation and sampling (default: %(default)s)")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the full report as JSON here")
    p.add_argument("--no-speed", action="store_true", help="skip the CPU latency/throughput measurement")
    p.set_defaults(func=run)


def _fmt(v: Any, spec: str = ",") -> str:
    return "n/a" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    explicit_tol = any(v is not None for v in (args.max_auroc_drop, args.max_logit_delta, args.max_flip_rate))
    if args.target_reduction is not None and not explicit_tol:
        max_auroc = max_flip = None  # a target alone wins: no tolerance is enforced
    else:
        max_auroc = args.max_auroc_drop if args.max_auroc_drop is not None else DEFAULT_AUROC_DROP
        max_flip = args.max_flip_rate if args.max_flip_rate is not None else DEFAULT_FLIP_RATE
    try:
        settings = CompressSettings(
            target_reduction=args.target_reduction,
            target_flop_reduction=args.target_flop_reduction,
            max_auroc_drop=max_auroc,
            max_flip_rate=max_flip,
            max_logit_delta=args.max_logit_delta,
            distill_epochs=args.distill_epochs,
            exact_only=args.exact_only,
            holdout_fraction=args.holdout_fraction,
            seed=args.seed,
            ridge=args.ridge,
            views=args.views,
            max_passes=args.max_passes,
            flops_weight=args.flops_weight,
        )
    except ValueError as exc:
        raise SystemExit(f"cli.py compress: error: {exc}") from exc
    bundle = load_model(args.model)
    split = resolve_split(args.data, args.calib_split, "train_val")
    dataset = load_nih_dataset(args.data, split)
    report_data = None
    use_test = args.report_split == "test" or (
        args.report_split == "auto" and split == "train_val" and (args.data / SPLIT_FILES["test"]).is_file())
    if use_test:
        test = load_nih_dataset(args.data, "test")
        if len(test) == 0:
            raise DataError(f"{args.data}: the test split is empty; use --report-split holdout")
        test, images = read_images(test, bundle.meta.input_size)
        report_data = (to_model_input(images, bundle.meta), test.labels, f"{args.data} test split ({len(test)} images)")
    console.print(f"Compressing [bold]{args.model.name}[/] with {len(dataset)} calibration images of {args.data} "
                  f"(split {split}), seed {args.seed}, {torch.get_num_threads()} CPU thread(s)")
    with progress_task("compressing") as progress:
        result = compress_bundle(bundle, dataset, settings, report_data=report_data, speed=not args.no_speed,
                                 progress=progress)
    digest = save_bundle(result.bundle, args.out)
    rep = result.report
    _print_report(rep, args)
    if args.report:
        atomic_write_json(args.report, {**rep, "out": str(args.out), "out_hash": digest})
        console.print(f"Wrote {args.report}")
    console.print(f"Wrote {args.out} (sha256 {digest[:12]}…, parent {rep['parent_hash'][:12]}…) in "
                  f"{rep['wall_time_s']:.0f} s")
    if rep.get("target_met") is False:
        console.print(f"[yellow]target reduction {settings.target_reduction} not reached within the tolerances "
                      f"(got {rep['ratios']['parameter_reduction']:.3f})[/]")
    return 0


def _print_report(rep: dict[str, Any], args: argparse.Namespace) -> None:
    size, ratios, fid = rep["size"], rep["ratios"], rep["fidelity"]
    t = Table(title=f"{args.model.name} → {args.out.name} ({rep['strategy'].get('mode')})")
    for col in ("", "parent", "compressed", "change"):
        t.add_column(col, justify="left" if not col else "right")
    p, c = size["parent"], size["compressed"]
    t.add_row("parameters", _fmt(p["parameters"]), _fmt(c["parameters"]), f"-{ratios['parameter_reduction']:.1%}")
    t.add_row("FLOPs (conv+linear)", _fmt(p["flops"]), _fmt(c["flops"]), f"-{ratios['flop_reduction']:.1%}")
    t.add_row("file bytes", _fmt(p["file_bytes"]), _fmt(c["file_bytes"]), f"-{ratios['file_size_reduction']:.1%}")
    if "latency_b1_ms" in p:
        t.add_row("CPU latency, batch 1 (ms)", f"{p['latency_b1_ms']:.1f}", f"{c['latency_b1_ms']:.1f}",
                  f"×{ratios['speedup_b1']:.2f}")
        t.add_row("CPU throughput, batch 32 (img/s)", f"{p['throughput_b32_img_s']:.0f}",
                  f"{c['throughput_b32_img_s']:.0f}", f"×{ratios['speedup_b32']:.2f}")
    console.print(t)
    f = Table(title=f"fidelity on {fid['where']}")
    for col in ("label", "pos", "AUROC parent", "AUROC compressed", "Δ", "95% CI (paired bootstrap)"):
        f.add_column(col, justify="left" if col == "label" else "right")
    for name, row in fid["labels"].items():
        if row["delta"] is None:
            f.add_row(name, str(row["positives"]), "n/a", "n/a", "n/a", "n/a")
            continue
        ci = "n/a" if row["ci_low"] is None else f"{row['ci_low']:+.4f} … {row['ci_high']:+.4f}"
        f.add_row(name, str(row["positives"]), f"{row['auroc_ref']:.4f}", f"{row['auroc_new']:.4f}",
                  f"{row['delta']:+.4f}", ci)
    console.print(f)
    mean_d = fid["mean_auroc_delta"]
    console.print(f"|Δlogit|: max {fid['max_abs_dlogit']:.3g}, mean {fid['mean_abs_dlogit']:.3g}; mean AUROC "
                  f"{_fmt(fid['mean_auroc_ref'], '.4f')} → {_fmt(fid['mean_auroc_new'], '.4f')}"
                  + ("" if mean_d is None else f" (Δ {mean_d:+.4f}, worst label |Δ| {fid['max_abs_auroc_delta']:.4f})"))
    ex = rep.get("exact_stage") or {}
    if ex:
        console.print("exact stage: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ex.items()))
    dist = rep.get("distillation")
    if dist:
        curve = dist["holdout_mean_dlogit"]
        console.print(f"distillation: kept epoch {dist['kept_epoch']} of {dist['epochs']}; held-out mean |Δlogit| "
                      f"{curve[0]:.4g} after the re-fits → {curve[dist['kept_epoch']]:.4g}")
    for line in rep.get("log", []):
        console.print(f"  {line}")
