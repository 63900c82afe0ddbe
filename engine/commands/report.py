"""``cli.py report``: a clinical report (JSON + self-contained HTML) per chest X-ray image."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from engine.commands.common import check_out_folder, load_model
from engine.console import console
from engine.reports.clinical import write_report
from model.explain.evidence import CONFIDENT_MARGIN, EXCLUSIVE_JACCARD, check_bundle

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="clinical report per image: findings vs thresholds, channel evidence, Grad-CAM by anatomical region",
        description="For each image: every label's probability against the bundle's operating threshold; for each "
        "positive finding the classifier channels carrying it (w_kc * f_c) and a Grad-CAM heat map with each "
        "anatomical region's share (lung zones, costophrenic angles, cardiac silhouette; lungs located from the "
        f"image, a fixed grid when that fails); a borderline finding (log-odds margin < {CONFIDENT_MARGIN:g}) whose "
        f"label has NIH label Jaccard < {EXCLUSIVE_JACCARD:g} with a confident finding is marked unlikely. Writes "
        "OUT/<image>.json and OUT/<image>.html (figures embedded).",
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle (.safetensors)")
    p.add_argument("--image", required=True, type=Path, action="append", metavar="PNG",
                   help="image file (PNG/JPEG, any size or mode); repeat for several")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--top-channels", type=int, default=5, metavar="N",
                   help="channels listed per positive finding (default: %(default)s)")
    p.set_defaults(func=run, usage_error=p.error)


def run(args: argparse.Namespace) -> int:
    if args.top_channels < 1:
        args.usage_error(f"--top-channels must be >= 1; got {args.top_channels}")
    stems = [p.stem for p in args.image]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        args.usage_error(f"two images share the output name(s) {', '.join(dupes)}; report them into separate --out folders")
    check_out_folder(args.out)
    bundle = load_model(args.model)
    check_bundle(bundle, str(args.model))
    for image in args.image:
        json_path, html_path, rep = write_report(bundle, image, args.out, top_channels=args.top_channels,
                                                 model_path=args.model)
        table = Table(title=f"{image.name}: findings above threshold ({bundle.meta.arch} at "
                      f"{bundle.meta.input_size} px)")
        for col in ("finding", "p", "threshold", "confidence", "top regions of heat"):
            table.add_column(col, justify="right" if col in ("p", "threshold") else "left")
        for f in rep["findings"]:
            if not f["positive"]:
                continue
            heat = rep["gradcam"].get(f["label"], {})
            shares = heat.get("region_shares", {})
            regions = ", ".join(f"{r} {shares[r]:.0%}" for r in heat.get("top_regions", [])[:2])
            conf = f["confidence"] + (" [bold yellow]unlikely[/]" if f["unlikely"] else "")
            table.add_row(f["label"], f"{f['probability']:.3f}", f"{f['threshold']:.3f}", conf, regions)
        if rep["positive_findings"]:
            console.print(table)
        else:
            console.print(f"{image.name}: no label above its operating threshold")
        for note in rep["exclusivity_notes"]:
            console.print(f"  [yellow]note:[/] {note['text']}", highlight=False)
        if rep["regions"]["note"]:
            console.print(f"  [dim]{rep['regions']['note']}[/]", highlight=False)
        console.print(f"Wrote {html_path} and {json_path}")
    return 0

