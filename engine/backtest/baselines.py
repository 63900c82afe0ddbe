"""The naive policies a backtest compares against: what an ML engineer might do by hand.

* ``no_action`` — leave the model alone (what heals by itself, and the harm floor: none);
* ``always_threshold`` — re-fit every label's threshold by Youden's J on the whole audit part;
* ``always_retrain`` — classifier retraining of every label with enough positives (the
  ``partial_retrain`` plugin with ``scope: all``, out-of-fold thresholds) on the whole audit part.

They see exactly what triage sees (the audit part), are judged on the same holdout, and apply
without verification: that is the point of the comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.core.errors import InterventionError
from engine.core.facts import IssueFact
from interventions.attribution import truth_index
from interventions.base import TreatmentContext
from interventions.registry import get_intervention
from interventions.threshold import fit_threshold
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from rules.policy import Policy

__all__ = ["BASELINES", "BaselineResult", "run_baseline"]


@dataclass(frozen=True)
class BaselineResult:
    bundle: Bundle
    treated_labels: list[str]
    cost: float
    note: str


def _no_action(bundle: Bundle, data: FeatureSet, ds: NIHDataset, policy: Policy, seed: int) -> BaselineResult:
    return BaselineResult(bundle, [], 0.0, "nothing changed")


def _always_threshold(bundle: Bundle, data: FeatureSet, ds: NIHDataset, policy: Policy, seed: int) -> BaselineResult:
    thresholds = list(bundle.meta.thresholds)
    treated = []
    probs = data.probs
    for k, name in enumerate(bundle.labels):
        if name not in CHEXNET_LABELS:
            continue
        y = data.labels[:, truth_index(name)]
        try:
            thresholds[k] = fit_threshold(y, probs[:, k], "youden")
        except InterventionError:
            continue  # one class only on the audit part: keep the threshold
        treated.append(name)
    new = bundle.with_meta(thresholds=thresholds)
    return BaselineResult(new, treated, policy.cost("threshold"),
                          f"Youden-J thresholds re-fitted on {len(treated)} label(s) of the audit part")


def _always_retrain(bundle: Bundle, data: FeatureSet, ds: NIHDataset, policy: Policy, seed: int) -> BaselineResult:
    plugin = get_intervention("partial_retrain")
    params = {**policy.params_for("partial_retrain", None), "scope": "all"}
    fact = IssueFact(kind="auroc_drop", monitor="backtest_baseline", severity="info",
                     message="baseline: retrain every label's classifier row")
    ctx = TreatmentContext(bundle=bundle, fact=fact, fit=data, fit_dataset=ds, params=params, seed=seed)
    ok, why = plugin.applicable(ctx)
    if not ok:
        return BaselineResult(bundle, [], 0.0, f"not applicable: {why}")
    result = plugin.apply(ctx)
    labels = list(result.changes.get("labels", []))
    return BaselineResult(result.bundle, labels, policy.cost("partial_retrain"),
                          f"classifier rows and thresholds of {len(labels)} label(s) re-fitted on the audit part")


#: Baseline name -> how it treats the audited model.
BASELINES: dict[str, Callable[[Bundle, FeatureSet, NIHDataset, Policy, int], BaselineResult]] = {
    "no_action": _no_action,
    "always_threshold": _always_threshold,
    "always_retrain": _always_retrain,
}


def run_baseline(name: str, bundle: Bundle, data: FeatureSet, ds: NIHDataset, policy: Policy,
                 seed: int) -> BaselineResult:
    """Apply baseline ``name`` to ``bundle`` using the audit part (``data`` covers ``ds``'s rows)."""
    if list(data.image_names) != list(ds.image_names):
        order = {n: i for i, n in enumerate(ds.image_names)}
        ds = ds.subset([order[n] for n in data.image_names])
    return BASELINES[name](bundle, data, ds, policy, seed)
