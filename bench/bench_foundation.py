"""Foundation figures: evaluate/train throughput and DenseNet121 AUROC on phantoms and on real NIH images.

Run by hand (minutes to tens of minutes on 2 cores):

    python bench/bench_foundation.py speed                 # images/s, median of --repeats runs
    python bench/bench_foundation.py auroc-phantom --n 4000 --epochs 6
    python bench/bench_foundation.py auroc-nih --epochs 15

Each writes its figures as JSON (``--json``; default bench/results/foundation_WHAT.json) and prints
them. ``--preset tiny`` (with ``--n 200 --epochs 1 --repeats 1``) is a seconds-long smoke test of
the script itself; the published figures use the default DenseNet121.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.storage import atomic_write_json  # noqa: E402
from model.bundle import new_bundle  # noqa: E402
from model.data import load_nih_dataset  # noqa: E402
from model.evaluate import evaluate_bundle  # noqa: E402
from model.features import compute_features  # noqa: E402
from model.nets import arch_config, build_model  # noqa: E402
from model.train import fit_model, train_bundle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NIH1000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih1000"


def _machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def speed(repeats: int, preset: str = "densenet121") -> dict:
    config = arch_config(preset)
    out: dict = {"environment": _machine(), "preset": preset}
    for size, batch, n in ((64, 64, 256), (224, 8, 32)):
        bundle = new_bundle(build_model("densenet", config).eval(), config=config, input_size=size)
        images = np.random.default_rng(0).random((n, size, size), dtype=np.float32)
        compute_features(bundle, images[:batch], batch_size=batch)  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            compute_features(bundle, images, batch_size=batch)
            rates.append(n / (time.perf_counter() - start))
        out[f"evaluate_{size}px_batch{batch}_images_per_s"] = statistics.median(rates)
    bundle = new_bundle(build_model("densenet", config), config=config, input_size=64)
    images = np.random.default_rng(0).random((256, 64, 64), dtype=np.float32)
    labels = (np.random.default_rng(1).random((256, 14)) < 0.1).astype(np.uint8)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        fit_model(bundle, images, labels, epochs=1, batch_size=64, seed=r)
        rates.append(len(images) / (time.perf_counter() - start))
    out["train_64px_batch64_images_per_s"] = statistics.median(rates)
    return out


def _auroc_run(train_ds, test_ds, epochs: int, seed: int, size: int, preset: str = "densenet121") -> dict:
    start = time.perf_counter()
    bundle, report = train_bundle(train_ds, preset=preset, image_size=size, epochs=epochs, seed=seed,
                                  patience=max(3, epochs))
    train_s = time.perf_counter() - start
    result = evaluate_bundle(bundle, test_ds, n_boot=1000, seed=seed)
    s = result["summary"]
    return {
        "preset": preset, "train_images": len(train_ds), "test_images": len(test_ds), "epochs": epochs, "seed": seed,
        "train_seconds": train_s, "epochs_run": report["epochs_run"],
        "mean_auroc": s["mean_auroc"], "ci95": [s["mean_auroc_ci_low"], s["mean_auroc_ci_high"]],
        "labels_with_positives": s["labels_with_positives"],
        "per_label_auroc": {k: v["auroc"] for k, v in result["labels"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "auroc-phantom", "auroc-nih"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=4000, help="phantom images")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="densenet121", help="DenseNet preset (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the figures here (default: bench/results/foundation_WHAT.json)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.what == "speed":
        result = speed(args.repeats, args.preset)
    elif args.what == "auroc-phantom":
        from model.data.phantom import generate_phantoms

        with tempfile.TemporaryDirectory() as tmp:
            root = generate_phantoms(Path(tmp) / "ph", args.n, size=64, seed=args.seed)
            result = _auroc_run(load_nih_dataset(root, "train_val"), load_nih_dataset(root, "test"),
                                args.epochs, args.seed, 64, args.preset)
    else:
        result = _auroc_run(load_nih_dataset(NIH1000, "train_val"), load_nih_dataset(NIH1000, "test"),
                            args.epochs, args.seed, 64, args.preset)
    result["environment"] = _machine()
    atomic_write_json(args.json or RESULTS / f"foundation_{args.what}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
