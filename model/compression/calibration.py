"""Calibration data: the images the re-fits reproduce the parent on, and the part held out to check.

The calibration split is divided patient-disjointly into a part that is fitted (augmented into
several views per image) and a part that is only used to judge a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.core.errors import DataError
from model.bundle import Bundle
from model.compression.settings import Progress
from model.data import NIHDataset, patient_disjoint_split, read_images
from model.features import to_model_input

__all__ = ["Calibration", "prepare_calibration"]


@dataclass(frozen=True)
class Calibration:
    """Model inputs for the re-fits (``fit``, augmented views) and for checking (``hold``)."""

    fit: torch.Tensor
    n_images: int
    views: int
    hold: torch.Tensor
    hold_labels: np.ndarray
    manifest_hash: str
    split: str
    fit_names: tuple[str, ...]
    hold_names: tuple[str, ...]


def _augment(images: np.ndarray, views: int, seed: int) -> np.ndarray:
    """``views`` versions of each grey image: the original, then small shifts with intensity jitter.

    The re-fit targets are the original model's outputs on the same input, so label-free,
    anatomy-preserving augmentation only adds least-squares samples (no flips: laterality matters).
    """
    if views == 1:
        return images
    rng = np.random.default_rng([seed, 7919])
    n, h, w = images.shape
    pad = max(1, h // 16)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    out = np.empty((n * views, h, w), dtype=np.float32)
    out[:n] = images
    for v in range(1, views):
        dy = rng.integers(0, 2 * pad + 1, size=n)
        dx = rng.integers(0, 2 * pad + 1, size=n)
        gain = 1.0 + rng.uniform(-0.1, 0.1, size=n).astype(np.float32)
        bias = rng.uniform(-0.05, 0.05, size=n).astype(np.float32)
        for i in range(n):
            crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
            out[v * n + i] = np.clip(crop * gain[i] + bias[i], 0.0, 1.0)
    return out


def _auto_views(n_fit: int, input_size: int, memory_mb: int) -> int:
    per_image = 4 * 2 * 96 * (input_size // 4) ** 2  # rough bytes of cached block inputs per view
    by_memory = max(1, int(memory_mb * 2**20 // max(1, per_image * n_fit)))
    return int(max(1, min(8, math.ceil(1024 / max(1, n_fit)), by_memory)))


def prepare_calibration(
    bundle: Bundle,
    dataset: NIHDataset,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    views: int | None = None,
    memory_mb: int = 1024,
    images: np.ndarray | None = None,
    holdout: bool = True,
    progress: Progress | None = None,
) -> Calibration:
    """Decode, split (patient-disjoint) and augment the calibration images of ``dataset``."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.root}: the calibration split {dataset.split!r} has no images")
    if images is None:
        dataset, images = read_images(dataset, bundle.meta.input_size, progress=progress)
    if holdout:
        if len(set(dataset.patient_ids.tolist())) < 2:
            raise DataError(f"{dataset.root}: a held-out check needs calibration images of at least 2 patients, "
                            f"found {len(set(dataset.patient_ids.tolist()))}")
        fit_idx, hold_idx = patient_disjoint_split(dataset, holdout_fraction, seed)
    else:
        fit_idx, hold_idx = np.arange(len(dataset)), np.arange(0)
    views = views or _auto_views(len(fit_idx), bundle.meta.input_size, memory_mb)
    fit_images = _augment(images[fit_idx], views, seed)
    return Calibration(
        fit=to_model_input(fit_images, bundle.meta),
        n_images=int(len(fit_idx)),
        views=int(views),
        hold=to_model_input(images[hold_idx], bundle.meta),
        hold_labels=dataset.labels[hold_idx],
        manifest_hash=dataset.manifest_hash(),
        split=dataset.split,
        fit_names=tuple(dataset.image_names[i] for i in fit_idx),
        hold_names=tuple(dataset.image_names[i] for i in hold_idx),
    )
