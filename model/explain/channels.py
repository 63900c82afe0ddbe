"""Polarized classifier channels and the label co-occurrence (Jaccard) statistics that judge them.

A DenseNet classifier is one linear layer on 1024 pooled channels, so every channel votes for
some labels and against others with a weight ``w_kc``. A *polarized* channel votes strongly FOR
at least one label and strongly AGAINST at least one other. That is legitimate when the two
label sets rarely occur together in patients (the channel separates them); it is a conflict
when they often co-occur, since then the channel suppresses a finding exactly when a related
one is present.

Rules (documented here and echoed in every result's ``definition``):

* **strong**: ``|w_kc|`` greater than the ``P``-th percentile of ``|w_k.|`` (the label's own row;
  default ``P = 90``, so about the top tenth of each row). Rows are judged separately because
  labels' weight scales differ.
* **polarized**: strong-positive for >= 1 label and strong-negative for >= 1 other label.
* **score**: sum over the channel's strong entries of ``|w_kc| / t_k`` (``t_k`` the row's
  percentile): how far, in row units, the channel pushes labels apart; channels are listed by it.
* **Jaccard** (the category uses this one): image-set Jaccard between the positive-label set P
  and the negative-label set N, ``J = |A & B| / |A | B|`` where A = images with any label of P
  and B = images with any label of N, counted in the named label source. Mean and maximum of the
  pairwise label Jaccard over P x N are reported alongside.
* **category**: Perfect ``J = 0``, Legitimate ``J < 0.1``, Mixed ``0.1 <= J < 0.3``, Conflict
  ``J >= 0.3``; Undetermined when no image of the source has any label of P or N.

The label source is always named (path and number of images): on the full NIH table (112,120
images) no two labels are exclusive (the rarest pair, Hernia and Cardiomegaly, shares 7 images,
J = 0.0023), while small samples show many spurious zeros.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import DataError
from model.labels import CHEXNET_LABELS, NO_FINDING

__all__ = [
    "CATEGORIES",
    "SHIPPED_JACCARD",
    "LabelStats",
    "shipped_label_stats",
    "jaccard_category",
    "PolarizedChannel",
    "ChannelAnalysis",
    "polarized_channels",
    "analyze_channels",
]

#: Categories in order of increasing label overlap.
CATEGORIES = ("Perfect", "Legitimate", "Mixed", "Conflict", "Undetermined")
#: Shipped pairwise NIH label statistics (see ``bench/make_jaccard_table.py``).
SHIPPED_JACCARD = "nih_label_jaccard.json"
_RESOURCES = "model.resources"

DEFINITION = (
    "strong: |w_kc| > P-th percentile of |w_k.| (per label row); polarized: strong-positive for >=1 label "
    "and strong-negative for >=1 other; J: image-set Jaccard |A&B|/|A|B| with A = images with any "
    "positive-set label, B = images with any negative-set label, in the named label source; "
    "Perfect J=0, Legitimate J<0.1, Mixed 0.1<=J<0.3, Conflict J>=0.3"
)


def jaccard_category(j: float | None) -> str:
    """Category of a channel from its label Jaccard (``None``/NaN: Undetermined)."""
    if j is None or math.isnan(j):
        return "Undetermined"
    if j == 0:
        return "Perfect"
    if j < 0.1:
        return "Legitimate"
    if j < 0.3:
        return "Mixed"
    return "Conflict"


# --------------------------------------------------------------------------------------------
# Label statistics


@dataclass(frozen=True)
class LabelStats:
    """Label counts and co-occurrence of one label source, and where they came from.

    ``cooccurrence[i, j]`` is the number of images labelled with both ``labels[i]`` and
    ``labels[j]`` (diagonal: images per label). Image-set Jaccard between label *sets* needs the
    joint distribution, kept as distinct label vectors ``combos`` with their ``combo_counts``; a
    source built from pairwise counts only (the shipped table) answers pairwise questions only.
    """

    labels: tuple[str, ...]
    n_images: int
    cooccurrence: np.ndarray
    source: str
    combos: np.ndarray | None = field(default=None, repr=False)
    combo_counts: np.ndarray | None = field(default=None, repr=False)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_matrix(cls, matrix: np.ndarray, labels: Sequence[str], source: str) -> "LabelStats":
        """From an ``(N, K)`` 0/1 label matrix (one row per image)."""
        m = np.asarray(matrix)
        if m.ndim != 2 or m.shape[1] != len(labels):
            raise DataError(f"{source}: label matrix must be (N, {len(labels)}); got shape {m.shape}")
        m = (m > 0).astype(np.uint8)
        if len(m):
            combos, counts = np.unique(m, axis=0, return_counts=True)
        else:
            combos, counts = np.zeros((0, len(labels)), np.uint8), np.zeros(0, np.int64)
        return cls._from_combos(combos, counts.astype(np.int64), tuple(labels), source)

    @classmethod
    def _from_combos(cls, combos: np.ndarray, counts: np.ndarray, labels: tuple[str, ...], source: str) -> "LabelStats":
        c = combos.astype(np.int64)
        cooc = (c * counts[:, None]).T @ c
        return cls(labels, int(counts.sum()), cooc, source, combos.astype(np.uint8), counts)

    @classmethod
    def from_dataset(cls, dataset: Any) -> "LabelStats":
        """From the labels of an :class:`~model.data.NIHDataset` (its selected split)."""
        source = f"{dataset.csv_path} (split {dataset.split}, {len(dataset):,} images)"
        return cls.from_matrix(dataset.labels, CHEXNET_LABELS, source)

    @classmethod
    def from_nih_csv(cls, path: str | Path) -> "LabelStats":
        """From an NIH label CSV (``.csv`` or ``.csv.gz``) alone; images are not needed."""
        path = Path(path)
        index = {name: i for i, name in enumerate(CHEXNET_LABELS)}
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw).decode("utf-8-sig") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8-sig")
        except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read the NIH label CSV ({exc})") from exc
        reader = csv.reader(io.StringIO(text))
        header = [h.strip() for h in next(reader, [])]
        if "Finding Labels" not in header:
            raise DataError(f"{path}: no 'Finding Labels' column; header is {header}")
        col = header.index("Finding Labels")
        rows: list[np.ndarray] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= col:
                raise DataError(f"{path.name} row {line_no}: {len(row)} fields; no 'Finding Labels' value")
            vec = np.zeros(len(CHEXNET_LABELS), np.uint8)
            for name in (t.strip() for t in row[col].split("|")):
                if name == NO_FINDING:
                    continue
                if name not in index:
                    raise DataError(f"{path.name} row {line_no}: unknown label {name!r}; expected "
                                    f"'{NO_FINDING}' or names from: {', '.join(CHEXNET_LABELS)}")
                vec[index[name]] = 1
            rows.append(vec)
        if not rows:
            raise DataError(f"{path}: no label rows")
        return cls.from_matrix(np.stack(rows), CHEXNET_LABELS, f"{path} ({len(rows):,} images)")

    @classmethod
    def from_pairwise_json(cls, table: dict[str, Any], where: str) -> "LabelStats":
        """From the shipped pairwise table (``labels``, ``n_images``, ``cooccurrence``)."""
        try:
            labels = tuple(table["labels"])
            cooc = np.asarray(table["cooccurrence"], dtype=np.int64)
            n = int(table["n_images"])
            source = str(table.get("source", where))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: not a label co-occurrence table ({exc!r})") from exc
        if cooc.shape != (len(labels), len(labels)) or not (cooc == cooc.T).all():
            raise DataError(f"{where}: 'cooccurrence' must be a symmetric {len(labels)}x{len(labels)} matrix; "
                            f"got shape {cooc.shape}")
        return cls(labels, n, cooc, f"{source} ({n:,} images; shipped as {where})")

    # -- queries --------------------------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        return np.diag(self.cooccurrence).copy()

    def index(self, name: str) -> int | None:
        return self.labels.index(name) if name in self.labels else None

    def jaccard_matrix(self) -> np.ndarray:
        """Pairwise label Jaccard ``both / (n_i + n_j - both)``; NaN where neither label occurs."""
        n = self.counts.astype(np.float64)
        union = n[:, None] + n[None, :] - self.cooccurrence
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, self.cooccurrence / np.maximum(union, 1), np.nan)

    def pair_jaccard(self, a: str, b: str) -> float | None:
        """Jaccard of two labels by name (``None`` if either is unknown or neither occurs)."""
        i, j = self.index(a), self.index(b)
        if i is None or j is None:
            return None
        value = float(self.jaccard_matrix()[i, j])
        return None if math.isnan(value) else value

    def set_jaccard(self, positive: Sequence[str], negative: Sequence[str]) -> tuple[float | None, int, int]:
        """``(J, images with both sides, images with either side)`` of two label sets.

        Needs the joint distribution; ``J`` is ``None`` when no image has a label of either set.
        """
        if self.combos is None or self.combo_counts is None:
            raise DataError(f"{self.source}: holds pairwise counts only; set Jaccard needs image-level labels")
        pi = [self.labels.index(x) for x in positive if x in self.labels]
        ni = [self.labels.index(x) for x in negative if x in self.labels]
        if not pi or not ni:
            return None, 0, 0
        a = self.combos[:, pi].any(axis=1)
        b = self.combos[:, ni].any(axis=1)
        both = int(self.combo_counts[a & b].sum())
        either = int(self.combo_counts[a | b].sum())
        return (both / either if either else None), both, either

    def to_pairwise_json(self, source: str | None = None) -> dict[str, Any]:
        """The shipped form: counts only (no rows), plus the Jaccard matrix for readers."""
        jac = self.jaccard_matrix()
        return {
            "source": source or self.source,
            "derived_by": "bench/make_jaccard_table.py",
            "labels": list(self.labels),
            "n_images": self.n_images,
            "label_counts": [int(x) for x in self.counts],
            "cooccurrence": self.cooccurrence.astype(int).tolist(),
            "jaccard": [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in jac],
        }

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n_images": self.n_images}


@functools.lru_cache(maxsize=1)
def shipped_label_stats() -> LabelStats:
    """Pairwise label statistics of all 112,120 NIH images, shipped with the package."""
    where = f"model/resources/{SHIPPED_JACCARD}"
    try:
        text = resources.files(_RESOURCES).joinpath(SHIPPED_JACCARD).read_text(encoding="utf-8")
        table = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: cannot read the shipped label statistics ({exc}); "
                        "regenerate with bench/make_jaccard_table.py") from exc
    return LabelStats.from_pairwise_json(table, where)


# --------------------------------------------------------------------------------------------
# Polarized channels


@dataclass(frozen=True)
class PolarizedChannel:
    """One polarized channel: the labels it pushes up and down, and how much those co-occur."""

    channel: int
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    weights: dict[str, float]
    score: float
    jaccard: float | None
    images_both: int
    images_either: int
    mean_pair_jaccard: float | None
    max_pair_jaccard: float | None
    max_pair: tuple[str, str] | None
    category: str
    mean_activation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "weights": self.weights,
            "score": self.score,
            "jaccard": self.jaccard,
            "images_both": self.images_both,
            "images_either": self.images_either,
            "mean_pair_jaccard": self.mean_pair_jaccard,
            "max_pair_jaccard": self.max_pair_jaccard,
            "max_pair": list(self.max_pair) if self.max_pair else None,
            "category": self.category,
            "mean_activation": self.mean_activation,
        }


@dataclass(frozen=True)
class ChannelAnalysis:
    """All polarized channels of one classifier, judged against one named label source."""

    percentile: float
    n_channels: int
    n_polarized: int
    thresholds: dict[str, float]
    channels: list[PolarizedChannel]
    label_source: dict[str, Any]
    definition: str = DEFINITION

    @property
    def category_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in CATEGORIES}
        for ch in self.channels:
            counts[ch.category] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": self.definition,
            "percentile": self.percentile,
            "n_channels": self.n_channels,
            "n_polarized": self.n_polarized,
            "n_listed": len(self.channels),
            "label_source": self.label_source,
            "category_counts": self.category_counts,
            "strong_thresholds": self.thresholds,
            "channels": [c.to_dict() for c in self.channels],
        }


def polarized_channels(
    weight: np.ndarray, percentile: float = 90.0
) -> tuple[list[tuple[int, np.ndarray, np.ndarray, float]], np.ndarray]:
    """Polarized channels of a ``(K, C)`` weight matrix under the strong-weight rule.

    Returns ``([(channel, positive label idx, negative label idx, score), ...] sorted by score,
    descending then channel), per-row thresholds t_k``.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 1:
        raise ValueError(f"The 'weight' parameter must be a (labels, channels) matrix with >= 2 labels. "
                         f"Got shape {w.shape} instead.")
    if not 0 < percentile < 100:
        raise ValueError(f"The 'percentile' parameter must be in (0, 100). Got {percentile!r} instead.")
    mag = np.abs(w)
    thr = np.percentile(mag, percentile, axis=1)
    strong = mag > thr[:, None]
    pos, neg = strong & (w > 0), strong & (w < 0)
    scale = np.where(thr > 0, thr, 1.0)[:, None]
    out = []
    for c in np.flatnonzero(pos.any(axis=0) & neg.any(axis=0)):
        score = float((mag[:, c] / scale[:, 0])[strong[:, c]].sum())
        out.append((int(c), np.flatnonzero(pos[:, c]), np.flatnonzero(neg[:, c]), score))
    out.sort(key=lambda t: (-t[3], t[0]))
    return out, thr


