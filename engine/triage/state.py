"""The state one triage run's steps share: :class:`TriageRun`.

What every step reads (the policy, the data and its patient-disjoint fit/verify split, the parent,
the monitors and the rules, the audit log, progress) and what the steps change as they go: the
current (accepted) model with its view of the data, and the budget spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.audit import AuditStore
from engine.core.errors import DataError
from engine.core.facts import IssueFact
from engine.triage.verify import MonitorFn
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet
from rules.policy import Policy

__all__ = [
    "DecideFn",
    "StageProgress",
    "Stages",
    "RunLog",
    "CurrentModel",
    "Budget",
    "TriageRun",
    "reorder_like",
]

DecideFn = Callable[..., list[Any]]
#: ``progress(stage, done, total)``; stages: features, parent_features, monitor, triage, final_monitor.
StageProgress = Callable[[str, int, int], None]


class Stages:
    """Forwards ``progress(done, total)`` of one stage to the caller's stage-aware callback."""

    def __init__(self, progress: StageProgress | None) -> None:
        self._progress = progress

    def __call__(self, stage: str) -> Callable[[int, int], None] | None:
        if self._progress is None:
            return None
        return lambda done, total=None: self._progress(stage, int(done), int(total or 0))

    def tick(self, stage: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(stage, done, total)


@dataclass
class RunLog:
    """The run's audit trail (records go to ``audit`` under ``run_id``, when a store is given) and
    its wall times by step (``walls``, written into ``run_finished``; never into decision.json)."""

    run_id: str
    audit: AuditStore | None
    walls: dict[str, float] = field(default_factory=dict)

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(self.run_id, kind, payload)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Record the body's wall time as ``walls[step]`` (not when it raises)."""
        t = time.perf_counter()
        yield
        self.walls[step] = time.perf_counter() - t


def reorder_like(fs: FeatureSet, names: Sequence[str], what: str) -> FeatureSet:
    """``fs`` with its rows in the order of ``names``; a name ``fs`` lacks is a :class:`DataError`."""
    if tuple(fs.image_names) == tuple(names):
        return fs
    index = {n: i for i, n in enumerate(fs.image_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"{what}: {len(missing)} image(s) could not be read, e.g. {missing[0]!r}")
    return fs.subset(np.array([index[n] for n in names]))


@dataclass
class CurrentModel:
    """The current (accepted) model and its view of the data."""

    bundle: Bundle
    data: FeatureSet  # whole set, row-aligned with the dataset
    hash: str
    version: int = 0  # increments on every accepted treatment


@dataclass
class Budget:
    """The policy's caps on one run (``policy.budget``) and what has been spent of them."""

    max_attempts_per_issue: int
    max_total_cost: float
    attempts_used: int = 0
    cost_spent: float = 0.0

    def allows(self, attempts_on_issue: int, next_cost: float) -> bool:
        """Whether one more intervention of ``next_cost`` may run on an issue already tried that often."""
        return not (attempts_on_issue >= self.max_attempts_per_issue
                    or self.cost_spent + next_cost > self.max_total_cost + 1e-12)

    def charge(self, cost: float) -> None:
        """One intervention ran (whatever its verdict)."""
        self.attempts_used += 1
        self.cost_spent += cost

    def to_json(self) -> dict[str, Any]:
        return {"max_attempts_per_issue": self.max_attempts_per_issue, "max_total_cost": self.max_total_cost,
                "attempts_used": self.attempts_used, "cost_spent": self.cost_spent}


@dataclass
class TriageRun:
    """One run's inputs, data and progress; built by ``run_triage`` once the features and the split exist.

    ``current``, ``budget`` and ``verify_cache`` change as treatments are tried and accepted.
    """

    policy: Policy
    seed: int
    approve: tuple[str, ...]
    dry_run: bool
    out_dir: Path
    monitor_fn: MonitorFn
    decide_fn: DecideFn
    log: RunLog
    stages: Stages
    # -- the models the run started from
    bundle: Bundle
    model_hash: str
    parent: Bundle | None
    parent_hash: str | None
    # -- the data: the whole set (row-aligned with its features) and its fit/verify split
    dataset: NIHDataset
    manifest_hash: str
    data: FeatureSet
    parent_data: FeatureSet | None
    fit_idx: np.ndarray
    verify_idx: np.ndarray
    fit_ds: NIHDataset
    verify_ds: NIHDataset
    parent_verify: FeatureSet | None
    split_info: dict[str, Any]
    #: What the rules may know beyond the facts (``has_compression_history``, ``has_parent``).
    context: dict[str, Any]
    budget: Budget
    current: CurrentModel
    #: The current model's monitor view of the verify split, per accepted model version.
    verify_cache: dict[int, tuple[FeatureSet, list[IssueFact]]] = field(default_factory=dict)
    #: The facts the run's monitors raised on the whole set (set once monitored): a treatment of a
    #: label whose false positives cluster is judged on the images outside the cluster too.
    facts: list[IssueFact] = field(default_factory=list)
    #: Readers' reports of false positives (``triage --reports``, ``correct``), as JSON rows.
    reports: list[dict[str, Any]] = field(default_factory=list)
    #: False for ``correct``: the reports' facts are the only facts (the policy's monitors do not run).
    policy_monitors: bool = True

    @property
    def run_id(self) -> str:
        return self.log.run_id

    def verify_view(self) -> tuple[FeatureSet, list[IssueFact]]:
        """The verify split's rows under the current model and every monitor's facts on them (cached)."""
        version = self.current.version
        if version not in self.verify_cache:
            v_before = self.current.data.subset(self.verify_idx)
            self.verify_cache[version] = (v_before, self.monitor_fn(self.current.bundle, v_before, self.parent,
                                                                    self.parent_verify))
        return self.verify_cache[version]
