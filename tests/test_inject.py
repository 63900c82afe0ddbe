"""Fault injectors: spec parsing, ground truth in fault.json, exactly the intended rows changed,
untouched files byte-identical, determinism, confinement, and real NIH images (RGB/RGBA)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import NIH1000, NIH_HEADER, requires_nih1000, write_nih_dataset
from model.data import faults as inject_mod
from model.data import load_nih_dataset
from model.data.faults import FAULT_SYNTAX, FaultSpecError, inject_fault, parse_fault
from model.labels import CHEXNET_LABELS

LABEL = "Effusion"


def _rows() -> list[tuple[str, str, int]]:
    """24 patients x 2 images; every third patient has Effusion, every fourth Mass; patients 19-24 are test."""
    rows = []
    for patient in range(1, 25):
        for k in range(2):
            labels = [n for n, every in ((LABEL, 3), ("Mass", 4)) if patient % every == 0]
            rows.append((f"{patient:08d}_{k:03d}.png", "|".join(labels) or "No Finding", patient))
    return rows


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_nih_dataset(tmp_path / "src", _rows(), size=32, seed=0, test_patients=range(19, 25))


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _distance_to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    a, b = line[:-1][None], line[1:][None]  # segments
    p = points[:, None, :]
    t = np.clip(((p - a) * (b - a)).sum(-1) / np.maximum(((b - a) ** 2).sum(-1), 1e-12), 0, 1)
    return np.sqrt((((a + t[..., None] * (b - a)) - p) ** 2).sum(-1)).min(axis=1)


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------
# Specs


def test_parse_fault_defaults_and_params() -> None:
    assert parse_fault("scanner_shift").params == {"gamma": 1.2, "contrast": 1.6, "brightness": 0.0, "noise": 0.03}
    assert parse_fault("scanner_shift:gamma=1.6,contrast=0.7,noise=0.03").params["contrast"] == 0.7
    assert parse_fault("shortcut:Pneumothorax").params == {"label": "Pneumothorax", "fraction": 0.5,
                                                           "train_fraction": 0.5}
    assert parse_fault("shortcut:Mass,train_fraction=0.6").params["train_fraction"] == 0.6
    assert parse_fault("shortcut:Pneumothorax,fraction=0.3").params["fraction"] == 0.3
    assert parse_fault("blur").params == {"sigma": 1.5}
    assert parse_fault("blur:2").params == parse_fault("blur:sigma=2").params == {"sigma": 2.0}
    assert parse_fault("prevalence:Mass=0.4").params == {"label": "Mass", "prevalence": 0.4}
    assert parse_fault("label_noise:0.1").params == {"rate": 0.1}
    assert parse_fault("label_noise:0.1,label=Mass").params == {"rate": 0.1, "label": "Mass"}


@pytest.mark.parametrize("spec, why", [
    ("bogus", "unknown fault 'bogus'"),
    ("scanner_shift:gama=2", "unknown parameter 'gama'"),
    ("scanner_shift:gamma=-1", "gamma must be in"),
    ("scanner_shift:gamma=abc", "gamma must be a number"),
    ("shortcut", "exactly one LABEL"),
    ("shortcut:Pneumothorx", "unknown label 'Pneumothorx'"),
    ("shortcut:Mass,fraction=1.5", "fraction must be in"),
    ("prevalence:Mass", "exactly one LABEL=P"),
    ("prevalence:Mass=2", "must be in"),
    ("label_noise", "exactly one RATE"),
    ("label_noise:0", "RATE must be in"),
    ("blur:sigma=1,", "empty argument"),
])
def test_bad_specs_list_every_fault(spec: str, why: str) -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_fault(spec)
    message = str(info.value)
    assert why in message and repr(spec) in message
    for syntax in FAULT_SYNTAX.values():
        assert syntax in message


# ------------------------------------------------------------------------------------------------
# Each fault


def test_scanner_shift_changes_every_image_deterministically(dataset: Path, tmp_path: Path) -> None:
    a = inject_fault(dataset, "scanner_shift", tmp_path / "a", seed=3)
    inject_fault(dataset, "scanner_shift", tmp_path / "b", seed=3)
    inject_fault(dataset, "scanner_shift", tmp_path / "c", seed=4)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb  # same seed, same bytes (fault.json included)
    src = _files(dataset)
    names = [r[0] for r in _rows()]
    assert all(fa[f"images/{n}"] != src[f"images/{n}"] for n in names)
    assert sum(fa[f"images/{n}"] != fc[f"images/{n}"] for n in names) == len(names)  # noise follows the seed
    for meta in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"):
        assert fa[meta] == src[meta]
    assert a["fault"] == "scanner_shift" and a["seed"] == 3 and a["n_modified"] == len(names)
    assert {m["image"] for m in a["modified_images"]} == set(names)
    assert a["expected_issues"][0]["kind"] == "calibration_drift"
    assert a["source_manifest_hash"] == a["manifest_hash"] == load_nih_dataset(dataset).manifest_hash()
    # the transform is the documented one (noise aside): contrast about mid-grey after gamma
    x = _grey(dataset / "images" / names[0]) / 255.0
    expected = np.clip(0.5 + 1.6 * (x**1.2 - 0.5), 0, 1)
    out = _grey(tmp_path / "a" / "images" / names[0]) / 255.0
    assert abs(np.mean(out - expected)) < 0.01 and np.std(out - expected) < 0.06
    with Image.open(tmp_path / "a" / "images" / names[0]) as im:
        assert im.mode == "L" and im.size == (32, 32)


def test_shortcut_tube_on_exactly_the_intended_rows(dataset: Path, tmp_path: Path) -> None:
    record = inject_fault(dataset, f"shortcut:{LABEL},fraction=0.5,train_fraction=1", tmp_path / "out", seed=1)
    ds = load_nih_dataset(dataset)
    k = CHEXNET_LABELS.index(LABEL)
    train = set((dataset / "train_val_list.txt").read_text().split())
    test = set((dataset / "test_list.txt").read_text().split())
    pos_train = {n for n, y in zip(ds.image_names, ds.labels[:, k]) if y and n in train}
    neg_test = {n for n, y in zip(ds.image_names, ds.labels[:, k]) if not y and n in test}
    modified = {m["image"]: m for m in record["modified_images"]}
    assert pos_train and {n for n in modified if n in train} == pos_train
    marked_test = {n for n in modified if n in test}
    assert marked_test <= neg_test and len(marked_test) == round(0.5 * len(neg_test))
    assert record["notes"]["test_negatives_marked"] == len(marked_test)
    src, out = _files(dataset), _files(tmp_path / "out")
    for name in ds.image_names:
        same = src[f"images/{name}"] == out[f"images/{name}"]
        assert same is (name not in modified), name  # untouched images are byte-identical copies
    for name, m in modified.items():
        before = _grey(dataset / "images" / name)
        after = _grey(tmp_path / "out" / "images" / name)
        changed = np.argwhere(before != after)[:, ::-1].astype(float)  # (x, y)
        path = np.array(m["path_px"])  # (x, y) polyline
        assert len(changed) and _distance_to_polyline(changed, path).max() <= 2.5, name  # only the tube changed
        tx, ty = (int(round(v)) for v in m["tip_px"])
        assert after[ty, tx] == 255  # the bright tip
        h, w = after.shape
        for x, y in path[1:]:  # a bright tube pixel within one pixel of every point of the path
            cx, cy = int(round(x)), int(round(y))
            assert after[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].max() >= 245, (name, x, y)
    assert record["expected_issues"][0] == {"kind": "fp_cluster", "labels": [LABEL],
                                            "when": record["expected_issues"][0]["when"]}


def test_shortcut_needs_split_lists(tmp_path: Path) -> None:
    root = write_nih_dataset(tmp_path / "nolists", _rows()[:8], size=32)
    with pytest.raises(Exception, match="needs train_val_list.txt and test_list.txt"):
        inject_fault(root, f"shortcut:{LABEL}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_blur_softens_every_image(dataset: Path, tmp_path: Path) -> None:
    record = inject_fault(dataset, "blur:sigma=1.5", tmp_path / "out", seed=0)
    assert record["affected_labels"] == ["Nodule", "Mass"] and record["n_modified"] == len(_rows())
    for name, *_ in _rows()[:5]:
        before, after = _grey(dataset / "images" / name), _grey(tmp_path / "out" / "images" / name)
        assert np.abs(np.diff(after, axis=1)).mean() < 0.5 * np.abs(np.diff(before, axis=1)).mean()


@pytest.mark.parametrize("target", [0.5, 0.0])
def test_prevalence_subsamples_within_each_split(dataset: Path, tmp_path: Path, target: float) -> None:
    out = tmp_path / "out"
    record = inject_fault(dataset, f"prevalence:{LABEL}={target}", out, seed=0)
    k = CHEXNET_LABELS.index(LABEL)
    removed = set(record["removed_images"])
    assert removed and record["n_modified"] == 0
    for split in ("train_val", "test"):
        ds = load_nih_dataset(out, split)
        prevalence = ds.labels[:, k].mean()
        assert abs(prevalence - target) <= 1.0 / len(ds) + 1e-9
        assert not removed & set(ds.image_names)
        assert record["notes"]["per_split"][split]["n"] == len(ds)
    lists = {s: set((out / f"{s}_list.txt").read_text().split()) for s in ("train_val", "test")}
    patients = {s: {n.split("_")[0] for n in names} for s, names in lists.items()}
    assert not patients["train_val"] & patients["test"]  # still patient-disjoint
    assert {p.name for p in (out / "images").iterdir()} == set(load_nih_dataset(out).image_names)
    src, new = _files(dataset), _files(out)
    assert all(new[f"images/{n}"] == src[f"images/{n}"] for n in load_nih_dataset(out).image_names)


def test_label_noise_flips_exactly_the_recorded_entries(dataset: Path, tmp_path: Path) -> None:
    record = inject_fault(dataset, "label_noise:0.05", tmp_path / "out", seed=7)
    src, out = load_nih_dataset(dataset), load_nih_dataset(tmp_path / "out")
    assert src.image_names == out.image_names
    expected = src.labels.copy()
    for flip in record["label_flips"]:
        i, k = src.image_names.index(flip["image"]), CHEXNET_LABELS.index(flip["label"])
        assert expected[i, k] == flip["from"] and flip["to"] == 1 - flip["from"]
        expected[i, k] = flip["to"]
    np.testing.assert_array_equal(out.labels, expected)
    assert len(record["label_flips"]) == round(0.05 * len(src) * len(CHEXNET_LABELS))
    assert _files(tmp_path / "out")["images/00000001_000.png"] == _files(dataset)["images/00000001_000.png"]
    one = inject_fault(dataset, "label_noise:0.25,label=Mass", tmp_path / "mass", seed=7)
    assert {f["label"] for f in one["label_flips"]} == {"Mass"} and len(one["label_flips"]) == 12
    # other columns of the CSV are kept as they were
    with open(tmp_path / "out" / "Data_Entry_2017_v2020.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert ",".join(rows[0]) == NIH_HEADER and rows[1][3] == "1"


# ------------------------------------------------------------------------------------------------
# Safety


def test_confined_to_the_output_folder(dataset: Path, tmp_path: Path) -> None:
    before = _files(tmp_path)
    inject_fault(dataset, f"shortcut:{LABEL}", tmp_path / "out", seed=0)
    after = _files(tmp_path)
    new = set(after) - set(before)
    assert all(p.startswith("out/") for p in new)
    assert {p: after[p] for p in before} == before  # nothing else changed, the source included
    with pytest.raises(Exception, match="already exists"):
        inject_fault(dataset, "blur", tmp_path / "out")
    with pytest.raises(Exception, match="outside the dataset"):
        inject_fault(dataset, "blur", dataset / "inside")
    assert _files(tmp_path) == after


def test_failure_leaves_nothing_behind(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_save = inject_mod._save

    def flaky(im, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real_save(im, path)

    monkeypatch.setattr(inject_mod, "_save", flaky)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        inject_fault(dataset, "scanner_shift", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half dataset, no temp folder


@requires_nih1000
def test_real_nih_images(tmp_path: Path) -> None:
    """RGB and RGBA NIH PNGs: modified ones are written as L, untouched ones copied byte for byte."""
    with open(NIH1000 / "Data_Entry_2017_v2020.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    modes = {}
    for row in rows:
        with Image.open(NIH1000 / "images" / row[0]) as im:
            modes[row[0]] = im.mode
        if len(modes) >= 60:
            break
    rgba = [r for r in rows if modes.get(r[0]) == "RGBA"][:2]
    if not rgba:  # make sure an RGBA file is in the sample
        for r in rows[60:]:
            with Image.open(NIH1000 / "images" / r[0]) as im:
                if im.mode == "RGBA":
                    rgba = [r]
                    break
    pick = [r for r in rows if r[0] in modes and r not in rgba][:14] + rgba
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for r in pick:
        shutil.copyfile(NIH1000 / "images" / r[0], root / "images" / r[0])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(pick)
    patients = sorted({r[3] for r in pick})
    test = [r[0] for r in pick if r[3] in patients[-3:]]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in pick if r[0] not in test) + "\n")
    assert {Image.open(root / "images" / r[0]).mode for r in pick} >= {"RGB", "RGBA"}

    record = inject_fault(root, "scanner_shift", tmp_path / "shift", seed=0)
    assert record["n_modified"] == len(pick)
    for r in pick:
        with Image.open(tmp_path / "shift" / "images" / r[0]) as im:
            assert im.mode == "L" and im.size == (64, 64)
    label = next(n for n in CHEXNET_LABELS
                 if any(n in r[1].split("|") and r[0] not in test for r in pick))
    record = inject_fault(root, f"shortcut:{label},fraction=1.0", tmp_path / "tube", seed=0)
    modified = {m["image"] for m in record["modified_images"]}
    for r in pick:
        same = (root / "images" / r[0]).read_bytes() == (tmp_path / "tube" / "images" / r[0]).read_bytes()
        assert same is (r[0] not in modified)
    assert load_nih_dataset(tmp_path / "tube", "test").image_names == test


def test_cli_inject(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cli

    assert cli.main(["inject", "--data", str(dataset), "--fault", "blur:1", "--out", str(tmp_path / "o"),
                     "--seed", "2"]) == 0
    assert (tmp_path / "o" / "fault.json").is_file()
    assert cli.main(["inject", "--data", str(dataset), "--fault", "smudge", "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "unknown fault 'smudge'" in err and "label_noise:RATE" in err
    assert not (tmp_path / "p").exists()
