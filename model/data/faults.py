"""Fault injectors: copies of an NIH-layout dataset with a realistic fault and its ground truth.

Each fault mimics something that happens to a deployed chest X-ray classifier, so that every
monitor can be shown to fire on the fault it is meant to catch (and stay quiet otherwise):

==================  =============================================  ============================
fault               what changes                                   expected issue
==================  =============================================  ============================
``scanner_shift``   gamma / contrast / brightness / noise of a new  calibration_drift
                    scanner or protocol, on every image
``shortcut:LABEL``  a chest-drain-like tube drawn on LABEL's        fp_cluster (LABEL), with
                    positives in train_val and on a fraction of     auroc_drop / calibration_drift
                    its negatives in test                           as its symptoms
``blur``            Gaussian blur (lower effective resolution)      recall_collapse / auroc_drop
                                                                    (Nodule, Mass first)
``prevalence``      rows subsampled so LABEL's prevalence is P      prevalence_shift (LABEL)
``label_noise``     a fraction of (image, label) entries flipped    auroc_drop / calibration
==================  =============================================  ============================

The output folder gets the same layout (CSV, ``images/``, split lists) plus ``fault.json``: the
spec, the seed, which images were modified and how, which rows were removed, which labels were
flipped, the labels affected. Unmodified images are copied byte for byte; modified ones are written
as 8-bit grey PNGs (NIH files may be RGB/RGBA with the grey value repeated). The copy is built in a
temporary sibling folder and renamed into place, so a crash never leaves a half-written dataset,
and nothing is written outside the output folder. Deterministic under the seed: every image draws
its own random stream from (seed, image name), independent of row order.
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from scipy import ndimage

from engine.core.errors import DataError, TriageError
from engine.core.storage import atomic_write_json
from model.bundle import TOOL_VERSION
from model.data.nih import MAX_IMAGE_PIXELS, SPLIT_FILES, NIHDataset, Record, load_nih_dataset, safe_image_path
from model.labels import CHEXNET_LABELS, NO_FINDING

__all__ = [
    "FAULT_SYNTAX",
    "FAULT_FILE",
    "FaultSpecError",
    "FaultSpec",
    "parse_fault",
    "inject_fault",
    "apply_scanner_shift",
    "draw_tube",
    "apply_blur",
]

FAULT_FILE = "fault.json"

#: Every fault and its syntax (shown in errors and ``inject --help``).
FAULT_SYNTAX: dict[str, str] = {
    "scanner_shift": "scanner_shift[:gamma=G,contrast=C,brightness=B,noise=N]  (defaults gamma=1.2,contrast=1.6,"
                     "brightness=0,noise=0.03)",
    "shortcut": "shortcut:LABEL[,fraction=F,train_fraction=T]  (tube on fraction T of LABEL's train_val "
                "positives and on fraction F of its test negatives; defaults T=0.5, F=0.5: half the "
                "positives carry a drain, so the model learns the finding as well as the tube)",
    "blur": "blur[:sigma=S]  (Gaussian sigma in pixels of a 64-px image, scaled with image width; default 1.5)",
    "prevalence": "prevalence:LABEL=P  (0 <= P <= 1; rows subsampled within each split)",
    "label_noise": "label_noise:RATE[,label=LABEL]  (flip that fraction of (image, label) entries; 0 < RATE <= 1)",
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    # A harder processing curve (contrast x1.6 about mid-grey, slight gamma) plus detector noise:
    # strong enough that even a 1-epoch model's scores move wholesale against its thresholds
    # (measured on 5 phantom/model seeds, bench/bench_monitors.py), yet a plausible protocol change.
    "scanner_shift": {"gamma": 1.2, "contrast": 1.6, "brightness": 0.0, "noise": 0.03},
    "shortcut": {"fraction": 0.5, "train_fraction": 0.5},
    "blur": {"sigma": 1.5},
    "prevalence": {},
    "label_noise": {},
}
#: Labels whose findings are small, so resolution loss hits them first.
SMALL_FINDINGS = ("Nodule", "Mass")

Progress = Callable[[int, int], None]


class FaultSpecError(TriageError):
    """A ``--fault`` spec that does not parse; the message lists every fault and its syntax."""


@dataclass(frozen=True)
class FaultSpec:
    """A parsed fault: its name, resolved parameters (defaults filled in) and the original text."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _syntax_help() -> str:
    return "valid faults:\n" + "\n".join(f"  {s}" for s in FAULT_SYNTAX.values())


