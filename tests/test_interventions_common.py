"""Invariants every registered intervention must keep (scikit-learn ``test_common.py`` style).

Each plugin is run on a scenario of every issue kind it treats (when applicable there) and must:
leave its input bundle bit-identical (weights and metadata); give the same result twice for the
same context and seed; record the input's content hash as ``parent_hash`` and extend its history;
return JSON-serialisable ``changes``; leave the backbone bit-identical when it claims to be
classifier-only; produce a bundle that saves and loads; refuse kinds it does not treat and policy
parameters it does not know, with a reason.

Scenarios share one small world: a hand-set classifier on a tiny DenseNet, synthetic pooled
features with known structure (a planted shortcut cluster for Pneumothorax), and a PNG dataset
on disk with the same image names, labels and patients (for plugins that read images).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import pytest
import torch

from conftest import write_nih_dataset
from engine.core.errors import InterventionError, PolicyError
from engine.core.facts import ACTIONABLE_KINDS, FACT_KINDS, IssueFact
from interventions.attribution import head_logits
from interventions.base import Intervention, InterventionParams, TreatmentContext
from interventions.registry import BUILTINS, available_interventions, get_intervention
from model.bundle import Bundle, load_bundle, save_bundle
from model.data import load_nih_dataset, read_images
from model.features import FeatureSet, compute_features
from model.labels import CHEXNET_LABELS
from rules.policy import policy_from_dict
from test_interventions import ARTEFACT, EFF, hand_set_bundle, synthetic_features


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny convolutions gain nothing from two, and on a loaded machine the
    OpenMP threads' spin-waiting makes them 20-30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PLUGINS = sorted(available_interventions())
#: Keep backbone-training plugins to seconds in this suite; their effects are tested elsewhere.
FAST_PARAMS: dict[str, dict[str, Any]] = {"augmentation": {"epochs": 1}, "full_retrain": {"epochs": 1}}


def _finding_labels(row: np.ndarray) -> str:
    return "|".join(name for name, v in zip(CHEXNET_LABELS, row) if v) or "No Finding"


def _with_row(bundle: Bundle, k: int, *, scale: float = 1.0, bias: float = 0.0,
              replace: np.ndarray | None = None) -> Bundle:
    out = bundle.copy()
    with torch.no_grad():
        if replace is not None:
            out.model.classifier.weight[k] = torch.from_numpy(replace).float()
        out.model.classifier.weight[k] *= scale
        out.model.classifier.bias[k] += bias
    return out


class World:
    """Scenario contexts by issue kind, built once per module."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.base = hand_set_bundle()
        fs, cluster = synthetic_features(self.base, n=200, seed=5, prefix="w", cluster_share=0.1)
        rows = [(name, _finding_labels(fs.labels[i]), 1000 + i // 2) for i, name in enumerate(fs.image_names)]
        root = write_nih_dataset(tmp_path_factory.mktemp("world") / "ds", rows, size=32, seed=5)
        self.dataset = load_nih_dataset(root)
        assert list(self.dataset.image_names) == list(fs.image_names)
        assert np.array_equal(self.dataset.labels, fs.labels)
        self.features = fs.features
        self.cluster_ids = [fs.image_names[i] for i in cluster]
        rng = np.random.default_rng(9)
        self.bundles = {
            "fp_cluster": self.base,
            "recall_collapse": _with_row(self.base, EFF, scale=0.3, bias=-1.0),
            "calibration_drift": _with_row(self.base, EFF, bias=2.5),
            "auroc_drop": _with_row(self.base, EFF, replace=rng.normal(0, 1.0, 32)),
        }

        self._compressed: Bundle | None = None

    def compressed(self) -> Bundle:
        """The base model compressed by ``model.compression`` on the world's images (built on first use)."""
        if self._compressed is None:
            from model.compression import CompressSettings, compress_bundle  # noqa: PLC0415
            settings = CompressSettings(target_reduction=0.3, max_auroc_drop=None, max_flip_rate=None)
            result = compress_bundle(self.base, self.dataset, settings, speed=False)
            self._compressed = result.bundle
        return self._compressed

    def fit_for(self, bundle: Bundle) -> FeatureSet:
        ds = self.dataset
        if bundle.meta.arch != self.base.meta.arch:  # a compressed model: its own features, from the images
            _, images = read_images(ds, bundle.meta.input_size)
            features, logits = compute_features(bundle, images)
        else:
            features, logits = self.features, head_logits(bundle, self.features)
        return FeatureSet(tuple(ds.image_names), ds.patient_ids, ds.labels, features,
                          logits, bundle.weights_hash(), ds.manifest_hash())

    def fact(self, kind: str) -> IssueFact:
        if kind == "compression_fidelity":
            return IssueFact(kind=kind, monitor="compression_fidelity", label=None, severity="high",
                             message="planted compression drift")
        if kind == "fp_cluster":
            return IssueFact(kind=kind, monitor="fp_cluster", label="Pneumothorax", severity="high",
                             message="planted cluster", measured={"cluster_size": len(self.cluster_ids)},
                             evidence={"member_ids": self.cluster_ids, "channels": ARTEFACT + [3]})
        return IssueFact(kind=kind, monitor=kind, label="Effusion", severity="high", message=f"planted {kind}")

    def context(self, kind: str, name: str, params: dict[str, Any] | None = None) -> TreatmentContext | None:
        if kind == "compression_fidelity":
            bundle, parent = self.compressed().copy(), self.base.copy()
        elif kind in self.bundles:
            bundle, parent = self.bundles[kind].copy(), None  # each context owns its input
        else:
            return None
        params = dict(FAST_PARAMS.get(name, {}) if params is None else params)
        return TreatmentContext(bundle=bundle, fact=self.fact(kind), fit=self.fit_for(bundle),
                                fit_dataset=self.dataset, params=params, seed=0, parent=parent)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory)


def _snapshot(bundle: Bundle) -> tuple[dict[str, bytes], dict[str, Any], str]:
    state = {k: v.detach().cpu().numpy().tobytes() for k, v in bundle.model.state_dict().items()}
    return state, bundle.meta.model_dump(mode="json"), bundle.content_hash()


class Run:
    def __init__(self, kind: str, ctx: TreatmentContext, before, first, second) -> None:
        self.kind, self.ctx, self.before, self.first, self.second = kind, ctx, before, first, second


_RUNS: dict[str, tuple[list[Run], dict[str, str]]] = {}


def runs_of(name: str, world: World) -> tuple[list[Run], dict[str, str]]:
    """Apply plugin ``name`` twice on each scenario it treats (once for backbone plugins); cached."""
    if name in _RUNS:
        return _RUNS[name]
    plugin = get_intervention(name)
    runs: list[Run] = []
    reasons: dict[str, str] = {}
    for kind in plugin.treats:
        ctx = world.context(kind, name)
        if ctx is None:
            reasons[kind] = "no scenario of this kind in the common world"
            continue
        ok, why = plugin.applicable(ctx)
        if not ok:
            reasons[kind] = why
            continue
        before = _snapshot(ctx.bundle)
        first = plugin.apply(ctx)
        second = get_intervention(name).apply(ctx)
        runs.append(Run(kind, ctx, before, first, second))
        if not type(plugin).classifier_only:
            break  # one backbone training per plugin keeps the suite fast
    _RUNS[name] = (runs, reasons)
    return runs, reasons


def _runs(name: str, world: World) -> list[Run]:
    runs, reasons = runs_of(name, world)
    if not runs:
        pytest.fail(f"{name} was applicable to none of the scenarios of the kinds it treats: {reasons}")
    return runs


def test_every_builtin_is_available():
    assert set(BUILTINS) <= set(PLUGINS)
    assert all(BUILTINS[name] is available_interventions()[name] for name in BUILTINS)


@pytest.mark.parametrize("name", PLUGINS)
def test_plugin_declares_its_contract(name):
    cls = available_interventions()[name]
    assert issubclass(cls, Intervention) and not inspect.isabstract(cls), cls
    assert cls.name == name, f"{cls.__name__} is available as {name!r} but calls itself {cls.name!r}"
    assert cls.treats and set(cls.treats) <= set(ACTIONABLE_KINDS), cls.treats
    assert isinstance(cls.expected_time_s, (int, float)) and cls.expected_time_s > 0
    assert isinstance(cls.classifier_only, bool)
    # Its own strict parameter model, with a default for every field.
    assert issubclass(cls.Params, InterventionParams) and cls.Params is not InterventionParams
    assert cls.Params.model_config["extra"] == "forbid" and cls.Params.model_config["strict"]
    defaults = cls.read_params({})
    assert cls.read_params(defaults.model_dump()) == defaults


@pytest.mark.parametrize("name", PLUGINS)
def test_the_policy_validates_its_parameters_with_the_plugins_model(name):
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"name": "x", "params": {name: {"no_such_parameter": 1}}}, source="p.yaml")
    fields = ", ".join(available_interventions()[name].Params.model_fields)
    assert str(info.value) == (f"p.yaml: ==> At key: params ==> At key: {name} ==> At key: no_such_parameter: "
                               f"unknown key (expected one of: {fields})")


