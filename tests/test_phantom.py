"""Phantom generator: NIH layout, determinism, label distribution and where each finding is drawn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import DataError
from model.data import phantom
from model.data.phantom import knobs
from model.data.phantom import NIH_HEADER, generate_phantoms, nih_label_marginals, render_phantom, sample_label_vectors
from model.data.phantom.writer import plan_dataset
from model.labels import CHEXNET_LABELS, NO_FINDING, NUM_LABELS

REAL_NIH_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih1000" / "Data_Entry_2017_v2020.csv"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path) -> list[list[str]]:
    with (root / "Data_Entry_2017_v2020.csv").open(newline="") as fh:
        return list(csv.reader(fh))[1:]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantoms(tmp_path_factory.mktemp("ph") / "a", n=60, size=32, seed=7)


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = generate_phantoms(tmp_path / "b", n=60, size=32, seed=7)
    assert _files(dataset) == _files(again)


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    other = _files(generate_phantoms(tmp_path / "c", n=60, size=32, seed=8))
    mine = _files(dataset)
    assert other["Data_Entry_2017_v2020.csv"] != mine["Data_Entry_2017_v2020.csv"]
    shared = [k for k in mine if k.startswith("images/") and k in other]
    assert shared and all(mine[k] != other[k] for k in shared)


def test_render_consumes_rng_independently_of_labels() -> None:
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    render_phantom(np.zeros(NUM_LABELS, int), 32, a)
    render_phantom(np.ones(NUM_LABELS, int), 32, b)
    assert a.random() == b.random()


# ---------------------------------------------------------------- layout


def test_csv_header_and_rows_match_nih(dataset: Path) -> None:
    lines = (dataset / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER
    if REAL_NIH_CSV.is_file():
        assert lines[0] == REAL_NIH_CSV.read_text().splitlines()[0]
    rows = _rows(dataset)
    assert len(rows) == 60 and all(len(r) == 11 for r in rows)
    for r in rows:
        pid, fu = int(r[3]), int(r[2])
        assert r[0] == f"{pid:08d}_{fu:03d}.png"
        labels = r[1].split("|")
        assert labels == [NO_FINDING] or (labels == sorted(labels) and set(labels) <= set(CHEXNET_LABELS))
        assert r[5] in ("M", "F") and r[6] in ("PA", "AP")
        assert (r[7], r[8]) == ("32", "32") and float(r[9]) == float(r[10]) > 0


def test_images_match_csv_and_are_grey(dataset: Path) -> None:
    names = [r[0] for r in _rows(dataset)]
    assert sorted(names) == sorted(p.name for p in (dataset / "images").iterdir())
    for n in names[:10]:
        with Image.open(dataset / "images" / n) as im:
            assert im.mode == "L" and im.size == (32, 32)


def test_split_is_patient_disjoint_and_complete(dataset: Path) -> None:
    patient = {r[0]: r[3] for r in _rows(dataset)}
    train = (dataset / "train_val_list.txt").read_text().split()
    test = (dataset / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(patient)
    assert train and test
    assert not {patient[n] for n in train} & {patient[n] for n in test}


def test_followups_and_provenance(dataset: Path) -> None:
    rows = _rows(dataset)
    by_patient: dict[str, list[int]] = {}
    for r in rows:
        by_patient.setdefault(r[3], []).append(int(r[2]))
    assert all(sorted(v) == list(range(len(v))) for v in by_patient.values())
    assert 1 < len(by_patient) < 60  # several patients, some with follow-ups
    meta = json.loads((dataset / "phantom.json").read_text())
    assert meta["generator"] == phantom.GENERATOR_NAME and meta["version"] == phantom.GENERATOR_VERSION
    assert (meta["seed"], meta["n"], meta["size"]) == (7, 60, 32)


def test_progress_is_reported(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    generate_phantoms(tmp_path / "p", n=5, size=16, seed=0, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 5) for i in range(1, 6)]


@pytest.mark.parametrize("size", [32, 64, 128, 224, 256])
def test_render_sizes(size: int) -> None:
    img, masks = render_phantom(np.eye(NUM_LABELS, dtype=int)[2], size, np.random.default_rng(0), return_masks=True)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert 40 < img.mean() < 220 and img.std() > 20
    assert masks["Effusion"].shape == (size, size) and masks["Effusion"].max() > 0.5


# ---------------------------------------------------------------- label distribution


def test_label_table_shape() -> None:
    table = phantom.label_table()
    assert len(table["combinations"]) == 801
    nf = next(c for c, s in table["combinations"] if not s) / table["n_images"]
    assert abs(nf - 0.538) < 0.001
    assert sum(c for c, _ in table["combinations"]) == table["n_images"] == 112120


def test_sampled_marginals_match_nih() -> None:
    n = 20000
    y = sample_label_vectors(n, np.random.default_rng(0))
    ref = nih_label_marginals()
    tol = 4.5 * np.sqrt(ref * (1 - ref) / n) + 1e-3
    assert np.all(np.abs(y.mean(0) - ref) < tol), (y.mean(0), ref)
    assert abs((y.sum(1) == 0).mean() - 0.538) < 0.015


def test_dataset_plan_marginals_match_nih() -> None:
    """Follow-ups keep labels (correlated draws), but each image's marginal is still NIH's."""
    specs, patients = plan_dataset(20000, np.random.default_rng(1))
    y = np.stack([s.labels for s in specs])
    ref = nih_label_marginals()
    tol = 4.5 * np.sqrt(3.0 * ref * (1 - ref) / len(y)) + 1e-3  # design effect of follow-ups
    assert len(y) == 20000 and np.all(np.abs(y.mean(0) - ref) < tol)
    assert len(patients) > 4000  # many patients, follow-ups capped


# ---------------------------------------------------------------- findings


def _diff(name: str, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(signed diff with - without the finding, |diff|, masks of the positive image)."""
    lab = np.zeros(NUM_LABELS, int)
    base, masks0 = render_phantom(lab, size, np.random.default_rng(seed), return_masks=True)
    lab[CHEXNET_LABELS.index(name)] = 1
    img, masks = render_phantom(lab, size, np.random.default_rng(seed), return_masks=True)
    d = img.astype(float) - base.astype(float)
    masks["lungs0"] = masks0["lungs"]
    return d, np.abs(d), masks


