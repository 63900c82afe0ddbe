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
import zipfile
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
from model.labels import CHEXNET_LABELS
from model.nets import build_model

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
    "is_torch_checkpoint",
    "load_state_dict_checked",
]

TOOL_VERSION = "0.1.0"
META_KEY = "cxr_triage"
#: ``torch.save``'s legacy format opens with its magic number 0x1950a86a20f9469cfc6c, pickled (LONG1, 10 bytes).
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
IMPORT_HINT = "import it with `cli.py import --checkpoint {path} --out BUNDLE`"
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


def is_torch_checkpoint(path: str | Path) -> bool:
    """Whether the file's content (not its name) is a ``torch.save`` file.

    Zip format (PyTorch >= 1.6): ``PK\\x03\\x04`` with a ``data.pkl`` entry; legacy format
    (``model.pth.tar`` of PyTorch 0.3): a pickle stream (``\\x80``, the protocol) whose first object is
    torch's magic number. Any other pickle, or a safetensors file, is not taken for one.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
        if head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as archive:
                return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return head[:1] == b"\x80" and _LEGACY_TORCH_MAGIC in head


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
        if is_torch_checkpoint(path):
            raise BundleError(f"{path} is a PyTorch checkpoint, not a bundle: {IMPORT_HINT.format(path=path)}") from None
        raise BundleError(f"{path}: not a readable safetensors bundle ({exc})") from exc
    if META_KEY not in header:
        raise BundleError(f"{path}: safetensors file has no '{META_KEY}' metadata (a plain state dict, not a "
                          f"bundle?); {IMPORT_HINT.format(path=path)}")
    try:
        meta = BundleMeta.model_validate(json.loads(header[META_KEY]))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: invalid bundle metadata: {exc}") from exc
    model = build_model(meta.arch, meta.arch_config)
    load_state_dict_checked(model, state, str(path))
    model.eval()
    return Bundle(model, meta)