@pytest.mark.parametrize("name", PLUGINS)
def test_input_bundle_is_not_mutated(name, world):
    for run in _runs(name, world):
        state, meta, content = _snapshot(run.ctx.bundle)
        assert state == run.before[0], f"{name} changed its input's weights ({run.kind})"
        assert meta == run.before[1], f"{name} changed its input's metadata ({run.kind})"
        assert content == run.before[2]
        assert run.first.bundle.model is not run.ctx.bundle.model


@pytest.mark.parametrize("name", PLUGINS)
def test_deterministic_under_a_seed(name, world):
    for run in _runs(name, world):
        a, b = run.first.bundle, run.second.bundle
        assert a.weights_hash() == b.weights_hash(), f"{name} gave different weights twice ({run.kind})"
        assert a.meta.thresholds == b.meta.thresholds
        assert a.meta.history == b.meta.history
        assert json.dumps(run.first.changes, sort_keys=True) == json.dumps(run.second.changes, sort_keys=True)


@pytest.mark.parametrize("name", PLUGINS)
def test_records_parent_hash_and_extends_history(name, world):
    for run in _runs(name, world):
        meta = run.first.bundle.meta
        assert meta.parent_hash == run.before[2], f"{name} did not record its input's content hash ({run.kind})"
        old = run.ctx.bundle.meta.history
        assert len(meta.history) > len(old) and meta.history[: len(old)] == old
        json.dumps(meta.history[len(old):], allow_nan=False)
        assert meta.labels == run.ctx.bundle.meta.labels
        assert len(meta.thresholds) == len(meta.labels)
        assert all(0.0 < t < 1.0 for t in meta.thresholds)


