"""Backtest figures: heal / harm / escalate / false-treatment rates per fault kind, policies against baselines.

Two model families, each backtested with ``engine.backtest`` exactly as ``cli.py backtest`` does:

* **phantom** — the demo-size DenseNet121 (2,000 phantoms, 64 px) and its shortcut twin (trained on
  the shortcut-contaminated training split), taken from a ``cli.py demo`` output folder (run here
  when missing; cached by the demo); faults scanner_shift, blur, shortcut:Pneumothorax,
  prevalence:Effusion=0.4, label_noise:0.1, plus clean controls, on the demo data's test split.
* **nih** — the real NIH sample ``../shared/data/nih1000``: a DenseNet121 trained here on a
  patient-disjoint half, a second one on the same half with a chest-drain line on half its Effusion
  positives; scenarios on the other half (scanner_shift, blur, shortcut:Effusion, clean).

Policies: ``policies/default.yaml`` and ``policies/cheap_retraining.yaml``, and the three
baselines. Everything is resumable (``--work``): a killed run continues where it stopped.

Usage (from the repository root)::

    python bench/bench_backtest.py [--datasets phantom nih] [--seeds-phantom 10] [--seeds-nih 5]
        [--work .bench_work/backtest] [--demo-out demo_out] [--json bench/results/backtest.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backtest import (
    build_document,
    contenders,
    run_backtest,
    scenarios_from_flags,
    write_document,
)
from engine.backtest.parts import link_or_copy
from engine.core.storage import atomic_write_json
from model.data import load_nih_dataset, patient_disjoint_split
from model.data.faults import inject_fault
from rules.policy import load_policy

REPO = Path(__file__).resolve().parents[1]
POLICIES = (REPO / "policies" / "default.yaml", REPO / "policies" / "cheap_retraining.yaml")
PHANTOM_FAULTS = ("scanner_shift", "blur", "shortcut:Pneumothorax", "prevalence:Effusion=0.4", "label_noise:0.1")
NIH_FAULTS = ("scanner_shift", "blur", "shortcut:Effusion")
NIH_DEFAULT = REPO.parent / "shared" / "data" / "nih1000"


def _cli(*args: str) -> None:
    cmd = [sys.executable, str(REPO / "cli.py"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def phantom_models(demo_out: Path, quick: bool) -> tuple[Path, Path, Path]:
    """(model, shortcut model, data) of a demo output folder, running the (cached) demo when missing."""
    models = demo_out / "models"
    if not (models / "model.safetensors").is_file() or not (models / "shortcut_model.safetensors").is_file():
        _cli("demo", "--out", str(demo_out), *(["--quick"] if quick else []))
    return models / "model.safetensors", models / "shortcut_model.safetensors", demo_out / "data" / "phantoms"


def _split_folder(nih: Path, out: Path) -> Path:
    """``nih`` with a patient-disjoint half listed as train_val and the other half as test (images linked or copied)."""
    if (out / "test_list.txt").is_file():
        return out
    ds = load_nih_dataset(nih, "all")
    train_idx, test_idx = patient_disjoint_split(ds, 0.5, 0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    shutil.copyfile(ds.csv_path, tmp / ds.csv_path.name)
    for i in range(len(ds)):
        link_or_copy(ds.image_path(i), tmp / "images" / ds.image_names[i])
    (tmp / "train_val_list.txt").write_text("".join(f"{ds.image_names[i]}\n" for i in train_idx))
    (tmp / "test_list.txt").write_text("".join(f"{ds.image_names[i]}\n" for i in test_idx))
    tmp.rename(out)
    return out


def nih_models(nih: Path, work: Path, epochs: int, quick: bool) -> tuple[Path, Path, Path]:
    """A DenseNet121 on a patient-disjoint half of the NIH sample, its shortcut:Effusion twin, the data."""
    data = _split_folder(nih, work / "nih_split")
    arch = ["--arch", "tiny", "--image-size", "32"] if quick else ["--arch", "densenet121", "--image-size", "64"]
    model, twin = work / "nih_model.safetensors", work / "nih_shortcut_model.safetensors"
    if not model.is_file():
        _cli("train", "--data", str(data), "--out", str(model), *arch, "--epochs", str(epochs), "--seed", "1")
    contaminated = work / "nih_shortcut_data"
    if not contaminated.is_dir():
        inject_fault(data, "shortcut:Effusion", contaminated, seed=11)
    if not twin.is_file():
        _cli("train", "--data", str(contaminated), "--out", str(twin), *arch, "--epochs", str(epochs), "--seed", "1")
    return model, twin, data


def backtest(name: str, model: Path, twin: Path, data: Path, faults: tuple[str, ...], seeds: int,
             work: Path, first_seed: int = 0) -> dict:
    scenarios = scenarios_from_flags(model, data, "test", list(faults), seeds, shortcut_model=twin,
                                     first_seed=first_seed)
    who = contenders([load_policy(p) for p in POLICIES], ["no_action", "always_threshold", "always_retrain"])
    out = work / f"bt_{name}"
    t = time.perf_counter()

    def progress(done: int, total: int, what: str) -> None:
        print(f"[{name}] {done}/{total} {what}", flush=True)

    results = run_backtest(scenarios, who, out, progress=progress)
    doc = build_document(scenarios, who, results)
    write_document(out, doc)
    return {"dataset": name, "model": str(model), "shortcut_model": str(twin), "data": str(data),
            "faults": list(faults), "seeds": seeds, "n_scenarios": len(scenarios),
            "wall_time_s": time.perf_counter() - t,
            # the verdicts' own wall times (a resumed run reuses them; this is what computing them took)
            "compute_time_s": sum(r.get("wall_time_s", 0.0) + (r.get("approved") or {}).get("wall_time_s", 0.0)
                                  for r in results),
            "report": str(out / "backtest.html"),
            "summary": doc["summary"], "targets": doc["targets"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["phantom", "nih"], choices=["phantom", "nih"])
    ap.add_argument("--seeds-phantom", type=int, default=10)
    ap.add_argument("--seeds-nih", type=int, default=5)
    ap.add_argument("--nih", type=Path, default=NIH_DEFAULT)
    ap.add_argument("--nih-epochs", type=int, default=8)
    ap.add_argument("--demo-out", type=Path, default=None,
                    help="a `cli.py demo` output folder (default: demo_out; with --quick WORK/demo_quick)")
    ap.add_argument("--work", type=Path, default=REPO / ".bench_work" / "backtest")
    ap.add_argument("--first-seed", type=int, default=0, help="first scenario seed (split a long run over processes)")
    ap.add_argument("--before", type=Path, metavar="JSON",
                    help="an earlier run's JSON (e.g. before a change of the acceptance rules) to show beside this one")
    ap.add_argument("--quick", action="store_true", help="smoke test: quick demo, tiny NIH models, 1 seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "backtest.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.demo_out is None:
        args.demo_out = args.work / "demo_quick" if args.quick else REPO / "demo_out"
    rows = []
    if "phantom" in args.datasets:
        m, twin, data = phantom_models(args.demo_out, args.quick)
        rows.append(backtest("phantom", m, twin, data, PHANTOM_FAULTS, 1 if args.quick else args.seeds_phantom,
                             args.work, args.first_seed))
    if "nih" in args.datasets and args.nih.is_dir():
        m, twin, data = nih_models(args.nih, args.work, 1 if args.quick else args.nih_epochs, args.quick)
        rows.append(backtest("nih", m, twin, data, NIH_FAULTS, 1 if args.quick else args.seeds_nih, args.work,
                             args.first_seed))
    before = json.loads(args.before.read_text()) if args.before else None
    atomic_write_json(args.json, {"bench": "backtest", "threads": args.threads, "rows": rows,
                                  "before": before.get("rows") if isinstance(before, dict) else None,
                                  "settings": {k: str(v) for k, v in vars(args).items()}})
    for r in rows:
        print(json.dumps({"dataset": r["dataset"], "targets": r["targets"]}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
