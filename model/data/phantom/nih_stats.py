"""The shipped NIH statistics (label combinations, follow-ups, views, radiologist boxes) and label sampling.

The tables live in ``model/resources/`` (see ``bench/make_label_table.py``), which pyproject ships as
package data; they are addressed through the ``model`` package, wherever this module lies.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

from model.data.phantom.checks import check_int
from model.labels import CHEXNET_LABELS, NUM_LABELS

# Package data lives in model/resources/ (no __init__: addressed through the ``model`` package).
_RESOURCES = ("model", "resources")
_LABEL_TABLE = "nih_label_combinations.json"
_BBOX_TABLE = "nih_bbox_positions.json"


@functools.lru_cache(maxsize=None)
def label_table() -> dict:
    """The shipped NIH label statistics (see ``bench/make_label_table.py``); cached, read-only."""
    text = resources.files(_RESOURCES[0]).joinpath(_RESOURCES[1], _LABEL_TABLE).read_text(encoding="utf-8")
    table = json.loads(text)
    if tuple(table["labels"]) != CHEXNET_LABELS:
        raise ValueError(f"{_LABEL_TABLE} is not in CheXNet label order; regenerate it")
    return table


@functools.lru_cache(maxsize=None)
def label_combinations() -> tuple[np.ndarray, np.ndarray]:
    """(k x 14 uint8 label matrix, k cumulative probabilities) of the NIH label combinations."""
    combos = label_table()["combinations"]
    mat = np.zeros((len(combos), NUM_LABELS), dtype=np.uint8)
    counts = np.array([c for c, _ in combos], dtype=np.float64)
    for row, (_, idx) in enumerate(combos):
        mat[row, idx] = 1
    mat.setflags(write=False)
    cdf = np.cumsum(counts / counts.sum())
    cdf[-1] = 1.0
    return mat, cdf


def nih_label_marginals() -> np.ndarray:
    """Per-label prevalence of the real NIH table (14 floats, CheXNet order)."""
    mat, cdf = label_combinations()
    p = np.diff(np.concatenate([[0.0], cdf]))
    return p @ mat


@functools.lru_cache(maxsize=None)
def bbox_table() -> dict[str, np.ndarray]:
    """NIH radiologist boxes per finding, ``[cx, cy, w, h]`` in the canonical frame; may be empty."""
    path = resources.files(_RESOURCES[0]).joinpath(_RESOURCES[1], _BBOX_TABLE)
    if not path.is_file():
        return {}
    boxes = json.loads(path.read_text(encoding="utf-8"))["boxes"]
    return {k: np.asarray(v, dtype=np.float64) for k, v in boxes.items()}


def sample_label_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent label vectors (n x 14 uint8) from the real NIH joint distribution.

    Sampling whole combinations, not labels one by one, keeps NIH's co-occurrence structure
    (Effusion with Atelectasis, Mass with Nodule, ...) as well as its marginals.
    """
    n = check_int("n", n, minimum=0)
    mat, cdf = label_combinations()
    return mat[np.searchsorted(cdf, rng.random(n), side="right")].copy()
