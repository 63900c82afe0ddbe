"""Surgical correction of a reported false positive (issue 18): reports → reported_fp facts → zeroing.

A tiny DenseNet on 32-px pattern images (conftest) is a real, working model: its false positives are
real, so the properties are measured, not planted — only the selection test uses synthetic numbers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli import main
from engine.core.errors import DataError
from engine.monitors.reported_fp import ReportedMonitor, read_reports, reports_from_args
from interventions.attribution import head_logits
from interventions.base import TreatmentContext
from interventions.registry import get_intervention
from interventions.zeroing_reported import select_reported_channels
from model.bundle import Bundle, load_bundle, save_bundle
from model.data import NIHDataset, load_nih_dataset, patient_disjoint_split
from model.features import FeatureSet, extract_features
from model.labels import CHEXNET_LABELS
from model.metrics import sigmoid

from conftest import pattern_bundle, write_pattern_dataset

LABEL = "Effusion"
POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, NIHDataset, Bundle, FeatureSet]:
    root = tmp_path_factory.mktemp("correct")
    data = write_pattern_dataset(root / "data", n=240)
    ds = load_nih_dataset(data, "all")
    bundle = pattern_bundle(ds)
    model = root / "m.safetensors"
    save_bundle(bundle, model)
    return root, model, ds, load_bundle(model), extract_features(load_bundle(model), ds, use_cache=False)


def _false_positives(bundle: Bundle, fs: FeatureSet, label: str) -> list[str]:
    """The label's false positives, most confident first."""
    k = bundle.labels.index(label)
    p = sigmoid(fs.logits[:, k].astype(np.float64))
    fp = np.flatnonzero((p >= bundle.meta.thresholds[k]) & (fs.labels[:, CHEXNET_LABELS.index(label)] == 0))
    return [fs.image_names[i] for i in fp[np.argsort(-p[fp], kind="stable")]]


def test_zeroing_a_reported_image_changes_only_its_rows_weights_and_bias(world) -> None:
    _, _, ds, bundle, fs = world
    k = bundle.labels.index(LABEL)
    fit_idx, _ = patient_disjoint_split(ds, 0.5, 0)
    fit = fs.subset(fit_idx)
    tp_fit = (sigmoid(fit.logits[:, k]) >= bundle.meta.thresholds[k]) & (fit.labels[:, CHEXNET_LABELS.index(LABEL)] == 1)
    image = _false_positives(bundle, fs, LABEL)[1]
    reports = reports_from_args([image], LABEL, ds, bundle.labels, "dr-a", "no effusion")
    (fact,) = ReportedMonitor(reports, bundle, fs)(bundle, fs)
    assert fact.kind == "reported_fp" and fact.actionable and fact.evidence["reports"][0]["reporter"] == "dr-a"
    row = np.array([fs.image_names.index(image)])
    cap = 3
    ctx = TreatmentContext(bundle=bundle, fact=fact, fit=fit, fit_dataset=ds.subset(fit_idx),
                           params={"max_channels": cap}, reported=fs.subset(row))
    result = get_intervention("zeroing").apply(ctx)
    new = result.bundle
    before, after = dict(bundle.model.state_dict()), dict(new.model.state_dict())
    for name, tensor in before.items():  # every other parameter is bit-identical
        if name not in ("classifier.weight", "classifier.bias"):
            assert torch.equal(tensor, after[name]), name
    w0, w1 = before["classifier.weight"], after["classifier.weight"]
    others = [j for j in range(len(bundle.labels)) if j != k]
    assert torch.equal(w0[others], w1[others]) and torch.equal(before["classifier.bias"][others],
                                                               after["classifier.bias"][others])
    changed = torch.nonzero(w0[k] != w1[k]).flatten().tolist()
    assert 1 <= len(changed) <= cap and changed == result.changes["channels"]
    assert torch.all(w1[k, changed] == 0)
    assert result.changes["old_values"] == pytest.approx(w0[k, changed].tolist())
    assert result.changes["bias_old"] != result.changes["bias_new"]
    # the other labels' logits on every image are bit-identical; the reported image's probability falls
    l0, l1 = head_logits(bundle, fs.features), head_logits(new, fs.features)
    assert np.array_equal(l0[:, others], l1[:, others])
    assert sigmoid(l1[row, k]) < sigmoid(l0[row, k])
    # no fit-split true positive drops below the threshold
    assert (sigmoid(head_logits(new, fit.features)[tp_fit, k]) >= bundle.meta.thresholds[k]).all()
    assert result.fit_metrics[LABEL]["tp_lost"] <= 0


