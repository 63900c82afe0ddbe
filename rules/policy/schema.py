"""The treatment policy: a machine-readable change-control plan, validated on load.

A policy says which modifications of the deployed model are allowed (``treatments``: which
intervention may treat which kind of issue, under which ``conditions``), what each costs
(``costs``, with ``expected_time_s`` as the tie-break), how a change is verified (``acceptance``,
on the held-out share set by ``verification``), which changes a human must approve
(``approval``), how much a run may spend (``budget``), how each intervention is parameterised
(``params``), what the monitors alarm on (``monitors``) and how any of these differ for one
label (``labels``). In FDA terms it is a predetermined change control
plan; its ``content_hash`` goes into every audit record so a regulator can tell which plan a
decision was made under.

Why so strict: a typo in a policy must never silently fall back to a default. Every mapping
forbids unknown keys, numbers are not coerced from strings or booleans, intervention names and
issue kinds are checked against what exists, and YAML with duplicate keys is refused. Errors name
the file and the key path, pre-commit style::

    policies/x.yaml: ==> At key: costs ==> At key: zeroing: must be a number >= 0, got -1

Each intervention's ``params`` are validated by that plugin's own ``Params`` model (see
``interventions.base``), so a parameter is checked by one model, at load time. Reading a policy from
a file or a mapping is :mod:`rules.policy.load`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    field_validator,
    model_validator,
)

from engine.core.errors import PolicyError
from engine.core.facts import ACTIONABLE_KINDS, FACT_KINDS
from engine.core.storage import canonical_json, sha256_bytes
from engine.core.validation import LocatedError, deep_merge, validate_into
from interventions.registry import BUILTINS, available_interventions
from model.labels import CHEXNET_LABELS, XRV_LABELS
from rules.policy.monitors import MonitorConfig

__all__ = [
    "BUILTIN_INTERVENTIONS",
    "NO_ACTION",
    "DEFAULT_COSTS",
    "DEFAULT_EXPECTED_TIME_S",
    "DEFAULT_TREATMENTS",
    "known_interventions",
    "ApprovalConfig",
    "BudgetConfig",
    "AcceptanceConfig",
    "VerificationConfig",
    "ThresholdConditions",
    "ZeroingConditions",
    "PartialRetrainConditions",
    "FReoptConditions",
    "ConditionsConfig",
    "LabelOverride",
    "Policy",
]

#: Interventions shipped with the tool (plugins may add more through the registry).
BUILTIN_INTERVENTIONS: tuple[str, ...] = tuple(BUILTINS)
#: Pseudo-intervention: leave the model alone and escalate to a human.
NO_ACTION = "no_action"

#: The paper's empirical cost matrix (arbitrary units; only the order and ties matter).
DEFAULT_COSTS: dict[str, float] = {
    NO_ACTION: 0.0,
    "threshold": 1.0,
    "zeroing": 2.0,
    "partial_retrain": 2.0,
    "f_reopt": 3.0,
    "augmentation": 8.0,
    "full_retrain": 10.0,
}
#: Typical wall time on this tool's reference set-up (cached pooled features; DenseNet121 on one
#: GPU for backbone work). Only the tie-break after cost, so realistic orders of magnitude suffice.
DEFAULT_EXPECTED_TIME_S: dict[str, float] = {
    NO_ACTION: 0.0,
    "threshold": 0.5,  # a sort of the fit split's probabilities
    "zeroing": 3.0,  # attribution on cached features + a few masked evaluations
    "partial_retrain": 10.0,  # classifier epochs on cached features
    "f_reopt": 600.0,  # re-optimising the compressed backbone against its parent: minutes
    "augmentation": 2 * 3600.0,  # backbone fine-tuning on augmented images: hours
    "full_retrain": 8 * 3600.0,  # DenseNet121 from ImageNet weights on the training set: hours
}
#: Which intervention may treat which issue kind (the order here is documentation only: the
#: selection orders candidates by cost, expected time and name).
DEFAULT_TREATMENTS: dict[str, tuple[str, ...]] = {
    "calibration_drift": ("threshold", "partial_retrain", "augmentation", "full_retrain"),
    "fp_cluster": ("zeroing", "partial_retrain", "augmentation", "full_retrain"),
    "recall_collapse": ("threshold", "partial_retrain", "augmentation", "full_retrain"),
    "auroc_drop": ("partial_retrain", "augmentation", "full_retrain"),
    "compression_fidelity": ("f_reopt", "full_retrain"),
    # a reader's report of one image (``triage --reports``, ``correct``): the surgical fix first
    "reported_fp": ("zeroing", "threshold", "partial_retrain"),
}

_KNOWN_LABELS: tuple[str, ...] = tuple(dict.fromkeys(CHEXNET_LABELS + XRV_LABELS))


# -- name checks --------------------------------------------------------------------------------

def known_interventions() -> tuple[str, ...]:
    """Built-in names plus every registered plugin (entry points included), sorted."""
    return tuple(sorted(set(BUILTIN_INTERVENTIONS) | set(available_interventions())))


def _plugin_expected_time(name: str) -> float | None:
    cls = available_interventions().get(name)
    value = getattr(cls, "expected_time_s", None) if cls is not None else None
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def _check_intervention(name: str) -> str:
    if name == NO_ACTION:
        return name
    known = known_interventions()
    if name not in known:
        raise ValueError(f"unknown intervention {name!r} (expected one of: {', '.join(known)}, {NO_ACTION})")
    return name


def _check_treatment(name: str) -> str:
    if name == NO_ACTION:
        raise ValueError(f"{NO_ACTION!r} is not a treatment: a fact that no rule can treat is escalated "
                         "automatically")
    return _check_intervention(name)


def _check_kind(kind: str) -> str:
    if kind not in FACT_KINDS:
        raise ValueError(f"unknown issue kind {kind!r} (expected one of: {', '.join(ACTIONABLE_KINDS)})")
    if kind not in ACTIONABLE_KINDS:
        raise ValueError(f"issue kind {kind!r} is informational and cannot be treated "
                         f"(treatable kinds: {', '.join(ACTIONABLE_KINDS)})")
    return kind


def _check_label(label: str) -> str:
    if label not in _KNOWN_LABELS:
        raise ValueError(f"unknown label {label!r} (expected one of: {', '.join(_KNOWN_LABELS)})")
    return label


def _version_to_str(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


InterventionName = Annotated[str, AfterValidator(_check_intervention)]
TreatmentName = Annotated[str, AfterValidator(_check_treatment)]
IssueKind = Annotated[str, AfterValidator(_check_kind)]
LabelName = Annotated[str, AfterValidator(_check_label)]
Cost = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


#: A validation problem: the key path it belongs to, and the message.
_Problem = tuple[tuple[str | int, ...], str]


def _check_plugin_params(name: str, params: Mapping[str, Any], where: tuple[str | int, ...]) -> list[_Problem]:
    """``params`` checked by the plugin's own ``Params`` model (``no_action`` has no plugin and no parameters)."""
    cls = available_interventions().get(name)
    if cls is None:
        return []
    return validate_into(cls.Params, params, where)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# -- sections -----------------------------------------------------------------------------------

