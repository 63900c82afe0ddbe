"""Monitor thresholds: one pydantic model, embedded as the policy's ``monitors:`` section.

Every number a monitor compares against lives here, never in monitor code, so a regulator can
read the complete alarm policy in one YAML section and every fact can name the key that fired
(``threshold={"calibration_drift.ece_increase": 0.05}``). Per-label tuning goes in ``overrides``
(``overrides: {Pneumothorax: {recall_collapse: {min_recall_ratio: 0.8}}}``) and is resolved by
:meth:`MonitorConfig.for_label`. Importing this module has no side effects.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from engine.core.validation import deep_merge
from model.labels import CHEXNET_LABELS, XRV_LABELS

__all__ = [
    "CalibrationDriftConfig",
    "FpClusterConfig",
    "RecallCollapseConfig",
    "AurocDropConfig",
    "CompressionFidelityConfig",
    "PrevalenceShiftConfig",
    "InputDriftConfig",
    "MonitorConfig",
]

_KNOWN_LABELS = tuple(dict.fromkeys(CHEXNET_LABELS + XRV_LABELS))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Run this monitor at all.")


class CalibrationDriftConfig(_Section):
    """Probabilities no longer mean what they meant at training time (an operating-point problem)."""

    ece_increase: float = Field(0.05, gt=0, description="Fire when ECE (at the reference's class balance, bias-"
                                "corrected) exceeds the reference ECE by this much plus the noise margin at alpha.")
    threshold_shift: float = Field(0.1, gt=0, description="Fire when the Youden-J threshold on this data moved "
                                   "this far (probability units) from the deployed threshold ...")
    min_j_loss: float = Field(0.05, gt=0, lt=1, description="... and the deployed threshold loses at least this much "
                              "Youden J against the best threshold (bias-corrected lower bootstrap bound): a flat J "
                              "curve makes the Youden threshold wander without any operating-point problem.")
    min_auroc_ratio: float = Field(0.95, gt=0, le=1, description="Ranking counts as intact when AUROC >= this "
                                   "times the reference AUROC; the threshold criterion only fires then.")
    max_threshold_displacement: float = Field(3.0, gt=0, description="Fire when the deployed threshold moved this "
                                              "many (robust) SDs within the negatives' logit distribution, against "
                                              "where the reference's false-positive rate puts it.")
    min_logit_scale: float = Field(0.1, gt=0, description="Floor (logits) of that SD, for models whose outputs "
                                   "barely vary.")
    n_bins: int = Field(10, ge=2, description="Equal-width probability bins of the ECE (the reference ECE is "
                        "measured with 10; change both or neither).")
    n_boot: int = Field(200, ge=20, description="Bootstrap resamples for the ECE margin and the J-loss bound.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="One-sided, family-wise (Bonferroni over the labels "
                         "assessed) error rate of the ECE margin and the J-loss bound.")


class FpClusterConfig(_Section):
    """A label's false positives share a cause that neither its TPs nor its TNs have (a shortcut)."""

    min_fp: int = Field(5, ge=2, description="Fewest false positives (and cluster members) worth examining.")
    min_tp: int = Field(8, ge=2, description="Fewest true positives to compare with; with fewer the label is "
                        "skipped (the discriminant lives in n_components dimensions, and false negatives would look "
                        "different merely for scoring low).")
    max_reference_share: float = Field(0.2, gt=0, lt=1, description="The slice is the FPs whose cross-fitted "
                                       "FP-vs-TP discriminant score beats all but this share of the TPs ...")
    min_share: float = Field(0.5, gt=0, le=1, description="... and it must hold this share of the FPs.")
    min_separation_auroc: float = Field(0.9, gt=0.5, le=1, description="Cross-fitted AUROC, cluster vs true "
                                        "positives, must reach this ...")
    min_negative_separation_auroc: float = Field(0.8, gt=0.5, le=1, description="... and, along the same "
                                                 "discriminant, cluster vs true negatives this: a shortcut is "
                                                 "something ordinary negatives lack too.")
    n_permutations: int = Field(50, ge=10, description="FP/TP label permutations of the slice-share test ...")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="... whose p-value must be below this.")
    n_components: int = Field(64, ge=2, description="Principal axes of the standardised pooled features the "
                              "analysis works in (fitted once per audit on up to 2,000 rows).")
    max_points: int = Field(250, ge=20, description="Subsample FPs / TPs / TNs to at most this many rows each "
                            "(keeps 10k-row audits fast).")
    max_channels: int = Field(10, ge=1, description="Top classifier channels reported as evidence.")


