"""The decision loop: monitor → decide → apply to a copy → verify → accept or escalate.

:mod:`engine.triage.run` runs one triage (:func:`run_triage`) around the shared state of
:mod:`engine.triage.state`; :mod:`engine.triage.treat` treats one fact; :mod:`engine.triage.verify`
judges a treated copy on the held-out verify split; :mod:`engine.triage.decision` writes what was
decided (``decision.json``, the outcome and the exit code).

``from engine.triage import run_triage`` is the public way in; modules inside this package import
each other by their full module path, never through this file.
"""

from engine.triage.decision import (
    DECISION_FILE,
    EXIT_UNTREATED,
    MODEL_FILE,
    TriageOutcome,
    run_id_for,
)
from engine.triage.run import (
    CAUSE_KINDS,
    SEVERITY_ORDER,
    default_decide_fn,
    default_monitor_fn,
    run_triage,
    sort_facts,
)
from engine.triage.state import DecideFn, StageProgress, TriageRun
from engine.triage.treat import acceptance_from_policy, treat_fact
from engine.triage.verify import Acceptance, MonitorFn, VerifyResult, treated_features, verify_treatment

__all__ = [
    "EXIT_UNTREATED",
    "SEVERITY_ORDER",
    "CAUSE_KINDS",
    "DECISION_FILE",
    "MODEL_FILE",
    "DecideFn",
    "MonitorFn",
    "StageProgress",
    "TriageOutcome",
    "TriageRun",
    "Acceptance",
    "VerifyResult",
    "run_id_for",
    "sort_facts",
    "acceptance_from_policy",
    "default_monitor_fn",
    "default_decide_fn",
    "run_triage",
    "treat_fact",
    "treated_features",
    "verify_treatment",
]