class ApprovalConfig(_Strict):
    """Changes costlier than ``auto_max_cost`` are planned but applied only with ``--approve NAME``."""

    auto_max_cost: Cost = 3.0


class BudgetConfig(_Strict):
    """Caps on one triage run, so escalation cannot loop or run up hours of retraining unnoticed."""

    max_attempts_per_issue: int = Field(3, ge=1)
    max_total_cost: Cost = 20.0


class VerificationConfig(_Strict):
    """How the audited data is split for treating and verifying (the split is patient-disjoint)."""

    #: Share of the patients held out as the verify split (the rest is the fit split).
    verify_fraction: float = Field(0.5, gt=0, lt=1)


class AcceptanceConfig(_Strict):
    """What a treated model must show on the held-out verify split (fields match ``engine.triage.verify.Acceptance``)."""

    #: Largest AUROC drop allowed on any label other than the treated one.
    max_other_auroc_change: float = Field(0.01, ge=0, le=1)
    #: None: the issue must be gone. Otherwise the least relative improvement of its distance from
    #: the reference that still counts as treated.
    min_improvement: float | None = Field(None, gt=0, le=1)
    #: Most true positives the treated label may lose on the verify split (every treatment that moves
    #: its operating point: a new threshold, new logits).
    max_tp_lost: int = Field(0, ge=0)
    #: New actionable issues on other labels a treatment may introduce.
    max_new_issues: int = Field(0, ge=0)
    #: FP-cluster treatments: least share of the cluster's false positives on the verify split that
    #: must turn negative (null: not checked).
    min_fp_removed_share: float | None = Field(0.5, gt=0, le=1)
    #: Confidence of the verify-split intervals (target sensitivity, improvement, non-inferiority);
    #: the k-th candidate tried for an issue has its improvement judged at 1 - (1 - confidence) / k.
    confidence: float = Field(0.95, gt=0.5, lt=1)
    #: Paired-bootstrap resamples per interval (seeded from the run seed and the fact id).
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)


