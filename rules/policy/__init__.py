"""The treatment policy: schema (:mod:`rules.policy.schema`), loading (:mod:`rules.policy.load`) and
monitor thresholds (:mod:`rules.policy.monitors`).

``from rules.policy import Policy, load_policy`` is the public way in; modules inside this
package import each other by their full module path, never through this file.
"""

from rules.policy.load import load_policy, parse_policy, policy_from_dict
from rules.policy.monitors import MonitorConfig
from rules.policy.schema import (
    BUILTIN_INTERVENTIONS,
    DEFAULT_COSTS,
    DEFAULT_EXPECTED_TIME_S,
    DEFAULT_TREATMENTS,
    NO_ACTION,
    AcceptanceConfig,
    ApprovalConfig,
    BudgetConfig,
    ConditionsConfig,
    FReoptConditions,
    LabelOverride,
    PartialRetrainConditions,
    Policy,
    ThresholdConditions,
    VerificationConfig,
    ZeroingConditions,
    known_interventions,
)

__all__ = [
    "MonitorConfig",
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
    "load_policy",
    "parse_policy",
    "policy_from_dict",
]
