"""Diagnostic monitors: labelled audit data in, typed issue facts out.

One module per monitor, one explicit table (:data:`MONITORS`; its order is report order)::

    from engine.monitors import MonitorConfig, MonitorContext, run_monitors
    facts = run_monitors(MonitorContext(bundle, feature_set), MonitorConfig())

==========================  ==================================================================
monitor                     fires when (thresholds: :class:`MonitorConfig`)
==========================  ==================================================================
``validity``                NaN/inf outputs (``invalid_output``); labels without positives,
                            ground truth or reference, or too few positives to compare
                            sensitivity/AUROC (``cannot_assess``). Always runs first.
``calibration_drift``       ECE up beyond noise, Youden threshold moved with ranking intact, or
                            scores moved wholesale against the deployed threshold
``fp_cluster``              most FPs share a direction of feature space that sets them apart
                            from both the TPs and the TNs (a shortcut)
``recall_collapse``         recall well below the reference sensitivity (Fisher test)
``auroc_drop``              AUROC below reference - tolerance beyond the noise margin
``compression_fidelity``    compressed model departs from its parent more than it was accepted with
``prevalence_shift``        a label's prevalence differs from the reference (info)
``input_drift``             pooled features differ from a reference sample, RBF-MMD (info)
==========================  ==================================================================

Per-label statistical tests are family-wise (Bonferroni over the labels assessed): one audit
tests 14 labels, and a regulator reads every alarm.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.facts import IssueFact
from engine.monitors.auroc_drop import AurocDropMonitor
from engine.monitors.base import Monitor, MonitorContext, run_memo
from engine.monitors.calibration_drift import CalibrationDriftMonitor
from engine.monitors.compression_fidelity import CompressionFidelityMonitor
from engine.monitors.fp_cluster import FpClusterMonitor
from engine.monitors.input_drift import InputDriftMonitor
from engine.monitors.prevalence_shift import PrevalenceShiftMonitor
from engine.monitors.recall_collapse import RecallCollapseMonitor
from engine.monitors.validity import ValidityMonitor
from rules.policy.monitors import MonitorConfig

__all__ = [
    "Monitor",
    "MonitorConfig",
    "MonitorContext",
    "MONITORS",
    "get_monitor",
    "available_monitors",
    "run_monitors",
    "ALWAYS_RUN",
]

#: Every monitor by name. Table order is report order (validity first: the others are conditional
#: on it). An explicit table rather than registration by import, so what runs is read here.
MONITORS: dict[str, type[Monitor]] = {
    cls.name: cls
    for cls in (
        ValidityMonitor,
        CalibrationDriftMonitor,
        FpClusterMonitor,
        RecallCollapseMonitor,
        AurocDropMonitor,
        CompressionFidelityMonitor,
        PrevalenceShiftMonitor,
        InputDriftMonitor,
    )
}


def get_monitor(name: str) -> Monitor:
    try:
        return MONITORS[name]()
    except KeyError:
        raise KeyError(f"Unknown monitor {name!r}; expected one of {', '.join(MONITORS)}") from None


def available_monitors() -> tuple[str, ...]:
    return tuple(MONITORS)


#: Monitors that run whatever ``names`` says: the others' results are conditional on them.
ALWAYS_RUN = ("validity",)


def run_monitors(ctx: MonitorContext, config: MonitorConfig | None = None,
                 names: Sequence[str] | None = None) -> list[IssueFact]:
    """Run the named monitors (default: all) and return their facts.

    Order is deterministic: registry order, then the bundle's label order (model-wide facts first).
    """
    config = config if config is not None else MonitorConfig()
    registry = available_monitors()
    if names is not None:
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"Unknown monitor(s) {unknown}; expected names from {', '.join(registry)}")
    selected = [n for n in registry if names is None or n in names or n in ALWAYS_RUN]
    label_order = {name: i for i, name in enumerate(ctx.bundle.labels)}
    facts: list[IssueFact] = []
    with run_memo():
        for name in selected:
            monitor = get_monitor(name)
            if not monitor.enabled(config) and not any(
                monitor.enabled(config.for_label(label)) for label in ctx.bundle.labels
            ):
                continue
            found = monitor.run(ctx, config)
            found.sort(key=lambda f: -1 if f.label is None else label_order.get(f.label, len(label_order)))
            facts.extend(found)
    return facts