class ThresholdConditions(_Strict):
    #: Ranking counts as intact (so moving the operating point can help) when the monitor says so,
    #: or else when AUROC >= this times the reference AUROC.
    min_auroc_ratio: float = Field(0.95, gt=0, le=1)


class ZeroingConditions(_Strict):
    #: Zeroing is proposed only when at most this many classifier channels explain the FP cluster.
    max_channels: int = Field(10, ge=1)


class PartialRetrainConditions(_Strict):
    #: Retraining the classifier needs at least this many labelled positives of the label.
    min_positives: int = Field(10, ge=1)


class FReoptConditions(_Strict):
    #: Re-optimising against the parent needs a bundle with a compression history.
    require_compression_history: bool = True


class ConditionsConfig(_Strict):
    """Applicability conditions of the rules (the rule *parameters*; the rules live in ``rules.ruleset``)."""

    threshold: ThresholdConditions = ThresholdConditions()
    zeroing: ZeroingConditions = ZeroingConditions()
    partial_retrain: PartialRetrainConditions = PartialRetrainConditions()
    f_reopt: FReoptConditions = FReoptConditions()


# zeroing's max_channels and partial_retrain's min_positives are not here: they default to the
# rule's value in ``conditions`` (see Policy.params_for). Each plugin's ``Params`` model fills the rest.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "threshold": {"method": "youden"},
}


class LabelOverride(_Strict):
    """Per-label changes; each section is merged onto the policy-wide one."""

    costs: dict[InterventionName, Cost] = Field(default_factory=dict)
    acceptance: dict[str, JsonValue] = Field(default_factory=dict)
    conditions: dict[str, JsonValue] = Field(default_factory=dict)
    params: dict[InterventionName, dict[str, JsonValue]] = Field(default_factory=dict)
    monitors: dict[str, JsonValue] = Field(default_factory=dict)


