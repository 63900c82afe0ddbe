"""Regenerate the phantom generator's shipped label statistics from the real NIH label files.

The phantom generator samples label vectors, follow-up counts and view positions from the real
NIH ChestX-ray14 joint distribution, but the project may not ship the NIH CSV itself; this script
reduces it to figures (counts, not rows) and writes them as package data:

- ``model/resources/nih_label_combinations.json`` from ``Data_Entry_2017_v2020.csv.gz``
- ``model/resources/nih_bbox_positions.json`` from ``BBox_List_2017.csv.gz``

Usage (from the repository root)::

    python bench/make_label_table.py [--labels-dir ../shared/data/nih_labels]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.labels import CHEXNET_LABELS, NO_FINDING  # noqa: E402

DEFAULT_LABELS_DIR = REPO.parent / "shared" / "data" / "nih_labels"
OUT_DIR = REPO / "model" / "resources"
# The NIH box file spells one finding differently from the label file.
BBOX_NAME_FIX = {"Infiltrate": "Infiltration"}


def _read_rows(path: Path) -> list[list[str]]:
    """All data rows of a (gzipped) NIH CSV, header dropped."""
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [row for row in reader if row]


def _label_set(field: str) -> tuple[int, ...]:
    """CheXNet indices of a ``Finding Labels`` field; ``No Finding`` is the empty tuple."""
    names = [x for x in field.split("|") if x and x != NO_FINDING]
    return tuple(sorted(CHEXNET_LABELS.index(x) for x in names))


def label_table(rows: list[list[str]]) -> dict:
    """Joint label distribution, follow-up structure and acquisition shares of the NIH table."""
    combos = collections.Counter(_label_set(r[1]) for r in rows)
    by_patient: dict[str, list[tuple[int, tuple[int, ...]]]] = collections.defaultdict(list)
    for r in rows:
        by_patient[r[3]].append((int(r[2]), _label_set(r[1])))
    per_patient = collections.Counter(len(v) for v in by_patient.values())
    # Follow-up persistence: how often a finding present on one image is still labelled on the
    # patient's next image. The generator keeps the whole previous label set with probability
    # ``keep`` (else draws afresh), which leaves every image's marginal exactly NIH's; ``keep``
    # is the persistence in excess of chance, averaged over findings weighted by frequency.
    n = len(rows)
    marg = [sum(c for s, c in combos.items() if i in s) / n for i in range(len(CHEXNET_LABELS))]
    had = [0] * len(CHEXNET_LABELS)
    kept = [0] * len(CHEXNET_LABELS)
    same = pairs = 0
    for seq in by_patient.values():
        seq.sort()
        for (_, a), (_, b) in zip(seq, seq[1:]):
            pairs += 1
            same += a == b
            for i in a:
                had[i] += 1
                kept[i] += i in b
    persistence = [kept[i] / had[i] for i in range(len(had))]
    excess = [(persistence[i] - marg[i]) / (1 - marg[i]) for i in range(len(had))]
    keep = sum(e * h for e, h in zip(excess, had)) / sum(had)
    ages = collections.Counter(int(r[4]) for r in rows)
    return {
        "source": "NIH ChestX-ray14 Data_Entry_2017_v2020.csv (Wang et al., CVPR 2017)",
        "labels": list(CHEXNET_LABELS),
        "n_images": n,
        "n_patients": len(by_patient),
        # [image count, [CheXNet label indices]]; [] is "No Finding"; most frequent first.
        "combinations": [[c, list(s)] for s, c in sorted(combos.items(), key=lambda kv: (-kv[1], kv[0]))],
        # [images per patient, number of patients]
        "images_per_patient": [[k, c] for k, c in sorted(per_patient.items())],
        "view_position": dict(sorted(collections.Counter(r[6] for r in rows).items())),
        "patient_gender": dict(sorted(collections.Counter(r[5] for r in rows).items())),
        # [age in years, image count]
        "patient_age": [[a, c] for a, c in sorted(ages.items())],
        "followup": {
            "same_labels_share": round(same / pairs, 4),
            "label_persistence": [round(p, 4) for p in persistence],
            "keep": round(keep, 4),
        },
    }


def bbox_table(rows: list[list[str]]) -> dict:
    """Radiologist boxes per finding as normalised ``[cx, cy, w, h]`` (image is 1024 px)."""
    boxes: dict[str, list[list[float]]] = collections.defaultdict(list)
    for r in rows:
        name = BBOX_NAME_FIX.get(r[1], r[1])
        x, y, w, h = (float(v) / 1024.0 for v in r[2:6])
        boxes[name].append([round(x + w / 2, 3), round(y + h / 2, 3), round(w, 3), round(h, 3)])
    return {
        "source": "NIH ChestX-ray14 BBox_List_2017.csv, 1024-px coordinates normalised to 0..1",
        "format": "[centre x, centre y, width, height]; x to the image right (patient left), y down",
        "boxes": {k: sorted(v) for k, v in sorted(boxes.items(), key=lambda kv: CHEXNET_LABELS.index(kv[0]))},
    }


def dump_compact(obj: dict, path: Path) -> None:
    """One top-level key per line, compact values: small to ship, still diff-able."""
    lines = [f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in obj.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels-dir", type=Path, default=DEFAULT_LABELS_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = label_table(_read_rows(args.labels_dir / "Data_Entry_2017_v2020.csv.gz"))
    dump_compact(table, args.out_dir / "nih_label_combinations.json")
    dump_compact(bbox_table(_read_rows(args.labels_dir / "BBox_List_2017.csv.gz")), args.out_dir / "nih_bbox_positions.json")
    nf = next(c for c, s in table["combinations"] if not s) / table["n_images"]
    print(f"{len(table['combinations'])} combinations, No Finding {nf:.3f}, follow-up keep {table['followup']['keep']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
