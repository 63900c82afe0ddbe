"""Model bundles: one safetensors file holding the weights and everything needed to use them.

The header's metadata carries a JSON :class:`BundleMeta` (architecture and config to rebuild the
net, label names, input size and normalisation, operating thresholds, reference metrics, the
training data's manifest hash, the parent bundle's hash, a replayable history of changes and the
tool version). Weights load without pickle. Files are written atomically and byte-deterministically,
so the sha256 of the file is the bundle's identity (``content_hash``) in audit records.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from engine.core.errors import BundleError
from engine.core.storage import atomic_write_bytes, canonical_json, sha256_bytes
from model.labels import CHEXNET_LABELS, XRV_LABELS
from model.nets import arch_config, build_model

__all__ = [
    "TOOL_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BundleMeta",
    "Bundle",
    "new_bundle",
    "save_bundle",
    "load_bundle",
    "bundle_to_bytes",
    "load_checkpoint",
    "load_state_dict_checked",
]

TOOL_VERSION = "0.1.0"
META_KEY = "cxr_triage"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BundleMeta(BaseModel):
    """Everything beside the weights that is needed to rebuild, run and trust a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["cxr-triage-bundle"] = "cxr-triage-bundle"
    format_version: int = 1
    arch: str
    arch_config: dict[str, Any]
    labels: list[str]
    input_size: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    mean: list[float]
    std: list[float]
    thresholds: list[float]
    reference_metrics: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    train_manifest_hash: str | None = None
    parent_hash: str | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    tool_version: str = TOOL_VERSION
    notes: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Bundle:
    """A model and its metadata. Interventions work on copies (:meth:`copy`), never in place."""

    model: nn.Module
    meta: BundleMeta

    def copy(self) -> "Bundle":
        return Bundle(copy.deepcopy(self.model), self.meta.model_copy(deep=True))

    def with_meta(self, **changes: Any) -> "Bundle":
        """Same model object, metadata with ``changes`` applied (validated)."""
        return Bundle(self.model, BundleMeta.model_validate({**self.meta.model_dump(), **changes}))

    def content_hash(self) -> str:
        return sha256_bytes(bundle_to_bytes(self))

    def weights_hash(self) -> str:
        """Hash of what determines the outputs (architecture, preprocessing, weights), not thresholds.

        Feature caches key on it, so re-tuning thresholds or metadata does not invalidate them.
        """
        h = hashlib.sha256()
        ident = {k: getattr(self.meta, k) for k in ("arch", "arch_config", "input_size", "in_channels", "mean", "std")}
        h.update(canonical_json(ident))
        for key, value in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


def new_bundle(
    model: nn.Module,
    *,
    arch: str = "densenet",
    config: dict[str, Any],
    input_size: int,
    labels: list[str] | tuple[str, ...] = CHEXNET_LABELS,
    **meta: Any,
) -> Bundle:
    """Wrap a freshly built model with default metadata (ImageNet normalisation, thresholds 0.5)."""
    in_channels = int(config.get("in_channels", 3))
    mean = list(IMAGENET_MEAN) if in_channels == 3 else [0.5] * in_channels
    std = list(IMAGENET_STD) if in_channels == 3 else [0.25] * in_channels
    fields: dict[str, Any] = dict(
        arch=arch,
        arch_config=config,
        labels=list(labels),
        input_size=input_size,
        in_channels=in_channels,
        mean=mean,
        std=std,
        thresholds=[0.5] * len(labels),
    )
    fields.update(meta)
    return Bundle(model, BundleMeta.model_validate(fields))


def bundle_to_bytes(bundle: Bundle) -> bytes:
    """Deterministic safetensors bytes of the weights plus the metadata JSON."""
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    meta_json = json.dumps(bundle.meta.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return st_save(state, metadata={META_KEY: meta_json})


def save_bundle(bundle: Bundle, path: str | Path) -> str:
    """Write the bundle atomically; returns its content hash (sha256 of the file)."""
    data = bundle_to_bytes(bundle)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing/unexpected/mismatched key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}{' ...' if len(shapes) > 10 else ''}")
        raise BundleError(f"{source}: checkpoint does not match the architecture — " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle written by :func:`save_bundle` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: model bundle does not exist")
    data = path.read_bytes()
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        state = st_load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable safetensors bundle ({exc})") from exc
    if META_KEY not in header:
        raise BundleError(
            f"{path}: safetensors file has no '{META_KEY}' metadata; for a plain state dict or a CheXNet "
            "checkpoint use `load_checkpoint` (CLI: pass it with --checkpoint-format)"
        )
    try:
        meta = BundleMeta.model_validate(json.loads(header[META_KEY]))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: invalid bundle metadata: {exc}") from exc
    model = build_model(meta.arch, meta.arch_config)
    load_state_dict_checked(model, state, str(path))
    model.eval()
    return Bundle(model, meta)


# torchvision's own reason: checkpoints from old PyTorch name DenseNet layers "norm.1", "conv.2"
# (module names with dots), which newer nn.Module naming forbids; today they are "norm1", "conv2".
_LEGACY_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _normalise_checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "densenet121.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        # arnoweng's CheXNet wraps the head as Sequential(Linear, Sigmoid): classifier.0.* -> classifier.*
        key = key.replace("classifier.0.", "classifier.")
        match = _LEGACY_DENSE_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_checkpoint(path: str | Path, *, input_size: int = 224) -> Bundle:
    """Load a foreign DenseNet121 checkpoint: arnoweng CheXNet ``model.pth.tar`` or a torchvision state dict.

    Loaded with ``torch.load(weights_only=True)``: the file stays data, never code. The output
    layout (14 CheXNet or 18 torchxrayvision labels, 1 or 3 input channels) is read off the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint does not exist")
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                raw: Any = st_load(fh.read())
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint or a pickle with code
        raise BundleError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BundleError(f"{path}: expected a state dict of tensors (or a dict with 'state_dict')")
    state = _normalise_checkpoint_keys(raw)
    if "classifier.weight" not in state or "features.conv0.weight" not in state:
        raise BundleError(f"{path}: not a DenseNet checkpoint (no 'features.conv0.weight' / 'classifier.weight')")
    num_classes = int(state["classifier.weight"].shape[0])
    in_channels = int(state["features.conv0.weight"].shape[1])
    labels = {14: CHEXNET_LABELS, 18: XRV_LABELS}.get(num_classes)
    if labels is None:
        raise BundleError(f"{path}: classifier has {num_classes} outputs; expected 14 (CheXNet) or 18 (torchxrayvision)")
    config = arch_config("densenet121", num_classes=num_classes, in_channels=in_channels)
    model = build_model("densenet", config)
    # Old checkpoints predate BatchNorm's num_batches_tracked buffer; it does not affect eval.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    load_state_dict_checked(model, state, str(path))
    model.eval()
    return new_bundle(model, config=config, input_size=input_size, labels=list(labels),
                      notes={"imported_from": path.name})