@pytest.mark.parametrize("name", PLUGINS)
def test_changes_and_fit_metrics_are_json(name, world):
    for run in _runs(name, world):
        json.dumps(run.first.changes, allow_nan=False, sort_keys=True)
        json.dumps(run.first.fit_metrics, allow_nan=False, sort_keys=True)
        assert run.first.wall_time_s > 0


@pytest.mark.parametrize("name", PLUGINS)
def test_classifier_only_plugins_leave_the_backbone_bit_identical(name, world):
    cls = available_interventions()[name]
    for run in _runs(name, world):
        if cls.classifier_only:
            assert run.first.classifier_only, f"{name} declares classifier_only but its result does not"
        if not run.first.classifier_only:
            continue
        old, new = run.ctx.bundle.model.state_dict(), run.first.bundle.model.state_dict()
        assert old.keys() == new.keys()
        for key in old:
            if not key.startswith("classifier."):
                assert torch.equal(old[key], new[key]), f"{name} changed backbone tensor {key} ({run.kind})"


@pytest.mark.parametrize("name", PLUGINS)
def test_result_bundle_saves_and_loads(name, world, tmp_path):
    run = _runs(name, world)[0]
    path = tmp_path / "treated.safetensors"
    digest = save_bundle(run.first.bundle, path)
    loaded = load_bundle(path)
    assert digest == run.first.bundle.content_hash() == loaded.content_hash()


@pytest.mark.parametrize("name", PLUGINS)
def test_refuses_kinds_it_does_not_treat(name, world):
    plugin = get_intervention(name)
    kind = next(k for k in FACT_KINDS if k not in plugin.treats)
    ctx = world.context("fp_cluster", name)
    ctx = TreatmentContext(bundle=ctx.bundle, fact=IssueFact(kind=kind, monitor="m", label="Effusion",
                                                             severity="low", message="x"),
                           fit=ctx.fit, fit_dataset=ctx.fit_dataset, params=ctx.params)
    ok, why = plugin.applicable(ctx)
    assert not ok and isinstance(why, str) and why
    with pytest.raises(InterventionError):
        plugin.apply(ctx)


@pytest.mark.parametrize("name", PLUGINS)
def test_refuses_unknown_policy_parameters(name, world):
    run = _runs(name, world)[0]
    ctx = world.context(run.kind, name, params={**run.ctx.params, "no_such_parameter": 1})
    plugin = get_intervention(name)
    ok, why = plugin.applicable(ctx)
    if ok:
        with pytest.raises(InterventionError, match="no_such_parameter"):
            plugin.apply(ctx)
    else:
        assert "no_such_parameter" in why
