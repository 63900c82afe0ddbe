"""The data set writer: patients, follow-ups and splits planned from NIH's statistics, then rendered.

The files are written exactly as the NIH release lays them out (``Data_Entry_2017_v2020.csv``,
``images/``, ``train_val_list.txt``, ``test_list.txt``) plus ``phantom.json`` (provenance).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import model.data.phantom.knobs as knobs
from model.data.phantom.anatomy import Anatomy, sample_anatomy, sample_shot
from model.data.phantom.checks import check_int, check_out_dir, check_test_fraction
from model.data.phantom.nih_stats import label_combinations, label_table
from model.data.phantom.render import child_seeds, render_radiograph
from model.labels import CHEXNET_LABELS, NO_FINDING, NUM_LABELS

GENERATOR_NAME = "cxr-triage-phantom"
#: Bump whenever the pixels or the CSV for a given (n, size, seed) change.
GENERATOR_VERSION = "1.0.0"

#: The NIH v2020 header verbatim: 9 names, 11 fields (the last two names each span two values).
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
#: Field of view of a phantom in mm, for the ``OriginalImagePixelSpacing`` columns.
FIELD_OF_VIEW_MM = 430.0


@dataclass(frozen=True)
class ImageSpec:
    """One CSV row and what is needed to render its pixels."""

    name: str
    patient: int
    followup: int
    labels: np.ndarray
    age: int
    gender: str
    view: str
    shot_seed: int
    noise_seed: int


def _max_followups(n: int) -> int:
    """Cap on images per patient, so that a small ``n`` still spreads over many patients."""
    return int(max(1, min(knobs.MAX_FOLLOWUPS, n // 25)))


def _sample_followup_counts(n: int, rng: np.random.Generator) -> list[int]:
    """Images per patient from NIH's distribution truncated at the cap, summing to exactly ``n``."""
    cap = _max_followups(n)
    table = np.array([(k, c) for k, c in label_table()["images_per_patient"] if k <= cap], dtype=np.float64)
    p = table[:, 1] / table[:, 1].sum()
    counts: list[int] = []
    total = 0
    while total < n:
        k = int(table[rng.choice(len(p), p=p), 0])
        k = min(k, n - total)
        counts.append(k)
        total += k
    return counts