def _share(weight: np.ndarray, region: np.ndarray) -> float:
    return float((weight * region).sum() / max(weight.sum(), 1e-9))


def _box(size: int, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    g = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(g, g)
    return ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).astype(float)


SEEDS = (11, 12, 13)


@pytest.fixture
def full_strength(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding tests check *where* a pattern goes, so no instance is drawn in the subtle range."""
    monkeypatch.setattr(knobs, "SUBTLE_SHARE", 0.0)


@pytest.mark.usefixtures("full_strength")
@pytest.mark.parametrize("name", CHEXNET_LABELS)
def test_each_finding_changes_pixels_and_has_a_mask(name: str) -> None:
    for seed in SEEDS:
        d, ad, masks = _diff(name, seed)
        assert ad.mean() > 0.05, f"{name} left the image unchanged (seed {seed})"
        assert masks[name].max() > 0.3
        # The change sits where the finding's mask says it was drawn (plus its anatomy effects).
        near = np.maximum(masks[name], np.maximum(masks["lungs"], masks["lungs0"]))
        assert _share(ad, (near > 0.05) | (masks["heart"] > 0.05)) > 0.8


@pytest.mark.usefixtures("full_strength")
@pytest.mark.parametrize(
    ("name", "box", "min_share"),
    [
        ("Cardiomegaly", (0.3, 0.9, 0.3, 0.9), 0.85),
        ("Effusion", (0.0, 1.0, 0.5, 1.0), 0.9),
        ("Hernia", (0.35, 0.75, 0.4, 0.85), 0.85),
        ("Edema", (0.2, 0.8, 0.2, 0.8), 0.6),
    ],
)
def test_finding_sits_in_its_region(name: str, box: tuple[float, float, float, float], min_share: float) -> None:
    for seed in SEEDS:
        _, ad, _ = _diff(name, seed)
        assert _share(ad, _box(64, *box)) > min_share, (name, seed)


@pytest.mark.usefixtures("full_strength")
def test_pneumothorax_is_apical_or_lateral_and_dark() -> None:
    for seed in SEEDS:
        d, ad, masks = _diff("Pneumothorax", seed)
        upper_or_lateral = np.maximum(_box(64, 0, 1, 0, 0.55), np.maximum(_box(64, 0, 0.3, 0, 1), _box(64, 0.7, 1, 0, 1)))
        assert _share(ad, upper_or_lateral) > 0.85
        assert (d * masks["Pneumothorax"]).sum() < 0  # more air, no vessels: darker


@pytest.mark.usefixtures("full_strength")
@pytest.mark.parametrize("name", ["Mass", "Nodule", "Consolidation", "Pneumonia", "Infiltration", "Effusion", "Pleural_Thickening", "Fibrosis"])
def test_opacities_are_brighter(name: str) -> None:
    for seed in SEEDS:
        d, _, masks = _diff(name, seed)
        assert (d * masks[name]).sum() > 0, (name, seed)


@pytest.mark.usefixtures("full_strength")
def test_emphysema_darkens_lungs_and_edema_is_bilateral() -> None:
    for seed in SEEDS:
        d, _, masks = _diff("Emphysema", seed)
        assert (d * masks["lungs0"]).sum() < 0
        _, ad, _ = _diff("Edema", seed)
        left, right = _share(ad, _box(64, 0, 0.5, 0, 1)), _share(ad, _box(64, 0.5, 1, 0, 1))
        assert min(left, right) > 0.25


@pytest.mark.usefixtures("full_strength")
def test_fibrosis_is_basal() -> None:
    for seed in SEEDS:
        _, ad, _ = _diff("Fibrosis", seed)
        assert _share(ad, _box(64, 0, 1, 0.45, 1)) > _share(ad, _box(64, 0, 1, 0, 0.45))


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": -3}, "n"),
        ({"n": 2.5}, "n"),
        ({"size": 15}, "size"),
        ({"size": 8}, "size"),
        ({"seed": -1}, "seed"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, param: str) -> None:
    args = {"out_dir": tmp_path / "x", "n": 4, "size": 16, "seed": 0} | kwargs
    with pytest.raises(DataError, match=param):
        generate_phantoms(**args)
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="out_dir"):
        generate_phantoms(tmp_path, n=2, size=16)
    generate_phantoms(tmp_path / "empty", n=2, size=16)  # absent is fine; so is empty
    (tmp_path / "e2").mkdir()
    generate_phantoms(tmp_path / "e2", n=2, size=16)


def test_render_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="size"):
        render_phantom(np.zeros(NUM_LABELS, int), 12, np.random.default_rng(0))
    with pytest.raises(DataError, match="labels"):
        render_phantom(np.zeros(5, int), 32, np.random.default_rng(0))
