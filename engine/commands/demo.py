"""``cli.py demo``: the whole story on embedded phantom data, with cached steps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from engine.console import console, progress_task
from engine.demo import FULL, QUICK, DemoConfig, Step, file_digest, run_step
from engine.storage import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on embedded phantom data: phantoms -> train -> evaluate -> ... (cached)",
        description="Generate phantoms, train a DenseNet, evaluate it, and run the later stages that are "
        "installed. Steps are cached by content: a second run reuses data and models.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small and fast ({QUICK.n_phantoms} images, {QUICK.image_size} px, '{QUICK.preset}' "
                   "model): what CI smoke-tests")
    p.set_defaults(func=run)


def _announce(name: str, reused: bool, seconds: float) -> None:
    state = "[dim]reused[/]" if reused else f"done in {seconds:.1f} s"
    console.print(f"[bold cyan]▸ {name}[/] {state}")


def run(args: argparse.Namespace) -> int:
    cfg: DemoConfig = QUICK if args.quick else FULL
    out: Path = args.out
    stamps = out / ".stamps"
    summary: dict[str, Any] = {"config": cfg.__dict__, "outputs": {}}
    started = time.perf_counter()

    from model.phantom import generate_phantoms

    data = out / "data" / "phantoms"

    def make_phantoms() -> dict:
        if data.exists():
            import shutil

            shutil.rmtree(data)
        with progress_task("phantoms", total=cfg.n_phantoms) as progress:
            generate_phantoms(data, cfg.n_phantoms, size=cfg.image_size, seed=cfg.seed, progress=progress)
        return {}

    t = time.perf_counter()
    reused, _ = run_step(Step("phantoms", (data / "Data_Entry_2017_v2020.csv",),
                              {"n": cfg.n_phantoms, "size": cfg.image_size, "seed": cfg.seed}), stamps, make_phantoms)
    _announce(f"phantoms: {cfg.n_phantoms} images at {cfg.image_size} px → {data}", reused, time.perf_counter() - t)
    summary["outputs"]["phantoms"] = str(data)

    from model.bundle import load_bundle, save_bundle
    from model.data import load_nih_dataset
    from model.train import train_bundle

    model_path = out / "models" / "model.safetensors"

    def train() -> dict:
        with progress_task(f"training {cfg.preset}") as progress:
            bundle, report = train_bundle(load_nih_dataset(data, "train_val"), preset=cfg.preset,
                                          image_size=cfg.image_size, epochs=cfg.epochs, seed=cfg.seed,
                                          progress=progress)
        save_bundle(bundle, model_path)
        return {"val_mean_auroc": report["val_mean_auroc"], "epochs_run": report["epochs_run"]}

    t = time.perf_counter()
    reused, info = run_step(Step("train", (model_path,), {"data": file_digest(data), "preset": cfg.preset,
                                                          "epochs": cfg.epochs, "seed": cfg.seed}), stamps, train)
    _announce(f"train {cfg.preset}: validation mean AUROC {info['val_mean_auroc']:.3f} → {model_path}", reused,
              time.perf_counter() - t)
    summary["outputs"]["model"] = str(model_path)

    from model.evaluate import evaluate_bundle

    eval_path = out / "reports" / "evaluate.json"

    def evaluate() -> dict:
        result = evaluate_bundle(load_bundle(model_path), load_nih_dataset(data, "test"), n_boot=300)
        atomic_write_json(eval_path, result)
        return result["summary"]

    t = time.perf_counter()
    reused, info = run_step(Step("evaluate", (eval_path,), {"model": file_digest(model_path)}), stamps, evaluate)
    _announce(f"evaluate on the test split: mean AUROC {info['mean_auroc']:.3f} "
              f"(95% CI {info['mean_auroc_ci_low']:.3f}–{info['mean_auroc_ci_high']:.3f}) → {eval_path}",
              reused, time.perf_counter() - t)
    summary["outputs"]["evaluation"] = str(eval_path)

    table = Table(title="demo outputs")
    table.add_column("what")
    table.add_column("where")
    for key, value in summary["outputs"].items():
        table.add_row(key, value)
    console.print(table)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    console.print(f"Finished in {summary['seconds']:.1f} s. Summary: {out / 'summary.json'}")
    return 0
