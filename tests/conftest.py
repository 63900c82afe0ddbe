"""Shared fixtures: an isolated feature cache and small NIH-layout datasets written on the fly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.labels import CHEXNET_LABELS

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH1000 = SHARED_DATA / "nih1000"
NIH_FULLRES = SHARED_DATA / "nih_fullres"

# One thread: tiny models gain nothing from two, and under load two threads thrash (20-30x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_TRIAGE_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_nih_dataset(
    root: Path,
    rows: Sequence[tuple[str, str, int]],
    *,
    size: int = 32,
    seed: int = 0,
    test_patients: Sequence[int] = (),
    mode: str = "L",
) -> Path:
    """Write ``rows`` of (image name, Finding Labels, patient id) as an NIH-layout folder with random PNGs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = [NIH_HEADER]
    for name, labels, patient in rows:
        pixels = (rng.random((size, size)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").convert(mode).save(root / "images" / name)
        lines.append(f"{name},{labels},0,{patient},50,M,PA,{size},{size},0.1,0.1")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    if test_patients:
        test = [r[0] for r in rows if r[2] in set(test_patients)]
        train = [r[0] for r in rows if r[2] not in set(test_patients)]
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    return root


PATTERN_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion")


def write_pattern_dataset(root: Path, n: int = 240, size: int = 32, seed: int = 0) -> Path:
    """NIH-layout images whose three findings are learnable patterns (a flat lift, stripes, a ramp):
    a tiny DenseNet learns them in seconds, so triage tests run on a real, working model."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = [np.ones((size, size)), (np.sin(xx * 20) > 0).astype(float), yy]
    lines = [NIH_HEADER]
    for i in range(n):
        pos = [name for name in PATTERN_LABELS if rng.random() < 0.35]
        img = 0.25 + 0.35 * rng.random((size, size))
        for j, name in enumerate(PATTERN_LABELS):
            if name in pos:
                img = img + 0.06 * patterns[j]
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(root / "images" / name)
        lines.append(f"{name},{'|'.join(pos) or 'No Finding'},{i % 2},{i // 2 + 1},50,M,PA,{size},{size},0.1,0.1")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    return root


def pattern_bundle(dataset):
    """A tiny DenseNet whose head is ridge-fitted to the three learnable patterns of ``write_pattern_dataset``,
    with its reference metrics measured on ``dataset``: a working model in a second, for triage tests."""
    from model.bundle import new_bundle
    from model.features import extract_features
    from model.nets import arch_config, build_model
    from model.train import reference_from_holdout

    torch.manual_seed(0)
    cfg = arch_config("tiny")
    bundle = new_bundle(build_model("densenet", cfg), config=cfg, input_size=32)
    bundle.model.eval()
    fs = extract_features(bundle, dataset, use_cache=False)
    x = fs.features.astype(np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    weight, bias = np.zeros((14, x.shape[1])), np.full(14, -4.0)
    for name in PATTERN_LABELS:
        k = CHEXNET_LABELS.index(name)
        coef = np.linalg.solve(z.T @ z + np.eye(z.shape[1]), z.T @ (4.0 * fs.labels[:, k] - 2.0))
        weight[k], bias[k] = coef[:-1] / sd, coef[-1] - (coef[:-1] * mu / sd).sum()
    with torch.no_grad():
        bundle.model.classifier.weight.copy_(torch.from_numpy(weight).float())
        bundle.model.classifier.bias.copy_(torch.from_numpy(bias).float())
    fs = extract_features(bundle, dataset, use_cache=False)
    return reference_from_holdout(bundle, fs.labels, fs.logits)


def random_rows(n: int, seed: int = 0, n_patients: int | None = None) -> list[tuple[str, str, int]]:
    """``n`` rows with random label sets (about half No Finding) over ``n_patients`` patients."""
    rng = np.random.default_rng(seed)
    n_patients = n_patients or max(2, n // 2)
    rows = []
    follow: dict[int, int] = {}
    for _ in range(n):
        patient = int(rng.integers(1, n_patients + 1))
        k = follow.get(patient, 0)
        follow[patient] = k + 1
        picked = [name for name in CHEXNET_LABELS if rng.random() < 0.12]
        rows.append((f"{patient:08d}_{k:03d}.png", "|".join(picked) or "No Finding", patient))
    return rows


@pytest.fixture
def nih_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(rows: Sequence[tuple[str, str, int]] | None = None, **kwargs) -> Path:
        root = tmp_path / f"ds{next(counter)}"
        return write_nih_dataset(root, rows if rows is not None else random_rows(40), **kwargs)

    return make


requires_nih1000 = pytest.mark.skipif(not NIH1000.is_dir(), reason="../shared/data/nih1000 not present")
