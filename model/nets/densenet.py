"""DenseNet factories, the named presets, and the pooled-features helpers.

Every model in this project exposes torchvision's DenseNet interface: ``model.features(x)``
returns the final (pre-ReLU) feature map and ``model.classifier`` is a ``Linear`` on the pooled,
ReLU'd features. Classifier-level work (thresholds, zeroing, retraining, attribution) relies on it
via :func:`pooled_features`. :func:`build_densenet` is the ``densenet`` entry of the architecture
table in :mod:`model.nets.archs`; a compressed net (:mod:`model.nets.pruned`) has its own entry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from engine.core.errors import BundleError

__all__ = [
    "ARCH_PRESETS",
    "arch_config",
    "build_densenet",
    "densenet121",
    "chexnet_densenet121",
    "xrv_densenet121",
    "tiny_densenet",
    "pooled_features",
    "logits_from_pooled",
    "count_parameters",
]

#: Named configurations of the generic ``densenet`` architecture.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=[6, 12, 24, 16], num_init_features=64, bn_size=4),
    # Small enough for unit tests and CI smoke runs (~30k parameters), same topology.
    "tiny": dict(growth_rate=8, block_config=[2, 2, 2, 2], num_init_features=16, bn_size=2),
    "small": dict(growth_rate=12, block_config=[3, 6, 12, 8], num_init_features=24, bn_size=4),
}


def build_densenet(config: dict[str, Any]) -> nn.Module:
    """An untrained torchvision DenseNet from a ``densenet`` config (see :func:`arch_config`)."""
    known = {"growth_rate", "block_config", "num_init_features", "bn_size", "num_classes", "in_channels", "drop_rate"}
    unknown = set(config) - known
    if unknown:
        raise BundleError(f"densenet config has unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
    model = DenseNet(
        growth_rate=int(config["growth_rate"]),
        block_config=tuple(int(b) for b in config["block_config"]),
        num_init_features=int(config["num_init_features"]),
        bn_size=int(config["bn_size"]),
        drop_rate=float(config.get("drop_rate", 0.0)),
        num_classes=int(config["num_classes"]),
    )
    in_channels = int(config.get("in_channels", 3))
    if in_channels != 3:
        out = model.features.conv0.out_channels
        model.features.conv0 = nn.Conv2d(in_channels, out, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def arch_config(preset: str, *, num_classes: int = 14, in_channels: int = 3) -> dict[str, Any]:
    """The ``densenet`` config of a named preset (``densenet121``, ``small``, ``tiny``)."""
    if preset not in ARCH_PRESETS:
        raise BundleError(f"Unknown architecture preset {preset!r}; expected one of {', '.join(ARCH_PRESETS)}")
    return {**ARCH_PRESETS[preset], "num_classes": num_classes, "in_channels": in_channels}


def densenet121(*, num_classes: int = 14, in_channels: int = 3) -> nn.Module:
    return build_densenet(arch_config("densenet121", num_classes=num_classes, in_channels=in_channels))


def chexnet_densenet121() -> nn.Module:
    """CheXNet layout: 3-channel input, 14 outputs (6,968,206 parameters)."""
    return densenet121(num_classes=14, in_channels=3)


def xrv_densenet121() -> nn.Module:
    """torchxrayvision layout: 1-channel input, 18 outputs (6,966,034 parameters)."""
    return densenet121(num_classes=18, in_channels=1)


def tiny_densenet(*, num_classes: int = 14, in_channels: int = 3) -> nn.Module:
    return build_densenet(arch_config("tiny", num_classes=num_classes, in_channels=in_channels))


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input: global-average-pooled ReLU of ``model.features(x)``."""
    fmap = F.relu(model.features(x))
    return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)


def logits_from_pooled(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return model.classifier(pooled)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