def _bad(spec: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"fault spec {spec!r}: {why}\n{_syntax_help()}")


def _number(spec: str, key: str, value: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        raise _bad(spec, f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) or (high is not None and x > high):
        bounds = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise _bad(spec, f"{key} must be in {bounds}, got {value!r}")
    return x


def _label(spec: str, name: str) -> str:
    if name not in CHEXNET_LABELS:
        raise _bad(spec, f"unknown label {name!r}; expected one of {', '.join(CHEXNET_LABELS)}")
    return name


def parse_fault(spec: str) -> FaultSpec:
    """Parse ``NAME[:ARGS]`` (see :data:`FAULT_SYNTAX`) into a :class:`FaultSpec` with defaults filled in."""
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in FAULT_SYNTAX:
        raise _bad(spec, f"unknown fault {name!r}")
    tokens = [t.strip() for t in rest.split(",")] if rest.strip() else []
    if any(not t for t in tokens):
        raise _bad(spec, "empty argument (stray comma?)")
    bare = [t for t in tokens if "=" not in t]
    keyed = [t.split("=", 1) for t in tokens if "=" in t]
    params = dict(_DEFAULTS[name])

    def keyed_only(allowed: dict[str, dict[str, Any]]) -> None:
        for key, value in keyed:
            key = key.strip()
            if key not in allowed:
                raise _bad(spec, f"unknown parameter {key!r} for {name}; expected {', '.join(allowed) or 'none'}")
            params[key] = _number(spec, key, value.strip(), **allowed[key])

    if name == "scanner_shift":
        if bare:
            raise _bad(spec, f"scanner_shift takes key=value parameters, got {bare[0]!r}")
        keyed_only({"gamma": dict(low=0, low_open=True, high=10), "contrast": dict(low=0, low_open=True, high=10),
                    "brightness": dict(low=-1, high=1), "noise": dict(low=0, high=1)})
    elif name == "shortcut":
        if len(bare) != 1:
            raise _bad(spec, "shortcut needs exactly one LABEL")
        params["label"] = _label(spec, bare[0])
        keyed_only({"fraction": dict(low=0, low_open=True, high=1),
                    "train_fraction": dict(low=0, low_open=True, high=1)})
    elif name == "blur":
        if len(bare) > 1:
            raise _bad(spec, "blur takes at most one sigma")
        if bare:
            keyed.append(["sigma", bare[0]])
        keyed_only({"sigma": dict(low=0, low_open=True, high=50)})
    elif name == "prevalence":
        if bare or len(keyed) != 1:
            raise _bad(spec, "prevalence needs exactly one LABEL=P")
        label, value = keyed[0]
        params["label"] = _label(spec, label.strip())
        params["prevalence"] = _number(spec, label.strip(), value.strip(), low=0, high=1)
    elif name == "label_noise":
        if len(bare) != 1:
            raise _bad(spec, "label_noise needs exactly one RATE")
        params["rate"] = _number(spec, "RATE", bare[0], low=0, low_open=True, high=1)
        for key, value in keyed:
            if key.strip() != "label":
                raise _bad(spec, f"unknown parameter {key.strip()!r} for label_noise; expected label")
            params["label"] = _label(spec, value.strip())
    return FaultSpec(name=name, params=params, text=text)


# ---------------------------------------------------------------------------------------------
# Image operations (pure functions of an image and a random stream)


def apply_scanner_shift(img: np.ndarray, params: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Grey image in [0, 1] -> as if acquired by another scanner/protocol (gamma, contrast, offset, noise)."""
    x = np.clip(img, 0.0, 1.0) ** float(params["gamma"])
    x = 0.5 + float(params["contrast"]) * (x - 0.5) + float(params["brightness"])
    if params["noise"] > 0:
        x = x + float(params["noise"]) * rng.standard_normal(x.shape)
    return np.clip(x, 0.0, 1.0)


def apply_blur(img: np.ndarray, sigma64: float) -> np.ndarray:
    """Gaussian blur with sigma given for a 64-px image (scaled to this image's width)."""
    return ndimage.gaussian_filter(img, sigma=sigma64 * img.shape[1] / 64.0, mode="nearest")


def _bezier(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def draw_tube(im: Image.Image, rng: np.random.Generator) -> dict[str, Any]:
    """Draw a chest-drain-like tube in place on an ``L`` image; returns its geometry (pixels).

    A thin bright line enters from outside the body at the lateral chest wall (mid-axillary,
    lower third), curves up inside the hemithorax towards the apex and ends in a small bright tip:
    the radiopaque drain that makes pneumothorax classifiers learn a shortcut. The one tube of the
    project: augmentation draws its counterfactual negatives with it too.
    """
    w, h = im.size
    side = "right" if rng.random() < 0.5 else "left"  # image side
    mirror = (lambda u: 1.0 - u) if side == "right" else (lambda u: u)
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731
    outside = (mirror(0.0), 0.78 + j(0.04))
    entry = (mirror(0.12 + j(0.02)), 0.62 + j(0.04))
    control = (mirror(0.13 + j(0.02)), 0.30 + j(0.04))
    tip = (mirror(0.30 + j(0.04)), 0.20 + j(0.03))
    to_px = lambda p: (p[0] * (w - 1), p[1] * (h - 1))  # noqa: E731
    path = [to_px(outside)] + [to_px(p) for p in _bezier(entry, control, tip, 40)]
    width = max(1, round(w / 64))
    value = 245
    draw = ImageDraw.Draw(im)
    draw.line(path, fill=value, width=width, joint="curve")
    r = max(1, round(1.5 * w / 64))
    tx, ty = (round(v) for v in to_px(tip))
    draw.ellipse([tx - r, ty - r, tx + r, ty + r], fill=255)
    return {"side": side, "width_px": width, "tip_px": [tx, ty], "tip_radius_px": r,
            "path_px": [[round(x, 2), round(y, 2)] for x, y in path]}


# ---------------------------------------------------------------------------------------------
# Reading / writing


def _load_grey(path: Path) -> Image.Image:
    """Any PNG/JPEG -> an 8-bit ``L`` image at its own resolution (16-bit scaled, RGB(A) converted)."""
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {im.size[0]}x{im.size[1]} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = arr / (65535.0 if arr.max() > 255 else 255.0)
                return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
            if im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
            return im.convert("L")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc


def _to_float(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64) / 255.0


def _from_float(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def _save(im: Image.Image, path: Path) -> None:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def _image_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _split_of(root: Path) -> dict[str, str]:
    """Image name -> split ('train_val' / 'test') from the list files that exist."""
    out: dict[str, str] = {}
    for split, fname in SPLIT_FILES.items():
        path = root / fname
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out[line.strip()] = split
    return out


def _labels_text(vector: list[int]) -> str:
    names = [CHEXNET_LABELS[i] for i, v in enumerate(vector) if v]
    return "|".join(names) if names else NO_FINDING


# ---------------------------------------------------------------------------------------------
# The plan: which rows are modified / removed / relabelled


@dataclass
class _Plan:
    """What a fault does to a dataset copy, decided before any file is written."""

    modify: dict[str, dict[str, Any]] = field(default_factory=dict)  # image -> record (op, params ...)
    remove: set[str] = field(default_factory=set)
    flips: list[dict[str, Any]] = field(default_factory=list)
    affected: list[str] = field(default_factory=list)
    expected: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


_Planner = Callable[[dict[str, Any], NIHDataset, dict[str, str], np.random.Generator], _Plan]


def _plan(spec: FaultSpec, ds: NIHDataset, splits: dict[str, str], seed: int) -> _Plan:
    """The fault's plan, drawn from one random stream per (seed, fault name)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    return _PLANNERS[spec.name](spec.params, ds, splits, rng)


def _every_image(op: str, labels: tuple[str, ...], kinds: tuple[str, ...]) -> _Planner:
    """A planner that applies ``op`` to every image (scanner_shift, blur); ``kinds`` are expected on any label.

    ``labels`` are the ones the fault hits first (``affected_labels``); a fault on every image may show
    on any label, so the ground truth names all 14.
    """

    def plan(p: dict[str, Any], ds: NIHDataset, splits: dict[str, str], rng: np.random.Generator) -> _Plan:
        return _Plan(modify={n: {"op": op} for n in ds.image_names}, affected=list(labels),
                     expected=[{"kind": kind, "labels": list(CHEXNET_LABELS)} for kind in kinds])

    return plan


def _plan_shortcut(p: dict[str, Any], ds: NIHDataset, splits: dict[str, str], rng: np.random.Generator) -> _Plan:
    """A tube on a share of the label's train_val positives and of its test negatives."""
    if not all((ds.root / f).is_file() for f in SPLIT_FILES.values()):
        raise DataError(f"{ds.root}: the shortcut fault needs {' and '.join(SPLIT_FILES.values())} "
                        "(tube on train_val positives, on test negatives)")
    plan = _Plan()
    names, labels = ds.image_names, ds.labels
    k = CHEXNET_LABELS.index(p["label"])
    all_train_pos = [n for n, y in zip(names, labels[:, k]) if y and splits.get(n) == "train_val"]
    test_neg = [n for n, y in zip(names, labels[:, k]) if not y and splits.get(n) == "test"]
    n_train = int(round(p["train_fraction"] * len(all_train_pos)))
    train_pos = [all_train_pos[i] for i in sorted(rng.permutation(len(all_train_pos))[:n_train].tolist())]
    n_pick = int(round(p["fraction"] * len(test_neg)))
    picked = sorted(rng.permutation(len(test_neg))[:n_pick].tolist())
    for n in train_pos:
        plan.modify[n] = {"op": "shortcut_tube", "split": "train_val", "label_positive": True}
    for i in picked:
        plan.modify[test_neg[i]] = {"op": "shortcut_tube", "split": "test", "label_positive": False}
    plan.affected = [p["label"]]
    # The cause first; its symptoms on the same label count as the fault showing (the demo's shortcut
    # run raises all three), so a backtest can tell when treating them heals it.
    plan.expected = [{"kind": "fp_cluster", "labels": [p["label"]],
                      "when": "a model trained on this folder's train_val is audited on its test split"},
                     {"kind": "auroc_drop", "labels": [p["label"]], "when": "symptom of the shortcut"},
                     {"kind": "calibration_drift", "labels": [p["label"]], "when": "symptom of the shortcut"}]
    plan.notes = {"train_val_positives": len(all_train_pos), "train_val_positives_marked": len(train_pos),
                  "test_negatives": len(test_neg),
                  "test_negatives_marked": n_pick}
    return plan


def _prevalence_keep(n_pos: int, n_neg: int, target: float) -> tuple[int, int]:
    """(positives, negatives) to keep of a group so that the positives' share is ``target``."""
    if target >= 1.0:
        return n_pos, 0
    if target <= 0.0:
        return 0, n_neg
    if n_pos / max(n_pos + n_neg, 1) < target:
        return n_pos, min(n_neg, int(round(n_pos * (1 - target) / target)))
    return min(n_pos, int(round(n_neg * target / (1 - target)))), n_neg


def _plan_prevalence(p: dict[str, Any], ds: NIHDataset, splits: dict[str, str], rng: np.random.Generator) -> _Plan:
    """Rows removed within each split (positives or negatives) until the label's prevalence is P."""
    plan = _Plan()
    names, labels = ds.image_names, ds.labels
    k = CHEXNET_LABELS.index(p["label"])
    target = float(p["prevalence"])
    achieved = {}
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(splits.get(n, "unlisted"), []).append(i)
    for group, idx in sorted(groups.items()):
        idx_arr = np.array(idx)
        pos = idx_arr[labels[idx_arr, k] == 1]
        neg = idx_arr[labels[idx_arr, k] == 0]
        keep_pos, keep_neg = _prevalence_keep(len(pos), len(neg), target)
        drop = np.r_[rng.permutation(pos)[keep_pos:], rng.permutation(neg)[keep_neg:]].astype(int)
        plan.remove.update(names[i] for i in drop)
        kept = keep_pos + keep_neg
        achieved[group] = {"n": kept, "positives": keep_pos,
                           "prevalence": (keep_pos / kept) if kept else None,
                           "before": {"n": len(idx_arr), "positives": int(len(pos))}}
    if len(plan.remove) == len(names):
        raise DataError(f"{ds.root}: prevalence {target:g} for {p['label']} would remove every row "
                        f"(the label has {int(labels[:, k].sum())} positive(s))")
    plan.affected = [p["label"]]
    plan.expected = [{"kind": "prevalence_shift", "labels": [p["label"]]}]
    plan.notes = {"per_split": achieved}
    return plan


def _plan_label_noise(p: dict[str, Any], ds: NIHDataset, splits: dict[str, str], rng: np.random.Generator) -> _Plan:
    """A random fraction of (image, label) entries flipped (of one label, or of all 14)."""
    plan = _Plan()
    names, labels = ds.image_names, ds.labels
    cols = [CHEXNET_LABELS.index(p["label"])] if "label" in p else list(range(len(CHEXNET_LABELS)))
    n_entries = len(names) * len(cols)
    n_flip = int(round(p["rate"] * n_entries))
    chosen = np.sort(rng.choice(n_entries, size=n_flip, replace=False))
    for e in chosen.tolist():
        row, c = divmod(e, len(cols))
        k = cols[c]
        old = int(labels[row, k])
        plan.flips.append({"image": names[row], "label": CHEXNET_LABELS[k], "from": old, "to": 1 - old})
    plan.affected = sorted({f["label"] for f in plan.flips}, key=CHEXNET_LABELS.index)
    plan.expected = [{"kind": "auroc_drop", "labels": plan.affected,
                      "when": "a model trained on the noisy labels, or audited against them"}]
    plan.notes = {"entries": n_entries, "flipped": n_flip}
    return plan


#: One planner per fault (an explicit table: adding a fault means a row here and in FAULT_SYNTAX).
_PLANNERS: dict[str, _Planner] = {
    # Every label's calibration moves under a new scanner's curve; small findings lose recall first.
    "scanner_shift": _every_image("scanner_shift", CHEXNET_LABELS, ("calibration_drift",)),
    "shortcut": _plan_shortcut,
    # Lost resolution costs recall (small findings first) and can cost ranking.
    "blur": _every_image("blur", SMALL_FINDINGS, ("recall_collapse", "auroc_drop")),
    "prevalence": _plan_prevalence,
    "label_noise": _plan_label_noise,
}
assert set(_PLANNERS) == set(FAULT_SYNTAX)


# ---------------------------------------------------------------------------------------------


def _check_out(data_dir: Path, out_dir: Path) -> None:
    src, dst = data_dir.resolve(), out_dir.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DataError(f"{out_dir}: the output folder must lie outside the dataset {data_dir} (and not contain it)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"{out_dir}: already exists and is not an empty folder; choose a new output path")


def _rewrite_csv(src: Path, dst: Path, remove: set[str], relabel: dict[str, str]) -> None:
    with open(src, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip() for h in rows[0]]
    name_col, label_col = header.index("Image Index"), header.index("Finding Labels")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    for row in rows[1:]:
        if not row or all(not c.strip() for c in row):
            continue
        name = row[name_col].strip()
        if name in remove:
            continue
        if name in relabel:
            row = list(row)
            row[label_col] = relabel[name]
        writer.writerow(row)
    dst.write_text(out.getvalue(), encoding="utf-8")


def _relabels(ds: NIHDataset, plan: _Plan) -> dict[str, str]:
    """Image name -> its new ``Finding Labels`` text, for every image with a flipped label."""
    if not plan.flips:
        return {}
    vectors = {r.image_index: list(r.labels) for r in ds.records}
    for f in plan.flips:
        vectors[f["image"]][CHEXNET_LABELS.index(f["label"])] = f["to"]
    return {f["image"]: _labels_text(vectors[f["image"]]) for f in plan.flips}


def _copy_tables(ds: NIHDataset, data_dir: Path, tmp: Path, plan: _Plan, relabel: dict[str, str]) -> None:
    """The label CSV and the split lists, with removed rows dropped and flipped labels rewritten."""
    if plan.remove or relabel:
        _rewrite_csv(ds.csv_path, tmp / ds.csv_path.name, plan.remove, relabel)
    else:
        shutil.copyfile(ds.csv_path, tmp / ds.csv_path.name)
    for fname in SPLIT_FILES.values():
        src = data_dir / fname
        if not src.is_file():
            continue
        if plan.remove:
            kept = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and ln.strip() not in plan.remove]
            (tmp / fname).write_text("".join(f"{n}\n" for n in kept), encoding="utf-8")
        else:
            shutil.copyfile(src, tmp / fname)


def _write_modified(src: Path, dst: Path, name: str, entry: dict[str, Any], fault: FaultSpec, seed: int) -> dict[str, Any]:
    """Write the faulted copy of one image (its own random stream); returns its record."""
    im = _load_grey(src)
    rng = _image_rng(seed, name)
    record = {"image": name, **entry}
    if entry["op"] == "scanner_shift":
        im = _from_float(apply_scanner_shift(_to_float(im), fault.params, rng))
    elif entry["op"] == "blur":
        im = _from_float(apply_blur(_to_float(im), float(fault.params["sigma"])))
    elif entry["op"] == "shortcut_tube":
        record.update(draw_tube(im, rng))
    _save(im, dst)
    return record


def _copy_images(ds: NIHDataset, tmp: Path, plan: _Plan, fault: FaultSpec, seed: int,
                 progress: Progress | None) -> tuple[list[Record], list[dict[str, Any]]]:
    """Every kept image into ``tmp/images``: untouched ones byte for byte, planned ones faulted.

    Returns (the kept records, the records of the modified images)."""
    modified: list[dict[str, Any]] = []
    kept_records = [r for r in ds.records if r.image_index not in plan.remove]
    for i, rec in enumerate(kept_records):
        name = rec.image_index
        src = safe_image_path(ds.images_dir, name, where=str(ds.csv_path))
        dst = safe_image_path(tmp / "images", name, where=str(ds.csv_path))
        dst.parent.mkdir(parents=True, exist_ok=True)
        entry = plan.modify.get(name)
        if entry is None:
            shutil.copyfile(src, dst)
        else:
            modified.append(_write_modified(src, dst, name, entry, fault, seed))
        if progress is not None:
            progress(i + 1, len(kept_records))
    return kept_records, modified


def _fault_record(fault: FaultSpec, seed: int, data_dir: Path, ds: NIHDataset, tmp: Path, plan: _Plan,
                  kept_records: list[Record], modified: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``fault.json`` record: the spec, what changed, and the copy's manifest hash."""
    return {
        "format": "cxr-triage-fault",
        "format_version": 1,
        "fault": fault.name,
        "spec": fault.text,
        "params": fault.params,
        "seed": seed,
        "source": str(data_dir),
        "source_manifest_hash": ds.manifest_hash(),
        "csv": ds.csv_path.name,
        "affected_labels": plan.affected,
        "expected_issues": plan.expected,
        "manifest_hash": load_nih_dataset(tmp, "all").manifest_hash(),
        "n_images": len(kept_records),
        "n_modified": len(modified),
        "modified_images": modified,
        "removed_images": sorted(plan.remove),
        "label_flips": plan.flips,
        "notes": plan.notes,
        "tool_version": TOOL_VERSION,
    }


def inject_fault(data_dir: str | Path, spec: str | FaultSpec, out_dir: str | Path, *, seed: int = 0,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Write a copy of ``data_dir`` with the fault ``spec`` into ``out_dir``; returns the fault record.

    ``out_dir`` must not exist (or be empty) and must lie outside ``data_dir``. The record is also
    written to ``out_dir/fault.json``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    fault = spec if isinstance(spec, FaultSpec) else parse_fault(spec)
    ds = load_nih_dataset(data_dir, "all")
    _check_out(data_dir, out_dir)
    plan = _plan(fault, ds, _split_of(data_dir), seed)
    relabel = _relabels(ds, plan)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # (not mkdtemp: that would make the finished dataset folder private, mode 0700)
    try:
        (tmp / "images").mkdir()
        _copy_tables(ds, data_dir, tmp, plan, relabel)
        kept_records, modified = _copy_images(ds, tmp, plan, fault, seed, progress)
        record_out = _fault_record(fault, seed, data_dir, ds, tmp, plan, kept_records, modified)
        atomic_write_json(tmp / FAULT_FILE, record_out)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record_out
