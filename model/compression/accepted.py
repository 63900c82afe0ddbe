"""The fidelity a compressed model was accepted with, carried in its bundle for later audits to compare.

Why: a lossy compression never reproduces its parent exactly (max |Δlogit| 0.1-0.3 at half the
parameters), so an audit that compares a compressed model with the lossless ideal fires on every
run. What an audit can ask instead is whether the model departs from its parent *more than it did
when the compression was accepted*: a shift that the re-fits did not see (new scanner) moves
activations off the calibration images and the compression error grows, rare findings first.

:class:`FidelityRecord` is that measurement: mean |Δlogit| (bootstrap over images), max |Δlogit|,
and the share of (image, label) decisions that flip at the deployed thresholds (Wilson), model-wide
and per label, each with its interval. :func:`measure_fidelity` computes it from two logit arrays
(the compression on its calibration holdout, the ``compression_fidelity`` monitor on audited
images: one route for both). It is stored in ``meta.notes["compression"]["accepted_fidelity"]``,
which round-trips through the safetensors metadata as JSON; bundles without it read as None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.core.errors import BundleError
from model.bundle import Bundle
from model.compression.measure import batched_logits, decision_flips
from model.interval import Interval, unestimable
from model.paired import paired_statistic, wilson_interval

__all__ = [
    "NOTE_KEY",
    "FidelityRecord",
    "LabelFidelity",
    "accepted_fidelity",
    "holdout_fidelity",
    "measure_fidelity",
    "with_accepted_fidelity",
]

#: Key under ``meta.notes["compression"]``.
NOTE_KEY = "accepted_fidelity"
#: Bootstrap resamples of the mean |Δlogit| intervals (images resampled; the bounds move ~1 % between seeds).
N_BOOT = 500


class LabelFidelity(BaseModel):
    """One label's departure from the parent: mean |Δlogit| and decision flips over ``n`` images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    mean_abs_dlogit: Interval
    max_abs_dlogit: float
    flips: int
    flip_rate: Interval


class FidelityRecord(BaseModel):
    """Fidelity of a compressed model to its parent on ``n_images`` images (``where``), with intervals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    where: str
    n_images: int
    #: Level of the model-wide intervals; the per-label ones carry their own (family-wise) level.
    level: float
    mean_abs_dlogit: Interval
    max_abs_dlogit: float
    flips: int
    #: Share of (image, label) decisions that differ at the bundles' thresholds (Wilson over the pairs).
    flip_rate: Interval
    per_label: dict[str, LabelFidelity]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FidelityRecord:
        return cls.model_validate(data)


def _mean_interval(d: np.ndarray, level: float, n_boot: int, seed: int | list[int]) -> Interval:
    """Mean of per-image |Δlogit| ``d`` (rows = images) with a percentile bootstrap over images."""
    if d.size == 0:
        return unestimable(level, 0, "bootstrap_images", "no images")
    per_image = d.mean(axis=1) if d.ndim == 2 else d
    if np.ptp(per_image) == 0:
        value = round(float(per_image[0]), 10)
        return Interval(value, value, value, level, len(per_image), "bootstrap_images")
    return paired_statistic(lambda rows: float(per_image[rows].mean()), len(per_image), level=level,
                            n_boot=n_boot, seed=seed, method="bootstrap_images")


def measure_fidelity(parent_logits: np.ndarray, logits: np.ndarray, parent_thresholds: np.ndarray,
                     thresholds: np.ndarray, labels: list[str], *, where: str, level: float = 0.95,
                     label_level: float | None = None, n_boot: int = N_BOOT, seed: int = 0) -> FidelityRecord:
    """How far ``logits`` depart from ``parent_logits`` (same rows and columns = ``labels``).

    ``label_level`` is the level of the per-label intervals; by default they are family-wise over
    the labels (Bonferroni), since a later audit compares every label. Deterministic for a seed.
    """
    z, pz = np.asarray(logits, np.float64), np.asarray(parent_logits, np.float64)
    if z.shape != pz.shape or z.ndim != 2 or z.shape[1] != len(labels):
        raise ValueError(f"logits {z.shape} and parent logits {pz.shape} must both be (N, {len(labels)})")
    label_level = 1 - (1 - level) / max(1, len(labels)) if label_level is None else label_level
    d = np.abs(z - pz)
    flips = decision_flips(pz, z, parent_thresholds, thresholds)
    n = len(z)
    per_label = {
        name: LabelFidelity(
            n=n, mean_abs_dlogit=_mean_interval(d[:, k], label_level, n_boot, [seed, k]),
            max_abs_dlogit=float(d[:, k].max()) if n else 0.0, flips=int(flips[:, k].sum()),
            flip_rate=wilson_interval(int(flips[:, k].sum()), n, label_level))
        for k, name in enumerate(labels)
    }
    return FidelityRecord(where=where, n_images=n, level=level, mean_abs_dlogit=_mean_interval(d, level, n_boot, seed),
                          max_abs_dlogit=float(d.max()) if d.size else 0.0, flips=int(flips.sum()),
                          flip_rate=wilson_interval(int(flips.sum()), int(flips.size), level), per_label=per_label)


def holdout_fidelity(parent: Bundle, compressed: Bundle, x: torch.Tensor, *, where: str,
                     seed: int = 0) -> FidelityRecord:
    """The record of ``compressed`` against ``parent`` on model inputs ``x`` (the calibration holdout)."""
    return measure_fidelity(batched_logits(parent.model, x), batched_logits(compressed.model, x),
                            np.asarray(parent.meta.thresholds), np.asarray(compressed.meta.thresholds),
                            list(compressed.labels), where=where, seed=seed)


def accepted_fidelity(bundle: Bundle) -> FidelityRecord | None:
    """The bundle's accepted-fidelity record; None for a bundle compressed before records existed."""
    note = bundle.meta.notes.get("compression")
    data = note.get(NOTE_KEY) if isinstance(note, dict) else None
    if data is None:
        return None
    try:
        return FidelityRecord.from_json(data)
    except ValidationError as exc:
        raise BundleError(f"the bundle's notes.compression.{NOTE_KEY} is not a fidelity record: {exc}") from exc


def with_accepted_fidelity(bundle: Bundle, record: FidelityRecord) -> Bundle:
    """The same model with ``record`` stored as its accepted fidelity (other compression notes kept)."""
    note = dict(bundle.meta.notes.get("compression") or {})
    note[NOTE_KEY] = record.to_json()
    return bundle.with_meta(notes={**bundle.meta.notes, "compression": note})
