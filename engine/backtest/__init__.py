"""Prove the decisions: triage on an AUDIT part, judged on a HOLDOUT part it never saw, against naive baselines.

:mod:`~engine.backtest.scenarios` (what runs), :mod:`~engine.backtest.parts` (the audit/holdout
folders, faults injected into each), :mod:`~engine.backtest.baselines` (no_action, always_threshold,
always_retrain), :mod:`~engine.backtest.judge` (detected / healed / harmed),
:mod:`~engine.backtest.runner` (the resumable loop), :mod:`~engine.backtest.summary` (rates with
Wilson intervals, the targets), :mod:`~engine.backtest.document` (backtest.json and the HTML).
Modules inside this package import each other by full path, never through this file.
"""

from engine.backtest.baselines import BASELINES
from engine.backtest.document import (
           BACKTEST_FILE,
           REPORT_FILE,
           build_document,
           write_document,
)
from engine.backtest.runner import Contender, contenders, run_backtest
from engine.backtest.scenarios import (
           CLEAN,
           Scenario,
           load_scenarios,
           scenarios_from_flags,
)

__all__ = [
           "BACKTEST_FILE",
           "BASELINES",
           "CLEAN",
           "REPORT_FILE",
           "Contender",
           "Scenario",
           "build_document",
           "contenders",
           "load_scenarios",
           "run_backtest",
           "scenarios_from_flags",
           "write_document",
]