def test_selection_takes_the_fewest_channels_and_spares_true_positives() -> None:
    # channel 0 would clear the image alone but is what the true positives stand on; 1 and 2 together do it
    contrib_r = np.array([[3.0, 1.5, 1.2, 0.1]])
    contrib_tp = np.array([[2.5, 0.0, -0.1, 0.0], [2.0, 0.1, 0.0, 0.0]])
    chosen, _, stop = select_reported_channels(contrib_r, np.array([2.0]), contrib_tp, np.array([1.0, 1.0]), 0.0,
                                               max_channels=10)
    assert sorted(chosen) == [1, 2] and "below" in stop
    capped, _, stop = select_reported_channels(contrib_r, np.array([2.0]), contrib_tp, np.array([1.0, 1.0]), 0.0,
                                               max_channels=1)
    assert capped == [1] and "max_channels" in stop  # the largest decrease the cap allows


@pytest.mark.parametrize("text, where", [
    ("image,label,reporter\nx.png,Effusion,a\n", "row 1: missing column(s) note"),
    ("image,label,reporter,note\nnope.png,Effusion,a,\n", "row 2: image 'nope.png' is not in the audited data"),
    ("image,label,reporter,note\n{img},Pneumonitis,a,\n", "row 2: unknown label 'Pneumonitis'"),
    ("image,label,reporter,note\n{img},Effusion,a,\n{img},Effusion,b,\n", "row 3: duplicate report"),
])
def test_bad_report_rows_are_errors_that_name_the_file_and_row(world, tmp_path: Path, text: str, where: str) -> None:
    _, _, ds, bundle, fs = world
    path = tmp_path / "reports.csv"
    path.write_text(text.format(img=_false_positives(bundle, fs, LABEL)[0]))
    with pytest.raises(DataError) as err:
        read_reports(path, ds, bundle.labels)
    assert str(err.value).startswith(f"{path}: ") and where in str(err.value)


def test_triage_reports_route_to_zeroing_and_the_reporter_reaches_the_audit(world, tmp_path: Path) -> None:
    root, model, _, bundle, fs = world
    image = _false_positives(bundle, fs, LABEL)[0]
    csv = tmp_path / "reports.csv"
    csv.write_text(f"image,label,reporter,note\n{image},{LABEL},dr-b,line artefact\n")
    out, audit = tmp_path / "run", tmp_path / "audit.db"
    code = main(["triage", "--model", str(model), "--data", str(root / "data"), "--policy", str(POLICY),
                 "--out", str(out), "--audit", str(audit), "--reports", str(csv)])
    assert code in (0, 3, 4)
    d = json.loads((out / "decision.json").read_text())
    (tr,) = [t for t in d["treatments"] if t["kind"] == "reported_fp"]
    assert tr["label"] == LABEL and tr["attempts"][0]["chosen"]["intervention"] == "zeroing"
    assert d["reports"][0]["reporter"] == "dr-b"
    with sqlite3.connect(audit) as db:
        payloads = " ".join(p for (p,) in db.execute("SELECT payload FROM records"))
    assert "dr-b" in payloads and "line artefact" in payloads


