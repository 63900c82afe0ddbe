"""Regenerate ``model/resources/nih_label_jaccard.json`` from the full NIH label file.

The clinical report flags a borderline finding as unlikely when its label practically never
co-occurs with a confidently present one (label Jaccard < 0.01). That needs label statistics
of the real NIH population, but the project may not ship the NIH CSV itself, so this script
reduces it to counts: images per label and images per label pair (no rows, no patients).

Usage (from the repository root)::

    python bench/make_jaccard_table.py [--labels ../shared/data/nih_labels/Data_Entry_2017_v2020.csv.gz]

It prints the pairs with the smallest non-zero Jaccard and any pair that never co-occurs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.explain.channels import LabelStats, SHIPPED_JACCARD  # noqa: E402

DEFAULT_CSV = REPO.parent / "shared" / "data" / "nih_labels" / "Data_Entry_2017_v2020.csv.gz"
OUT = REPO / "model" / "resources" / SHIPPED_JACCARD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_CSV, help="NIH label CSV (.csv or .csv.gz)")
    parser.add_argument("--out", type=Path, default=OUT, help="output JSON (default: %(default)s)")
    args = parser.parse_args(argv)

    stats = LabelStats.from_nih_csv(args.labels)
    table = stats.to_pairwise_json(source=f"NIH ChestX-ray14 {args.labels.name} (Wang et al., CVPR 2017)")
    args.out.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} from {stats.n_images:,} images")

    jac = stats.jaccard_matrix()
    pairs = []
    for i in range(len(stats.labels)):
        for j in range(i + 1, len(stats.labels)):
            pairs.append((jac[i, j], int(stats.cooccurrence[i, j]), stats.labels[i], stats.labels[j]))
    pairs.sort()
    print("smallest label Jaccard (J, images with both, pair):")
    for value, both, a, b in pairs[:8]:
        print(f"  {value:.4f}  {both:5d}  {a} / {b}")
    zero = [p for p in pairs if p[1] == 0]
    print(f"pairs that never co-occur: {len(zero)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
