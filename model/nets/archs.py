"""The architecture table: the ``arch`` name a bundle's header records -> the builder of its net.

A bundle stores ``arch`` and ``arch_config`` beside the weights; :func:`build_model` rebuilds the
untrained network from them before the weights are loaded. The table is written out here, not
filled by modules registering themselves on import, so which architectures exist does not depend
on what happened to be imported first. The names are stored in saved bundles: never rename one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from engine.core.errors import BundleError
from model.nets.densenet import build_densenet
from model.nets.pruned import ARCH_NAME, build_pruned_densenet

__all__ = ["ARCHS", "build_model"]

#: ``arch`` name (as saved in bundle headers) -> builder ``config -> nn.Module``.
ARCHS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "densenet": build_densenet,
    ARCH_NAME: build_pruned_densenet,
}


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Build an untrained model of a known architecture from its config."""
    if arch not in ARCHS:
        raise BundleError(f"Unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](dict(config))