class RecallCollapseConfig(_Section):
    """Sensitivity at the deployed threshold collapsed against the reference."""

    min_recall_ratio: float = Field(0.6, gt=0, le=1, description="Fire when recall < this times reference sensitivity ...")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="... and a one-sided Fisher exact test of the detected/missed "
                         "counts against the reference's says recall is lower at this family-wise level (Bonferroni "
                         "over the labels compared).")


class AurocDropConfig(_Section):
    """Ranking quality fell, beyond bootstrap noise."""

    max_drop: float = Field(0.05, ge=0, lt=1, description="Fire when the AUROC is below reference minus this by "
                            "more than the confidence margin of the difference ...")
    n_boot: int = Field(500, ge=20, description="Bootstrap resamples of this data's AUROC.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="... at this two-sided, family-wise level (Bonferroni over "
                         "the labels compared); the margin combines this data's standard error with the reference's.")


class CompressionFidelityConfig(_Section):
    """The compressed model departs from its parent more than it did when its compression was accepted.

    A compressed bundle carries the fidelity it was accepted with (mean |delta logit| and the share
    of decisions that flip at the thresholds, model-wide and per label, with intervals, measured on
    the calibration holdout). The monitor fires when the audited figure is worse beyond noise: the
    lower bound of its interval above ``min_ratio`` x the accepted upper bound. A lossy compression
    never meets the lossless ideal, so the absolute ``max_logit_delta`` bound only applies when set,
    or to bundles without a record (``legacy_max_logit_delta``).
    """

    compare_to_accepted: bool = Field(True, description="Compare with the bundle's accepted-fidelity record "
                                      "(flip rate and mean |delta logit|, model-wide and per label).")
    level: float = Field(0.95, gt=0.5, lt=1, description="Level of the audited intervals; the per-label ones are "
                         "Bonferroni-corrected over the labels compared (as the record's are).")
    min_ratio: float = Field(1.25, ge=1, description="Fire when the audited lower bound exceeds this times the "
                             "accepted upper bound: a material departure (the holdout is small and its intervals "
                             "treat images as independent, though a patient's follow-ups look alike).")
    min_images: int = Field(30, ge=2, description="Fewest audited images for the comparison with the record; "
                            "with fewer it cannot be assessed (cannot_assess).")
    n_boot: int = Field(500, ge=20, description="Bootstrap resamples (over images) of the mean |delta logit|.")
    max_flip_rate: float | None = Field(None, ge=0, le=1, description="Policy bound: fire when the share of "
                                        "(image, label) decisions that flip at the deployed thresholds exceeds "
                                        "this beyond noise (Wilson lower bound). Default null: the compression's "
                                        "acceptance already bounded its flip rate, and the record catches a rise.")
    max_logit_delta: float | None = Field(None, ge=0, description="Absolute bound: fire when max |logit - parent "
                                          "logit| exceeds this, record or not (null: not applied when the bundle "
                                          "has a record).")
    legacy_max_logit_delta: float = Field(1e-3, ge=0, description="Absolute bound on max |delta logit| for a "
                                          "bundle without an accepted-fidelity record (compressed before records "
                                          "existed): the lossless ideal.")


class PrevalenceShiftConfig(_Section):
    """The label's prevalence differs from the reference (informational: it moves PPV and ECE)."""

    alpha: float = Field(0.01, gt=0, lt=0.5, description="Family-wise level over labels (Bonferroni) of the "
                         "test against the reference counts (chi-square, or Fisher's exact for small counts) ...")
    min_abs_change: float = Field(0.05, ge=0, le=1, description="... and |prevalence - reference| at least this.")


class InputDriftConfig(_Section):
    """Pooled features no longer look like the reference sample (kernel two-sample test)."""

    max_samples: int = Field(300, ge=10, description="Rows subsampled from each side for the RBF-kernel MMD.")
    n_permutations: int = Field(200, ge=20, description="Permutations of the MMD test.")
    alpha: float = Field(0.01, gt=0, lt=0.5, description="Fire when the permutation p-value is below this ...")
    min_mmd: float = Field(0.01, ge=0, description="... and the unbiased MMD^2 is at least this.")
    min_rows: int = Field(20, ge=4, description="Fewest rows on each side for a test.")


class MonitorConfig(BaseModel):
    """All monitor thresholds (the policy's ``monitors:`` mapping), with per-label overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_positives: int = Field(1, ge=1, description="Labels with fewer positives (or no negatives) on the audited "
                               "data get a cannot_assess fact instead of metrics.")
    min_comparison_positives: int = Field(10, ge=1, description="Sensitivity and AUROC comparisons (recall_collapse, "
                                          "auroc_drop, calibration_drift's 'ranking intact') need this many positives "
                                          "on the reference part and on the audited data; with fewer they are noise "
                                          "(a single positive's rank) and are skipped, reported as cannot_assess (info).")
    high_severity_factor: float = Field(2.0, ge=1, description="A finding is 'high' severity when it exceeds its "
                                        "tolerance by this factor (e.g. an ECE increase of 2 x ece_increase).")
    seed: int = Field(0, description="Seed of every bootstrap, subsample and clustering.")
    max_evidence_ids: int = Field(200, ge=1, description="Most image ids listed as examples in one fact's evidence "
                                  "(counts are always complete; an FP cluster always lists all its members, which "
                                  "verification judges).")
    calibration_drift: CalibrationDriftConfig = CalibrationDriftConfig()
    fp_cluster: FpClusterConfig = FpClusterConfig()
    recall_collapse: RecallCollapseConfig = RecallCollapseConfig()
    auroc_drop: AurocDropConfig = AurocDropConfig()
    compression_fidelity: CompressionFidelityConfig = CompressionFidelityConfig()
    prevalence_shift: PrevalenceShiftConfig = PrevalenceShiftConfig()
    input_drift: InputDriftConfig = InputDriftConfig()
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-label changes, "
                                                 "e.g. {Pneumothorax: {recall_collapse: {min_recall_ratio: 0.8}}}.")

    _per_label: dict[str, "MonitorConfig"] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_overrides(self) -> "MonitorConfig":
        for label, change in self.overrides.items():
            if label not in _KNOWN_LABELS:
                raise ValueError(f"overrides: unknown label {label!r}; expected one of {', '.join(_KNOWN_LABELS)}")
            if "overrides" in change:
                raise ValueError(f"overrides.{label}: nested 'overrides' are not allowed")
            try:
                merged = MonitorConfig.model_validate(deep_merge(self._base_dump(), change))
            except ValidationError as exc:
                problems = "; ".join(
                    f"overrides.{label}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors()
                )
                raise ValueError(problems) from None
            self._per_label[label] = merged
        return self

    def _base_dump(self) -> dict[str, Any]:
        data = self.model_dump()
        data["overrides"] = {}
        return data

    def for_label(self, label: str | None) -> "MonitorConfig":
        """This config with ``overrides[label]`` merged in (itself when there is none)."""
        if label is None:
            return self
        return self._per_label.get(label, self)

    def value(self, dotted: str, label: str | None = None) -> Any:
        """The value at a dotted key (``"fp_cluster.min_share"``), after the label's overrides."""
        node: Any = self.for_label(label)
        for part in dotted.split("."):
            node = getattr(node, part)
        return node
