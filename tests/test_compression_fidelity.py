"""The compressed bundle's accepted fidelity, and the monitor that compares audits with it (issue 17).

A working tiny model (three learnable patterns, 32 px) is compressed by 30 %; its bundle carries
the fidelity measured on the calibration holdout. Fresh images of the same distribution must give
no ``compression_fidelity`` fact (and a triage that exits 0); a scanner shift, which moves the
activations off the calibration images so the re-fits' error grows, must give one that names the
criteria and carries accepted vs audited figures. A bundle without a record keeps the old absolute
bound (the lossless ideal).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import pattern_bundle, write_pattern_dataset

from cli import main
from engine.monitors import run_monitors
from engine.monitors.base import MonitorContext
from model.bundle import Bundle, load_bundle, save_bundle
from model.compression import CompressSettings, compress_bundle
from model.compression.accepted import (
    NOTE_KEY,
    FidelityRecord,
    accepted_fidelity,
    measure_fidelity,
)
from model.data import load_nih_dataset
from model.data.faults import inject_fault
from model.features import extract_features
from rules.policy.monitors import MonitorConfig

POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fidelity")
    calib = load_nih_dataset(write_pattern_dataset(root / "calib", n=240, seed=0))
    parent = pattern_bundle(calib)
    settings = CompressSettings(target_reduction=0.3, max_auroc_drop=None, max_flip_rate=None, views=2)
    comp = compress_bundle(parent, calib, settings,
                           speed=False).bundle
    clean = write_pattern_dataset(root / "clean", n=200, seed=5)
    inject_fault(clean, "scanner_shift", root / "shifted", seed=1)
    save_bundle(parent, root / "m.safetensors")
    save_bundle(comp, root / "mc.safetensors")
    return root, parent, comp, clean, root / "shifted"


def _facts(comp: Bundle, parent: Bundle, data: Path, config: MonitorConfig | None = None):
    ds = load_nih_dataset(data)
    fc, fp = extract_features(comp, ds, use_cache=False), extract_features(parent, ds, use_cache=False)
    facts = run_monitors(MonitorContext(comp, fc, parent=parent, parent_data=fp), config or MonitorConfig())
    return [f for f in facts if f.monitor == "compression_fidelity"], fc, fp


def test_the_record_is_measured_on_the_holdout_and_round_trips(world) -> None:
    root, parent, comp, _, _ = world
    record = accepted_fidelity(comp)
    assert record is not None and record.where.startswith("calibration holdout")
    assert record.n_images == 48 and set(record.per_label) == set(comp.labels)
    assert 0 < record.mean_abs_dlogit.low <= record.mean_abs_dlogit.estimate <= record.mean_abs_dlogit.high
    assert record.flip_rate.method == "wilson" and record.flip_rate.n == 48 * len(comp.labels)
    assert record.flip_rate.high > 0  # an upper bound even where no decision flipped
    loaded = load_bundle(root / "mc.safetensors")
    assert accepted_fidelity(loaded) == record
    assert FidelityRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert accepted_fidelity(parent) is None  # an uncompressed (or legacy) bundle has none


def test_a_clean_audit_of_its_own_distribution_gives_no_fact(world) -> None:
    _, parent, comp, clean, _ = world
    facts, fc, fp = _facts(comp, parent, clean)
    assert facts == []
    # ... although the model is not lossless there: the old absolute bound (1e-3) would have fired.
    assert np.abs(fc.logits - fp.logits).max() > 0.05


def test_a_scanner_shift_that_compression_amplifies_gives_a_fact(world) -> None:
    _, parent, comp, _, shifted = world
    facts, _, _ = _facts(comp, parent, shifted)
    assert [f.kind for f in facts] == ["compression_fidelity"]
    fact = facts[0]
    record = accepted_fidelity(comp)
    fired = {(c["criterion"], c["label"]) for c in fact.evidence["criteria"]}
    assert ("mean_logit_delta", None) in fired
    for c in fact.evidence["criteria"]:
        if "accepted" in c:  # beyond noise: the audited lower bound above the accepted upper bound
            assert c["audited"]["low"] > 1.25 * c["accepted"]["high"]
    assert fact.evidence["accepted"] == record.to_json()
    assert fact.evidence["audited"]["mean_abs_dlogit"]["low"] > record.mean_abs_dlogit.high
    assert fact.threshold == {"compression_fidelity.compare_to_accepted": True, "compression_fidelity.level": 0.95,
                              "compression_fidelity.min_ratio": 1.25}


def test_a_bundle_without_a_record_keeps_the_absolute_bound(world) -> None:
    _, parent, comp, clean, _ = world
    notes = dict(comp.meta.notes)
    notes["compression"] = {k: v for k, v in notes["compression"].items() if k != NOTE_KEY}
    legacy = comp.with_meta(notes=notes)
    assert accepted_fidelity(legacy) is None
    facts, _, _ = _facts(legacy, parent, clean)
    assert [f.kind for f in facts] == ["compression_fidelity"]
    assert facts[0].threshold == {"compression_fidelity.legacy_max_logit_delta": 1e-3}
    assert [c["criterion"] for c in facts[0].evidence["criteria"]] == ["max_logit_delta"]
    # An explicit policy bound applies with a record too.
    strict = MonitorConfig.model_validate({"compression_fidelity": {"max_logit_delta": 0.01}})
    facts, _, _ = _facts(comp, parent, clean, strict)
    assert facts[0].threshold == {"compression_fidelity.max_logit_delta": 0.01}


def test_measure_fidelity_counts_flips_per_label() -> None:
    """Synthetic logits: flips at the thresholds, per label and model-wide, with Wilson intervals."""
    rng = np.random.default_rng(0)
    labels = ["Atelectasis", "Effusion"]
    pz = rng.normal(0, 2, (400, 2))
    thr = np.full(2, 0.5)
    flipped = pz.copy()
    flipped[:40, 0] = -flipped[:40, 0]  # 40 of 800 decisions flip: 5 %
    audit = measure_fidelity(pz, flipped, thr, thr, labels, where="x")
    assert audit.flips == 40 and audit.flip_rate.low > 0.03
    assert audit.per_label["Atelectasis"].flip_rate.estimate == pytest.approx(0.1)
    assert audit.per_label["Effusion"].flips == 0 and audit.per_label["Effusion"].mean_abs_dlogit.high == 0.0


def test_monitor_policy_bound_and_min_images(world) -> None:
    _, parent, comp, clean, _ = world
    ds = load_nih_dataset(clean)
    fc, fp = extract_features(comp, ds, use_cache=False), extract_features(parent, ds, use_cache=False)
    # Flip 40 % of the compressed model's Effusion decisions (mirror the logit around the threshold).
    k = comp.labels.index("Effusion")
    z = fc.logits.copy()
    thr_logit = float(np.log(comp.meta.thresholds[k] / (1 - comp.meta.thresholds[k])))
    z[:80, k] = 2 * thr_logit - fp.logits[:80, k]
    bad = fc.with_logits(z)
    capped = MonitorConfig.model_validate({"compression_fidelity": {"max_flip_rate": 0.01}})
    facts = run_monitors(MonitorContext(comp, bad, parent=parent, parent_data=fp), capped)
    fact = next(f for f in facts if f.kind == "compression_fidelity")
    fired = {(c["criterion"], c["label"]) for c in fact.evidence["criteria"]}
    assert {("label_flip_rate", "Effusion"), ("flip_rate", None), ("policy_flip_rate", None)} <= fired
    assert fact.severity == "high" and fact.threshold["compression_fidelity.max_flip_rate"] == 0.01
    few = bad.subset(np.arange(10))
    facts = run_monitors(MonitorContext(comp, few, parent=parent, parent_data=fp), MonitorConfig())
    cannot = [f for f in facts if f.monitor == "compression_fidelity" and f.kind == "cannot_assess"]
    assert len(cannot) == 1 and "min_images (30)" in cannot[0].message


def test_triage_of_clean_data_exits_0_without_a_fidelity_fact(world) -> None:
    root, _, _, clean, _ = world
    out = root / "triage_clean"
    code = main(["triage", "--model", str(root / "mc.safetensors"), "--parent", str(root / "m.safetensors"),
                 "--data", str(clean), "--policy", str(POLICY), "--out", str(out)])
    decision = json.loads((out / "decision.json").read_text())
    kinds = [f["kind"] for f in decision["facts"]]
    assert "compression_fidelity" not in kinds and code == 0, (code, kinds)