def test_correct_writes_a_bundle_where_only_the_labels_row_differs(world, tmp_path: Path) -> None:
    root, model, _, bundle, fs = world
    # a tolerant site policy (the tiny net's Effusion rests on few channels; the default's AUROC limit rejects)
    policy = yaml.safe_load(POLICY.read_text())
    policy["acceptance"]["max_other_auroc_change"] = 0.5
    path = tmp_path / "tolerant.yaml"
    path.write_text(yaml.safe_dump(policy))
    out = tmp_path / "c"
    images = _false_positives(bundle, fs, LABEL)
    code = main(["correct", "--model", str(model), "--data", str(root / "data"), "--image", images[1],
                 "--label", LABEL, "--max-channels", "10", "--policy", str(path), "--out", str(out)])
    d = json.loads((out / "decision.json").read_text())
    first = d["treatments"][0]["attempts"][0]
    checks = {c["name"]: c for c in first["verify"]["checks"]}
    (img,) = checks["reported_prob_fell"]["images"]
    assert img["image"] == images[1] and img["delta_prob"] < 0
    assert checks["fit_tp_lost"]["value"] <= 0 and checks["tp_lost"]["value"] <= 0
    assert checks["other_labels_logits_identical"]["passed"]
    assert code == 0 and d["outcome"] == "treated"
    new = load_bundle(out / "model.safetensors")
    k = bundle.labels.index(LABEL)
    a, b = dict(bundle.model.state_dict()), dict(new.model.state_dict())
    assert all(torch.equal(a[n], b[n]) for n in a if not n.startswith("classifier."))
    others = [j for j in range(len(bundle.labels)) if j != k]
    assert torch.equal(a["classifier.weight"][others], b["classifier.weight"][others])
    assert 1 <= int((a["classifier.weight"][k] != b["classifier.weight"][k]).sum()) <= 10
    # the regulator report and the clinical report of the corrected image show the correction
    ch = first["changes"]
    html = tmp_path / "run.html"
    assert main(["audit", "report", str(out), "--audit", str(tmp_path / "audit.db"), "--out", str(html)]) == 0
    text = html.read_text()
    for needle in ("Reported false positive", "cli", f"{ch['old_values'][0]:+.5f}", f"{ch['bias_new']:+.5f}",
                   f"{img['delta_prob']:+.4f}", "bit-identical"):
        assert needle in text, needle
    assert main(["report", "--model", str(out / "model.safetensors"), "--image", str(root / "data" / "images" / images[1]),
                 "--out", str(tmp_path / "clin")]) == 0
    clinical = (tmp_path / "clin" / f"{Path(images[1]).stem}.html").read_text()
    for needle in ("Correction of a reported false positive", f"{ch['old_values'][0]:+.5f}", f"{img['delta_prob']:+.4f}",
                   "Other labels unchanged: checked"):
        assert needle in clinical, needle


def test_a_rejected_correction_is_kept_for_review_and_not_deployed(world, tmp_path: Path) -> None:
    """Under the default policy the tiny net's zeroing is rejected (AUROC limit): the candidate stays in candidates/."""
    root, model, _, bundle, fs = world
    out = tmp_path / "c"
    image = _false_positives(bundle, fs, LABEL)[1]
    main(["correct", "--model", str(model), "--data", str(root / "data"), "--image", image, "--label", LABEL,
          "--policy", str(POLICY), "--out", str(out)])
    d = json.loads((out / "decision.json").read_text())
    first = d["treatments"][0]["attempts"][0]
    assert first["chosen"]["intervention"] == "zeroing" and first["result"] == "rejected"
    kept = first["candidate_file"]
    assert kept["deployed"] is False and not (out / "model.safetensors").exists()
    cand = load_bundle(out / kept["path"])
    k = bundle.labels.index(LABEL)
    a, b = dict(bundle.model.state_dict()), dict(cand.model.state_dict())
    assert [n for n in a if not torch.equal(a[n], b[n])] == ["classifier.weight", "classifier.bias"]
    rows = torch.nonzero((a["classifier.weight"] != b["classifier.weight"]).any(dim=1)).flatten().tolist()
    assert rows == [k] and int((a["classifier.bias"] != b["classifier.bias"]).sum()) == 1


def test_correct_help() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["correct", "--help"])
    assert exit_.value.code == 0


def test_correct_unknown_image_is_a_usage_error(world, tmp_path: Path) -> None:
    root, model, *_ = world
    code = main(["correct", "--model", str(model), "--data", str(root / "data"), "--image", "nope.png",
                 "--label", LABEL, "--out", str(tmp_path / "c")])
    assert code == 2
