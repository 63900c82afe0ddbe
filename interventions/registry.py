"""Which interventions exist: the built-in table, plus third-party plugins from entry points.

The built-ins are an explicit table (no registration by import side effect), so reading this file
tells you every treatment the tool ships. Third-party plugins are installed packages that declare an
entry point in the ``cxr_triage.interventions`` group naming their :class:`Intervention` subclass;
they are loaded once, on the first lookup, and a plugin whose ``name`` equals a built-in's replaces it.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from engine.core.errors import InterventionError
from interventions.augmentation import AugmentationIntervention
from interventions.base import Intervention
from interventions.f_reopt import FReopt
from interventions.full_retrain import FullRetrainIntervention
from interventions.partial_retrain import PartialRetrainIntervention
from interventions.threshold import ThresholdIntervention
from interventions.zeroing import ZeroingIntervention

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "available_interventions", "get_intervention"]

ENTRY_POINT_GROUP = "cxr_triage.interventions"

#: The interventions shipped with the tool, by the name policies and audit records use.
BUILTINS: dict[str, type[Intervention]] = {
    "threshold": ThresholdIntervention,
    "zeroing": ZeroingIntervention,
    "partial_retrain": PartialRetrainIntervention,
    "f_reopt": FReopt,
    "augmentation": AugmentationIntervention,
    "full_retrain": FullRetrainIntervention,
}


@functools.cache
def _entry_point_plugins() -> dict[str, type[Intervention]]:
    """Third-party plugins of :data:`ENTRY_POINT_GROUP`, by their ``name`` (loaded once per process)."""
    found: dict[str, type[Intervention]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not getattr(cls, "name", None):
            raise TypeError(f"{cls.__name__} (entry point {ep.name!r} of {ENTRY_POINT_GROUP}) must set a 'name'")
        found[cls.name] = cls
    return found


def available_interventions() -> dict[str, type[Intervention]]:
    """Every intervention class by name, sorted: the built-ins, then entry-point plugins over them."""
    table = {**BUILTINS, **_entry_point_plugins()}
    return dict(sorted(table.items()))


def get_intervention(name: str) -> Intervention:
    """A fresh instance of the intervention called ``name``."""
    plugins = available_interventions()
    if name not in plugins:
        raise InterventionError(f"Unknown intervention {name!r}; available: {', '.join(plugins)}")
    return plugins[name]()
