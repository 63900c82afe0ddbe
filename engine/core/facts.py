"""Typed issue facts: what monitors emit and what the rules engine consumes.

Facts are frozen pydantic models with a stable JSON form; ``fact_id`` is a content hash so that
audit records can refer to a fact across runs and refactors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core.storage import canonical_json, sha256_bytes

__all__ = ["FACT_KINDS", "ACTIONABLE_KINDS", "Severity", "IssueFact"]

#: Every kind of fact a monitor may emit.
FACT_KINDS = (
    "calibration_drift",
    "fp_cluster",
    "recall_collapse",
    "auroc_drop",
    "compression_fidelity",
    "reported_fp",
    "prevalence_shift",
    "input_drift",
    "cannot_assess",
    "invalid_output",
)
#: Kinds that ask for treatment; the rest are informational.
ACTIONABLE_KINDS = ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop", "compression_fidelity",
                    "reported_fp")

Severity = Literal["info", "low", "medium", "high", "critical"]
Scalar = float | int | str | bool | None


class IssueFact(BaseModel):
    """One finding of one monitor about one label (or the whole model when ``label`` is None)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal[FACT_KINDS]  # type: ignore[valid-type]
    monitor: str
    label: str | None = None
    severity: Severity
    message: str
    measured: dict[str, Scalar] = Field(default_factory=dict)
    reference: dict[str, Scalar] = Field(default_factory=dict)
    #: The policy threshold(s) that fired, by policy key.
    threshold: dict[str, Scalar] = Field(default_factory=dict)
    #: Sample ids, classifier channels, cluster members ... whatever supports the finding.
    evidence: dict[str, Any] = Field(default_factory=dict)

    @property
    def actionable(self) -> bool:
        return self.kind in ACTIONABLE_KINDS

    @property
    def fact_id(self) -> str:
        """Stable short id: hash of the fact's JSON form."""
        return sha256_bytes(canonical_json(self.model_dump(mode="json")))[:16]