def plan_dataset(n: int, rng: np.random.Generator) -> tuple[list[ImageSpec], dict[int, tuple[Anatomy, list[int]]]]:
    """Patients, their follow-up label sequences and acquisition seeds (no pixels yet).

    A follow-up keeps the previous image's whole label set with probability ``followup.keep``
    from the shipped table (NIH's persistence in excess of chance), otherwise draws a fresh one:
    each image's label distribution stays exactly NIH's. A finding that recurs in a patient
    reuses the patient's per-finding geometry stream, so it reappears in the same place.
    """
    tab = label_table()
    keep = float(tab["followup"]["keep"])
    views = tab["view_position"]
    p_ap = views.get("AP", 0) / max(1, sum(views.values()))
    genders = tab["patient_gender"]
    p_female = genders.get("F", 0) / max(1, sum(genders.values()))
    ages = np.array(tab["patient_age"], dtype=np.float64)
    age_p = ages[:, 1] / ages[:, 1].sum()
    mat, cdf = label_combinations()

    specs: list[ImageSpec] = []
    patients: dict[int, tuple[Anatomy, list[int]]] = {}
    for pid, count in enumerate(_sample_followup_counts(n, rng), start=1):
        female = bool(rng.random() < p_female)
        anat = sample_anatomy(np.random.default_rng(child_seeds(rng, 1)[0]), female=female)
        patients[pid] = (anat, child_seeds(rng, NUM_LABELS))
        age = int(ages[rng.choice(len(age_p), p=age_p), 0])
        combo = None
        for fu in range(count):
            if combo is None or rng.random() >= keep:
                combo = int(np.searchsorted(cdf, rng.random(), side="right"))
            seeds = child_seeds(rng, 2)
            specs.append(
                ImageSpec(
                    name=f"{pid:08d}_{fu:03d}.png",
                    patient=pid,
                    followup=fu,
                    labels=mat[combo],
                    age=min(age + fu // 3, 100),
                    gender="F" if female else "M",
                    view="AP" if rng.random() < p_ap else "PA",
                    shot_seed=seeds[0],
                    noise_seed=seeds[1],
                )
            )
    return specs, patients


def _split_patients(patient_ids: Sequence[int], test_fraction: float, rng: np.random.Generator) -> set[int]:
    """Patient ids of the test split (a shuffled ``test_fraction`` of patients, at least one)."""
    ids = np.array(sorted(patient_ids))
    if test_fraction <= 0.0 or len(ids) < 2:
        return set()
    k = int(np.clip(round(test_fraction * len(ids)), 1, len(ids) - 1))
    return {int(x) for x in rng.permutation(ids)[:k]}


def _finding_labels(vec: np.ndarray) -> str:
    """NIH ``Finding Labels`` field: alphabetical names joined by ``|`` or ``No Finding``."""
    names = sorted(CHEXNET_LABELS[i] for i in np.flatnonzero(vec))
    return "|".join(names) if names else NO_FINDING


def _png_bytes(img: np.ndarray) -> bytes:
    """Deterministic 8-bit greyscale PNG (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generate_phantoms(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, *, test_fraction: float = 0.2, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``n`` phantom radiographs and their labels to ``out_dir`` in the NIH layout.

    Creates ``out_dir`` (which must be absent or empty) with ``Data_Entry_2017_v2020.csv``,
    ``images/*.png`` (``size x size``, mode L), patient-disjoint ``train_val_list.txt`` /
    ``test_list.txt`` (about ``test_fraction`` of the patients in test) and ``phantom.json``
    (provenance). The same ``(n, size, seed, test_fraction)`` gives byte-identical files.
    ``progress(done, total)`` is called after each image is written. Returns ``out_dir``.
    Bad arguments raise :class:`~engine.core.errors.DataError` naming the parameter.
    """
    n = check_int("n", n, minimum=1)
    size = check_int("size", size, minimum=16)
    seed = check_int("seed", seed, minimum=0)
    test_fraction = check_test_fraction(test_fraction)
    out = check_out_dir(out_dir)

    rng = np.random.default_rng(seed)
    specs, patients = plan_dataset(n, rng)
    test_ids = _split_patients(list(patients), test_fraction, rng)
    _write_images(out / "images", specs, patients, size, progress)
    _write_csv(out / "Data_Entry_2017_v2020.csv", specs, size)
    _write_lines(out / "train_val_list.txt", [s.name for s in specs if s.patient not in test_ids])
    _write_lines(out / "test_list.txt", [s.name for s in specs if s.patient in test_ids])
    meta = _provenance(n, size, seed, test_fraction, patients=len(patients), test_patients=len(test_ids))
    (out / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def _write_images(images: Path, specs: Sequence[ImageSpec], patients: dict[int, tuple[Anatomy, list[int]]], size: int, progress: Callable[[int, int], None] | None) -> None:
    """Render every planned image into ``images/`` as a PNG, calling ``progress`` after each."""
    images.mkdir(parents=True, exist_ok=True)
    for done, spec in enumerate(specs, start=1):
        anat, lesion_seeds = patients[spec.patient]
        shot_rng = np.random.default_rng(spec.shot_seed)
        shot = sample_shot(shot_rng, ap=spec.view == "AP")
        img, _ = render_radiograph(spec.labels, size, anat, shot, lesion_seeds, spec.shot_seed, np.random.default_rng(spec.noise_seed), False)
        (images / spec.name).write_bytes(_png_bytes(img))
        if progress is not None:
            progress(done, len(specs))


def _provenance(n: int, size: int, seed: int, test_fraction: float, *, patients: int, test_patients: int) -> dict:
    """The ``phantom.json`` record: generator, arguments, patient counts, label source and knobs."""
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "test_fraction": test_fraction,
        "patients": patients,
        "test_patients": test_patients,
        "label_source": label_table()["source"],
        "knobs": {"lesion_contrast": knobs.LESION_CONTRAST, "subtle_share": knobs.SUBTLE_SHARE, "noise_level": knobs.NOISE_LEVEL, "anatomy_variation": knobs.ANATOMY_VARIATION},
    }


def _write_csv(path: Path, specs: Sequence[ImageSpec], size: int) -> None:
    """The NIH label file: verbatim header, 11 fields a row, ``\\n`` line ends."""
    spacing = f"{FIELD_OF_VIEW_MM / size:.3f}"
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(NIH_HEADER + "\n")
        w = csv.writer(fh, lineterminator="\n")
        for s in specs:
            w.writerow([s.name, _finding_labels(s.labels), s.followup, s.patient, s.age, s.gender, s.view, size, size, spacing, spacing])


def _write_lines(path: Path, names: Sequence[str]) -> None:
    """One image name a line, as the NIH split lists."""
    path.write_text("".join(f"{x}\n" for x in names), encoding="utf-8")
