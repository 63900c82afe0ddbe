"""Model inputs, batched inference and the pooled-feature cache.

The backbone is the expensive part; everything classifier-level (monitors, thresholds, zeroing,
classifier retraining, attribution) needs only the pooled 1024-d features and the logits. They are
computed once per (model weights, dataset manifest, image files) and stored as a safetensors file
in the cache folder (``$CXR_TRIAGE_CACHE`` or ``~/.cache/cxr-triage``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from engine.core.errors import StorageError
from engine.core.storage import atomic_write_bytes, sha256_bytes
from model.bundle import Bundle, BundleMeta
from model.data import NIHDataset, manifest_digest, read_images
from model.metrics import sigmoid
from model.nets import pooled_features

__all__ = ["FeatureSet", "cache_dir", "to_model_input", "compute_features", "extract_features", "store_features"]

Progress = Callable[[int, int], None]


def cache_dir() -> Path:
    """Where feature caches live: ``$CXR_TRIAGE_CACHE`` or ``~/.cache/cxr-triage``."""
    return Path(os.environ.get("CXR_TRIAGE_CACHE") or Path.home() / ".cache" / "cxr-triage")


@dataclass(frozen=True)
class FeatureSet:
    """Pooled features, logits and labels of one dataset under one model, row-aligned."""

    image_names: tuple[str, ...]
    patient_ids: np.ndarray
    labels: np.ndarray  # (N, 14) uint8
    features: np.ndarray  # (N, F) float32
    logits: np.ndarray  # (N, K) float32
    weights_hash: str
    manifest_hash: str

    def __len__(self) -> int:
        return len(self.image_names)

    @property
    def probs(self) -> np.ndarray:
        return sigmoid(self.logits)

    def subset(self, indices: np.ndarray) -> "FeatureSet":
        idx = np.asarray(indices, dtype=int)
        names = tuple(self.image_names[i] for i in idx)
        return FeatureSet(
            image_names=names,
            patient_ids=self.patient_ids[idx],
            labels=self.labels[idx],
            features=self.features[idx],
            logits=self.logits[idx],
            weights_hash=self.weights_hash,
            manifest_hash=manifest_digest(names, self.labels[idx]),
        )

    def with_logits(self, logits: np.ndarray) -> "FeatureSet":
        """Same rows with new logits (after a classifier-level change)."""
        return FeatureSet(self.image_names, self.patient_ids, self.labels, self.features,
                          np.asarray(logits, dtype=np.float32), self.weights_hash, self.manifest_hash)


def to_model_input(images: np.ndarray, meta: BundleMeta) -> torch.Tensor:
    """Grey ``(N, H, W)`` images in [0, 1] -> normalised ``(N, C, H, W)`` tensor for the bundle."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    x = x.expand(-1, meta.in_channels, -1, -1)
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def compute_features(
    bundle: Bundle, images: np.ndarray, *, batch_size: int = 64, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the backbone on ``images``; returns pooled features (N, F) and logits (N, K), float32."""
    model = bundle.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start : start + batch_size], bundle.meta).to(device)
            f = pooled_features(model, x)
            feats.append(f.cpu().numpy())
            logits.append(model.classifier(f).cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
    finally:
        model.train(was_training)
    return np.concatenate(feats).astype(np.float32), np.concatenate(logits).astype(np.float32)


def _cache_path(weights_hash: str, dataset: NIHDataset) -> Path:
    """Keyed by weights, labelled manifest and the pixel files' fingerprint (see ``images_fingerprint``)."""
    key = sha256_bytes(f"{dataset.manifest_hash()}:{dataset.images_fingerprint()}".encode())
    return cache_dir() / "features" / f"{weights_hash[:20]}_{key[:24]}.safetensors"


def _digest(features: np.ndarray, logits: np.ndarray, names: np.ndarray) -> str:
    """sha256 of a cache entry's arrays: safetensors has no checksum, and a flipped bit must not be served."""
    h = hashlib.sha256()
    for a in (features, logits, names):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _from_arrays(dataset: NIHDataset, features: np.ndarray, logits: np.ndarray, wh: str) -> FeatureSet:
    return FeatureSet(tuple(dataset.image_names), dataset.patient_ids, dataset.labels,
                      features, logits, wh, dataset.manifest_hash())


def extract_features(
    bundle: Bundle,
    dataset: NIHDataset,
    *,
    use_cache: bool = True,
    batch_size: int = 64,
    skip_bad: bool = False,
    progress: Progress | None = None,
) -> FeatureSet:
    """Features and logits of ``dataset`` under ``bundle``, from the cache when present.

    The cache stores rows by image name, so any row order of the same manifest is served.
    Unreadable images raise, or with ``skip_bad`` are dropped (the result then covers fewer rows).
    """
    wh = bundle.weights_hash()
    path = _cache_path(wh, dataset)
    if use_cache and path.is_file():
        try:
            arrays = load_file(str(path))
            if bytes(arrays["sha256"]).decode() != _digest(arrays["features"], arrays["logits"], arrays["names_json"]):
                raise ValueError("cache entry does not match its digest")
            names = json.loads(bytes(arrays["names_json"]).decode())
            row = {name: i for i, name in enumerate(names)}
            order = np.array([row[n] for n in dataset.image_names])
            return _from_arrays(dataset, arrays["features"][order], arrays["logits"][order], wh)
        except (SafetensorError, KeyError, ValueError, OSError):
            pass  # a stale, damaged or altered cache entry is never trusted: recomputed and overwritten
    dataset, images = read_images(dataset, bundle.meta.input_size, skip_bad=skip_bad)
    features, logits = compute_features(bundle, images, batch_size=batch_size, progress=progress)
    if use_cache and not dataset.skipped:
        try:
            store_features(wh, dataset, features, logits)
        except StorageError as exc:  # a read-only or full cache folder: the run goes on without the cache
            warnings.warn(f"feature cache not written, running without it: {exc}", RuntimeWarning, stacklevel=2)
    return _from_arrays(dataset, features, logits, wh)


def store_features(weights_hash: str, dataset: NIHDataset, features: np.ndarray, logits: np.ndarray) -> Path:
    """Write one cache entry (rows in ``dataset``'s order, with the digest that lets a reader trust it)."""
    names = np.frombuffer(json.dumps(dataset.image_names).encode(), dtype=np.uint8)
    features, logits = np.asarray(features, np.float32), np.asarray(logits, np.float32)
    digest = np.frombuffer(_digest(features, logits, names).encode(), dtype=np.uint8)
    return atomic_write_bytes(_cache_path(weights_hash, dataset),
                              save({"features": features, "logits": logits, "names_json": names, "sha256": digest}))