def _merge_defaults(defaults: Mapping[str, Any]):
    def merge(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {**defaults, **value}
        return value

    return merge


class Policy(_Strict):
    """A validated policy. Build it with :func:`load_policy` (or :func:`policy_from_dict`)."""

    name: str = Field(min_length=1)
    version: Annotated[str, BeforeValidator(_version_to_str)] = "1"
    description: str = ""
    #: Cost of each intervention (merged onto :data:`DEFAULT_COSTS`).
    costs: Annotated[dict[InterventionName, Cost], BeforeValidator(_merge_defaults(DEFAULT_COSTS))] = Field(
        default_factory=lambda: dict(DEFAULT_COSTS))
    #: Typical wall time in seconds (merged onto :data:`DEFAULT_EXPECTED_TIME_S`); the tie-break.
    expected_time_s: Annotated[dict[InterventionName, Seconds],
                               BeforeValidator(_merge_defaults(DEFAULT_EXPECTED_TIME_S))] = Field(
        default_factory=lambda: dict(DEFAULT_EXPECTED_TIME_S))
    #: Issue kind -> interventions allowed to treat it (kinds not given keep their defaults).
    treatments: Annotated[dict[IssueKind, list[TreatmentName]],
                          BeforeValidator(_merge_defaults({k: list(v) for k, v in DEFAULT_TREATMENTS.items()}))] = (
        Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TREATMENTS.items()}))
    conditions: ConditionsConfig = ConditionsConfig()
    acceptance: AcceptanceConfig = AcceptanceConfig()
    verification: VerificationConfig = VerificationConfig()
    approval: ApprovalConfig = ApprovalConfig()
    budget: BudgetConfig = BudgetConfig()
    #: Intervention -> parameters passed to it (merged per intervention onto the defaults).
    params: Annotated[dict[InterventionName, dict[str, JsonValue]],
                      BeforeValidator(_merge_defaults(DEFAULT_PARAMS))] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_PARAMS))
    labels: dict[LabelName, LabelOverride] = Field(default_factory=dict)
    monitors: MonitorConfig = MonitorConfig()

    _source_path: Path | None = PrivateAttr(None)
    _hash: str | None = PrivateAttr(None)
    _label_acceptance: dict[str, AcceptanceConfig] = PrivateAttr(default_factory=dict)
    _label_conditions: dict[str, ConditionsConfig] = PrivateAttr(default_factory=dict)
    _label_params: dict[str, dict[str, dict[str, Any]]] = PrivateAttr(default_factory=dict)

    @field_validator("treatments")
    @classmethod
    def _no_duplicates(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        problems = []
        for kind, names in value.items():
            seen: set[str] = set()
            for i, name in enumerate(names):
                if name in seen:
                    problems.append(((kind, i), f"{name!r} is listed twice"))
                seen.add(name)
        if problems:
            raise LocatedError(problems)
        return value

    @model_validator(mode="before")
    @classmethod
    def _fill_plugin_times(cls, data: Any) -> Any:
        """Plugins named in treatments get their class's ``expected_time_s`` unless the policy sets one."""
        if not isinstance(data, Mapping) or not isinstance(data.get("treatments"), Mapping):
            return data
        given = data.get("expected_time_s") if isinstance(data.get("expected_time_s"), Mapping) else None
        if "expected_time_s" in data and given is None:
            return data
        times = dict(given or {})
        for names in data["treatments"].values():
            if not isinstance(names, list):
                continue
            for name in names:
                if isinstance(name, str) and name not in times and name not in DEFAULT_EXPECTED_TIME_S:
                    plugin_time = _plugin_expected_time(name) if name in known_interventions() else None
                    if plugin_time is not None:
                        times[name] = plugin_time
        if times or given is not None:
            data = {**data, "expected_time_s": times}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "Policy":
        """What one field cannot check alone: prices of the treatments, plugin parameters, label overrides."""
        problems = self._check_priced_treatments() + self._check_treated_kinds()
        for name, params in self.params.items():
            problems += _check_plugin_params(name, params, ("params", name))
        monitor_overrides = dict(self.monitors.overrides)
        for label, override in self.labels.items():
            problems += self._resolve_label(label, override, monitor_overrides)
        if problems:
            raise LocatedError(problems)
        if monitor_overrides != self.monitors.overrides:
            data = self.monitors.model_dump()
            data["overrides"] = monitor_overrides
            # Frozen model: set the resolved section once, during validation.
            object.__setattr__(self, "monitors", MonitorConfig.model_validate(data))
        return self

    def _check_priced_treatments(self) -> list[_Problem]:
        """Every intervention a treatment names has a cost and an expected time."""
        problems: list[_Problem] = []
        for kind, names in self.treatments.items():
            for i, name in enumerate(names):
                if name not in self.costs:
                    problems.append((("treatments", kind, i), f"intervention {name!r} has no cost; add costs.{name}"))
                if name not in self.expected_time_s:
                    problems.append((("treatments", kind, i),
                                     f"intervention {name!r} has no expected time; add expected_time_s.{name}"))
        return problems

    def _check_treated_kinds(self) -> list[_Problem]:
        """Every (kind, intervention) pair names a plugin whose ``treats`` lists the kind: a pair its plugin
        refuses would be proposed, escalated for approval, and then answer "not applicable" when approved."""
        problems: list[_Problem] = []
        plugins = available_interventions()
        for kind, names in self.treatments.items():
            for name in names:
                treats = tuple(getattr(plugins.get(name), "treats", ()) or ())
                if name in plugins and kind not in treats:
                    treated = ", ".join(treats) if treats else "no issue kind"
                    problems.append((("treatments", kind), f"{name} does not treat {kind} (it treats {treated})"))
        return problems

    def _resolve_label(self, label: str, override: LabelOverride,
                       monitor_overrides: dict[str, Any]) -> list[_Problem]:
        """Merge one label's override onto the policy-wide sections (stored for the ``*_for`` lookups).

        The label's monitor changes go into ``monitor_overrides``; returns the problems found.
        """
        where = ("labels", label)
        problems: list[_Problem] = [
            (where + ("costs", name), f"intervention {name!r} has no policy-wide cost")
            for name in override.costs if name not in self.costs]
        acceptance = deep_merge(self.acceptance.model_dump(), override.acceptance)
        found = validate_into(AcceptanceConfig, acceptance, where + ("acceptance",))
        problems += found
        if not found:
            self._label_acceptance[label] = AcceptanceConfig.model_validate(acceptance)
        conditions = deep_merge(self.conditions.model_dump(), override.conditions)
        found = validate_into(ConditionsConfig, conditions, where + ("conditions",))
        problems += found
        if not found:
            self._label_conditions[label] = ConditionsConfig.model_validate(conditions)
        merged_params = {k: dict(v) for k, v in self.params.items()}
        for name, change in override.params.items():
            merged_params[name] = deep_merge(merged_params.get(name, {}), change)
            problems += _check_plugin_params(name, merged_params[name], where + ("params", name))
        self._label_params[label] = merged_params
        if override.monitors:
            problems += self._resolve_label_monitors(label, override.monitors, monitor_overrides)
        return problems

    def _resolve_label_monitors(self, label: str, change: Mapping[str, Any],
                                monitor_overrides: dict[str, Any]) -> list[_Problem]:
        where = ("labels", label, "monitors")
        if label in monitor_overrides:
            return [(where, f"monitors.overrides.{label} is also set; give the label's monitor changes in one place")]
        base = self.monitors.model_dump()
        base["overrides"] = {}
        problems = validate_into(MonitorConfig, deep_merge(base, change), where)
        if not problems:
            monitor_overrides[label] = dict(change)
        return problems

    # -- identity -----------------------------------------------------------------------------
    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the validated policy (the file's formatting does not matter)."""
        if self._hash is None:
            self._hash = sha256_bytes(canonical_json(self.model_dump(mode="json")))
        return self._hash

    @property
    def source_path(self) -> Path | None:
        """The file this policy was loaded from (None when built from a mapping)."""
        return self._source_path

    # -- lookups ------------------------------------------------------------------------------
    def cost(self, intervention: str, label: str | None = None) -> float:
        """Cost of ``intervention`` for ``label`` (the label's override, else the policy-wide cost)."""
        if label is not None and label in self.labels and intervention in self.labels[label].costs:
            return float(self.labels[label].costs[intervention])
        if intervention not in self.costs:
            raise PolicyError(f"policy {self.name!r} has no cost for intervention {intervention!r}; "
                              f"costs are given for: {', '.join(self.costs)}")
        return float(self.costs[intervention])

    def expected_time(self, intervention: str) -> float:
        if intervention not in self.expected_time_s:
            raise PolicyError(f"policy {self.name!r} has no expected time for intervention {intervention!r}")
        return float(self.expected_time_s[intervention])

    def treatments_for(self, kind: str) -> tuple[str, ...]:
        return tuple(self.treatments.get(kind, ()))

    def needs_approval(self, cost: float) -> bool:
        return cost > self.approval.auto_max_cost

    def acceptance_for(self, label: str | None) -> AcceptanceConfig:
        return self._label_acceptance.get(label, self.acceptance) if label is not None else self.acceptance

    def conditions_for(self, label: str | None) -> ConditionsConfig:
        return self._label_conditions.get(label, self.conditions) if label is not None else self.conditions

    def params_for(self, intervention: str, label: str | None = None) -> dict[str, Any]:
        """A fresh copy of the parameters passed to ``intervention`` for ``label``.

        A limit that the proposing rule also checks defaults to the rule's value in ``conditions``,
        so the rule and the plugin read one number (explicit ``params`` still win): the plugin's
        ``min_positives`` (counted on the fit half, at least 2) and ``max_channels``.
        """
        table = self._label_params.get(label, self.params) if label is not None else self.params
        params = copy.deepcopy(dict(table.get(intervention, {})))
        cond = self.conditions_for(label)
        if intervention == "partial_retrain":
            params.setdefault("min_positives", max(2, cond.partial_retrain.min_positives))
        elif intervention == "zeroing":
            params.setdefault("max_channels", cond.zeroing.max_channels)
        return params
