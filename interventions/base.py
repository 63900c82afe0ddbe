"""The interface every intervention plugin implements.

An intervention receives a :class:`TreatmentContext` (the compressed model, the issue fact, the
*fit* split's cached features and its dataset, policy parameters, a seed) and returns an
:class:`InterventionResult` with a NEW bundle; it never mutates its input. The engine verifies the
result on a separate, patient-disjoint *verify* split.

The base class owns what every plugin would otherwise repeat: the issue-kind check and the
parameter check of :meth:`Intervention.applicable`, and the timing and no-mutation rule of
:meth:`Intervention.apply`. Each plugin declares its parameters as a pydantic ``Params`` model
(a subclass of :class:`InterventionParams`); the policy validates ``params.NAME`` against it when it
loads, and the plugin reads the same model, so a parameter is checked once, by one system.

Which plugins exist is :mod:`interventions.registry`'s business (this module does not import it).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from engine.core.validation import format_validation_error
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet

__all__ = [
    "TreatmentContext",
    "InterventionResult",
    "InterventionParams",
    "Intervention",
]


@dataclass(frozen=True)
class TreatmentContext:
    """What an intervention may use. ``fit`` and ``fit_dataset`` cover the same rows."""

    bundle: Bundle
    fact: IssueFact
    fit: FeatureSet
    fit_dataset: NIHDataset
    #: The policy's parameters for this intervention (``Policy.params_for``), as plain data.
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    #: The uncompressed parent, when the bundle records one and it is available (for f_reopt).
    parent: Bundle | None = None
    progress: Callable[[int, int], None] | None = None
    #: For a ``reported_fp`` fact: the reported images' cached features under ``bundle``, from the whole
    #: audited set (the fit/verify split may have put them on either side), in the fact's order.
    reported: FeatureSet | None = None


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


class InterventionParams(BaseModel):
    """Base of every plugin's ``Params``: unknown keys refused, no coercion from strings or booleans.

    Without fields (as here) it accepts no parameter at all: a plugin that takes parameters must
    declare them. Field order is the order in which a plugin records its resolved parameters.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Intervention(ABC):
    """Base class: subclasses set the class attributes, declare ``Params`` and implement :meth:`_apply`."""

    #: Stable name used in policies and audit records.
    name: ClassVar[str]
    #: Issue kinds this intervention can treat.
    treats: ClassVar[tuple[str, ...]]
    #: Typical wall time in seconds; the selection's tie-break after cost.
    expected_time_s: ClassVar[float]
    #: True when the intervention changes only thresholds/classifier (cached features stay valid).
    classifier_only: ClassVar[bool] = True
    #: The parameters the policy may give (``params.NAME``); validated when the policy loads.
    Params: ClassVar[type[InterventionParams]] = InterventionParams

    @classmethod
    def read_params(cls, params: Mapping[str, Any]) -> InterventionParams:
        """``params`` validated as :attr:`Params`, defaults filled in; a bad one is an :class:`InterventionError`
        that names the key, in the same words as a policy error."""
        try:
            return cls.Params.model_validate(dict(params))
        except ValidationError as exc:
            raise InterventionError(format_validation_error(exc, f"{cls.name} parameters", cls.Params)) from None

    def applicable(self, ctx: TreatmentContext) -> tuple[bool, str]:
        """Whether this intervention can run here, and why (or why not).

        The issue kind and the parameters are checked here; a plugin adds its own conditions in
        :meth:`_applicable`, which receives the validated parameters.
        """
        if ctx.fact.kind not in self.treats:
            return False, f"{self.name} does not treat {ctx.fact.kind} (it treats {', '.join(self.treats)})"
        try:
            params = self.read_params(ctx.params)
        except InterventionError as exc:
            return False, str(exc)
        return self._applicable(ctx, params)

    def _applicable(self, ctx: TreatmentContext, params: Any) -> tuple[bool, str]:
        """The plugin's own conditions (kind and parameters already hold). Override to add some."""
        return True, f"{self.name} treats {ctx.fact.kind}"

    @abstractmethod
    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        """Produce the treated copy (read parameters with :meth:`read_params`). Must not modify ``ctx.bundle``."""

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
