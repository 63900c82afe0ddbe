"""The interface every intervention plugin implements, and the plugin registry.

An intervention receives a :class:`TreatmentContext` (the compressed model, the issue fact, the
*fit* split's cached features and its dataset, policy parameters, a seed) and returns an
:class:`InterventionResult` with a NEW bundle; it never mutates its input. The engine verifies the
result on a separate, patient-disjoint *verify* split. Third-party plugins register through the
``cxr_triage.interventions`` entry-point group.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet

__all__ = [
    "TreatmentContext",
    "InterventionResult",
    "Intervention",
    "register",
    "get_intervention",
    "available_interventions",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "cxr_triage.interventions"


@dataclass(frozen=True)
class TreatmentContext:
    """What an intervention may use. ``fit`` and ``fit_dataset`` cover the same rows."""

    bundle: Bundle
    fact: IssueFact
    fit: FeatureSet
    fit_dataset: NIHDataset
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    #: The uncompressed parent, when the bundle records one and it is available (for f_reopt).
    parent: Bundle | None = None
    progress: Callable[[int, int], None] | None = None


@dataclass
class InterventionResult:
    """A treated copy of the model and the record of what was done to it."""

    bundle: Bundle
    #: Replayable description of the change (rows, channels, layers, thresholds ...), for the audit.
    changes: dict[str, Any]
    #: Figures measured on the fit split (before/after), for the audit.
    fit_metrics: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    #: True when only the classifier or thresholds changed, so cached features stay valid.
    classifier_only: bool = True


class Intervention(ABC):
    """Base class: subclasses set the class attributes and implement :meth:`apply`."""

    #: Stable name used in policies and audit records.
    name: ClassVar[str]
    #: Issue kinds this intervention can treat.
    treats: ClassVar[tuple[str, ...]]
    #: Typical wall time in seconds; the selection's tie-break after cost.
    expected_time_s: ClassVar[float]
    #: True when the intervention changes only thresholds/classifier (cached features stay valid).
    classifier_only: ClassVar[bool] = True

    def applicable(self, ctx: TreatmentContext) -> tuple[bool, str]:
        """Whether this intervention can run here, and why (or why not). Override to add conditions."""
        if ctx.fact.kind not in self.treats:
            return False, f"{self.name} does not treat {ctx.fact.kind}"
        return True, f"{self.name} treats {ctx.fact.kind}"

    @abstractmethod
    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        """Produce the treated copy. Must not modify ``ctx.bundle``."""

    def apply(self, ctx: TreatmentContext) -> InterventionResult:
        """Run the intervention and time it; the base class owns timing and the no-mutation rule."""
        ok, why = self.applicable(ctx)
        if not ok:
            raise InterventionError(f"{self.name} is not applicable: {why}")
        start = time.perf_counter()
        result = self._apply(ctx)
        result.wall_time_s = time.perf_counter() - start
        if result.bundle is ctx.bundle or result.bundle.model is ctx.bundle.model:
            raise InterventionError(f"{self.name} returned its input bundle; interventions must work on a copy")
        return result


_REGISTRY: dict[str, type[Intervention]] = {}
_ENTRY_POINTS_LOADED = False


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make an intervention available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must set a 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    import interventions.builtin  # noqa: F401  (registers the built-in plugins)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register(ep.load())


def available_interventions() -> dict[str, type[Intervention]]:
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_intervention(name: str) -> Intervention:
    plugins = available_interventions()
    if name not in plugins:
        raise InterventionError(f"Unknown intervention {name!r}; available: {', '.join(plugins)}")
    return plugins[name]()