def _pairwise(stats: LabelStats, positive: Sequence[str], negative: Sequence[str]):
    values = []
    for a in positive:
        for b in negative:
            j = stats.pair_jaccard(a, b)
            if j is not None:
                values.append((j, (a, b)))
    if not values:
        return None, None, None
    best = max(values, key=lambda v: v[0])
    return float(np.mean([v[0] for v in values])), best[0], best[1]


def analyze_channels(
    weight: np.ndarray,
    label_names: Sequence[str],
    stats: LabelStats,
    *,
    percentile: float = 90.0,
    top: int | None = None,
    mean_activation: np.ndarray | None = None,
) -> ChannelAnalysis:
    """Find polarized channels of ``weight`` and judge each by the label Jaccard of ``stats``.

    ``top`` keeps only the highest-scoring channels (all by default). ``mean_activation`` (one
    value per channel, e.g. mean pooled feature on a dataset) is attached for context only.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != len(label_names):
        raise ValueError(f"The 'weight' parameter must have one row per label ({len(label_names)}). "
                         f"Got shape {w.shape} instead.")
    found, thr = polarized_channels(w, percentile)
    if top is not None:
        if top < 1:
            raise ValueError(f"The 'top' parameter must be >= 1. Got {top!r} instead.")
        listed = found[:top]
    else:
        listed = found
    channels = []
    for c, pi, ni, score in listed:
        pos = tuple(label_names[i] for i in pi)
        neg = tuple(label_names[i] for i in ni)
        j, both, either = stats.set_jaccard(pos, neg)
        mean_pair, max_pair, max_pair_names = _pairwise(stats, pos, neg)
        channels.append(PolarizedChannel(
            channel=c, positive=pos, negative=neg,
            weights={label_names[k]: float(w[k, c]) for k in (*pi, *ni)},
            score=score, jaccard=j, images_both=both, images_either=either,
            mean_pair_jaccard=mean_pair, max_pair_jaccard=max_pair, max_pair=max_pair_names,
            category=jaccard_category(j),
            mean_activation=None if mean_activation is None else float(mean_activation[c]),
        ))
    return ChannelAnalysis(
        percentile=float(percentile), n_channels=int(w.shape[1]), n_polarized=len(found),
        thresholds={name: float(t) for name, t in zip(label_names, thr)},
        channels=channels, label_source=stats.describe(),
    )
