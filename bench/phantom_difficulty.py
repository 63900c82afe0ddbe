"""Cheap proxy for how hard the phantom task is: per-label AUROC of two small models.

The target for the embedded default data is a DenseNet121 trained on 4,000 phantoms at 64 px
landing at a mean AUROC of 0.80-0.95 on held-out phantoms. A full DenseNet run is too slow to tune
against on a CPU, so this script trains two cheap proxies on the phantom ``train_val`` split and
scores them on the patient-disjoint ``test`` split:

- ``logreg``: one L2 logistic regression per label on 32 x 32 standardised pixels (linear floor);
- ``cnn``: a four-block CNN trained for a fixed number of epochs (the closer proxy);
- ``densenet`` (only on request): torchvision DenseNet121 from scratch, the real target.

Aim: proxy CNN mean AUROC about 0.75-0.9, no label near 1.0, none at chance. Tune with the
constants in ``model/data/phantom/knobs.py`` (``LESION_CONTRAST``, ``SUBTLE_SHARE``, ``NOISE_LEVEL``).

Usage (from the repository root)::

    python bench/phantom_difficulty.py [--n 4500] [--size 64] [--epochs 8] [--model both]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.labels import CHEXNET_LABELS, NO_FINDING  # noqa: E402
from model.data.phantom import generate_phantoms  # noqa: E402


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x H x W float32 in 0..1) and labels (N x 14) of one split of an NIH-layout dir."""
    names = (root / f"{split}_list.txt").read_text().split()
    with (root / "Data_Entry_2017_v2020.csv").open(newline="") as fh:
        rows = {r[0]: r[1] for r in csv.reader(fh)}
    x = np.stack([np.asarray(Image.open(root / "images" / n).convert("L"), dtype=np.float32) / 255.0 for n in names])
    y = np.zeros((len(names), len(CHEXNET_LABELS)), dtype=np.float32)
    for i, n in enumerate(names):
        for lab in rows[n].split("|"):
            if lab != NO_FINDING:
                y[i, CHEXNET_LABELS.index(lab)] = 1.0
    return x, y


def auroc_table(y: np.ndarray, score: np.ndarray) -> list[float]:
    """Per-label AUROC (NaN where a label has no positive or no negative in ``y``)."""
    from sklearn.metrics import roc_auc_score

    out = []
    for j in range(y.shape[1]):
        pos = y[:, j].sum()
        out.append(float(roc_auc_score(y[:, j], score[:, j])) if 0 < pos < len(y) else float("nan"))
    return out


def fit_logreg(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray) -> np.ndarray:
    """Per-label logistic regression on 32 x 32 pixels; returns test scores."""
    from sklearn.linear_model import LogisticRegression

    def feats(x: np.ndarray) -> np.ndarray:
        n, h, w = x.shape
        f = max(1, h // 32)
        return x[:, : h // f * f, : w // f * f].reshape(n, h // f, f, w // f, f).mean(axis=(2, 4)).reshape(n, -1)

    ftr, fte = feats(xtr), feats(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    scores = np.zeros((len(xte), ytr.shape[1]))
    for j in range(ytr.shape[1]):
        if ytr[:, j].min() == ytr[:, j].max():
            continue
        clf = LogisticRegression(C=0.01, max_iter=300, class_weight="balanced")
        scores[:, j] = clf.fit(ftr, ytr[:, j]).decision_function(fte)
    return scores


def small_cnn(n_out: int):
    """Four conv blocks (16-32-64-96 channels), global pooling, one linear layer: ~0.2 M weights."""
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(96, n_out))


def densenet121(n_out: int):
    """torchvision DenseNet121 from scratch with a one-channel stem (the real target model)."""
    from torch import nn
    from torchvision.models import densenet121 as tv_densenet121

    net = tv_densenet121(weights=None, num_classes=n_out)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def fit_net(name: str, net, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, epochs: int, seconds: float, seed: int, lr: float = 2e-3, batch: int = 64) -> np.ndarray:
    """Train ``net`` for ``epochs`` epochs (or ``seconds`` of wall clock) and score ``xte``.

    One-cycle AdamW, BCE with per-label positive weights (rare labels would otherwise never fire).
    No flip augmentation: anatomy is sided (heart on the image right).
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mean, std = float(xtr.mean()), float(xtr.std())
    xt = torch.from_numpy((xtr - mean) / std).unsqueeze(1)
    yt = torch.from_numpy(ytr)
    prev = yt.mean(0).clamp(1e-3, 0.5)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((1 - prev) / prev).clamp(max=20.0))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (-(-len(xt) // batch)))
    gen = torch.Generator().manual_seed(seed)
    start, done = time.time(), 0
    net.train()
    while done < epochs and time.time() - start < seconds:
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
            if time.time() - start > seconds:
                break
        done += 1
    print(f"{name}: {done} epoch(s) in {time.time() - start:.0f} s")
    net.eval()
    with torch.no_grad():
        xe = torch.from_numpy((xte - mean) / std).unsqueeze(1)
        return torch.cat([net(xe[i : i + 256]) for i in range(0, len(xe), 256)]).numpy()


def report(name: str, y: np.ndarray, auc: list[float]) -> None:
    """Per-label AUROC table with positive counts and the mean over scorable labels."""
    print(f"\n{name}: per-label AUROC on the test split ({len(y)} images)")
    for lab, a, pos in zip(CHEXNET_LABELS, auc, y.sum(0)):
        print(f"  {lab:20s} {a:6.3f}  ({int(pos)} positives)")
    vals = [a for a, pos in zip(auc, y.sum(0)) if pos >= 5 and not np.isnan(a)]
    print(f"  mean AUROC (labels with >= 5 test positives, {len(vals)}): {np.mean(vals):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.33)
    parser.add_argument("--epochs", type=int, default=8, help="CNN epochs (about 20 s each at 64 px on 2 cores)")
    parser.add_argument("--seconds", type=float, default=3600.0, help="CNN wall-clock cap")
    parser.add_argument("--model", choices=("logreg", "cnn", "both", "densenet"), default="both",
                        help="both = logreg + cnn; densenet = the real target (slow: ~75 s/epoch on 2 cores)")
    parser.add_argument("--data", type=Path, help="use an existing phantom dir instead of generating")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            t0 = time.time()
            root = generate_phantoms(Path(tmp) / "phantoms", args.n, args.size, args.seed, test_fraction=args.test_fraction)
            print(f"generated {args.n} phantoms at {args.size} px in {time.time() - t0:.1f} s")
        xtr, ytr = load_split(root, "train_val")
        xte, yte = load_split(root, "test")
    print(f"train {len(xtr)}, test {len(xte)} images")
    if args.model in ("logreg", "both"):
        report("logreg", yte, auroc_table(yte, fit_logreg(xtr, ytr, xte)))
    if args.model in ("cnn", "both"):
        report("cnn", yte, auroc_table(yte, fit_net("cnn", small_cnn(ytr.shape[1]), xtr, ytr, xte, args.epochs, args.seconds, args.seed)))
    if args.model == "densenet":
        net = densenet121(ytr.shape[1])
        report("densenet121", yte, auroc_table(yte, fit_net("densenet121", net, xtr, ytr, xte, args.epochs, args.seconds, args.seed, lr=1e-3, batch=32)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
