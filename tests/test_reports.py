"""Grad-CAM, anatomical regions, the per-image clinical report and the regulator's run report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from cli import main
from engine.audit import AuditStore
from engine.core.errors import BundleError, DataError
from engine.reports.run_report import collect_run, render_run_report
from engine.core.storage import atomic_write_json, sha256_file
from model.bundle import new_bundle, save_bundle
from engine.reports.clinical import build_report, render_report_html, write_report
from model.explain.gradcam import REGION_NAMES, grad_cam, locate_regions, region_shares, upsample_map
from model.labels import CHEXNET_LABELS
from model.data.phantom import render_phantom
from model.nets import arch_config, build_model

from conftest import NIH_FULLRES

SIZE = 128


def _tiny_bundle(input_size: int = 64, seed: int = 0, **meta):
    torch.manual_seed(seed)
    config = arch_config("tiny")
    return new_bundle(build_model("densenet", config), config=config, input_size=input_size, **meta)


def _png(path: Path, pixels: np.ndarray, mode: str = "L") -> Path:
    Image.fromarray(pixels.astype(np.uint8), mode="L").convert(mode).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# Grad-CAM


def test_grad_cam_is_cam_for_a_pooled_linear_head() -> None:
    """On relu(features) with GAP + linear, Grad-CAM = relu(sum_c w_kc A_c) / HW exactly."""
    bundle = _tiny_bundle()
    model = bundle.model
    model.train()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits, pooled, cams = grad_cam(model, x, list(range(14)))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated on the weights
    model.eval()
    with torch.no_grad():
        a = F.relu(model.features(x))[0]
        w = model.classifier.weight.detach()
        expected_logits = model.classifier(a.mean(dim=(1, 2)))
    assert np.allclose(logits, expected_logits.numpy(), atol=1e-5)
    assert np.allclose(pooled, a.mean(dim=(1, 2)).numpy(), atol=1e-6)
    hw = a.shape[1] * a.shape[2]
    for k in range(14):
        cam = F.relu(torch.einsum("c,chw->hw", w[k], a)).numpy() / hw
        assert np.allclose(cams[k], cam, atol=1e-6)
    with pytest.raises(ValueError, match="outside the model's 14 outputs"):
        grad_cam(model, x, [14])


# ------------------------------------------------------------------------------------------------
# Regions


def _gt_lungs(mask: np.ndarray) -> list[np.ndarray]:
    """The two ground-truth lung fields of a phantom, image-left (patient's right) first."""
    lab, n = ndimage.label(mask > 0.5)
    sizes = ndimage.sum(mask > 0.5, lab, range(1, n + 1))
    comps = [lab == i + 1 for i in np.argsort(-sizes)[:2]]
    return sorted(comps, key=lambda m: np.argwhere(m)[:, 1].mean())


def test_lung_fields_located_on_phantoms_and_shares_sum_to_one() -> None:
    for seed in range(3):
        img, masks = render_phantom(np.zeros(14, int), SIZE, np.random.default_rng(seed), return_masks=True)
        regions = locate_regions(img / 255.0)
        assert regions.method == "segmented lung fields" and regions.note is None
        # Disjoint cover of the image.
        stack = np.stack([regions.masks[n] for n in REGION_NAMES])
        assert (stack.sum(axis=0) == 1).all()
        ours = np.logical_or.reduce([regions.masks[n] for n in REGION_NAMES if "zone" in n or "costo" in n])
        gt = masks["lungs"] > 0.5
        assert (ours & gt).sum() / (ours | gt).sum() > 0.6
        # The image-left lung is the patient's right one.
        right = np.logical_or.reduce([regions.masks[f"right {z} zone"] for z in ("upper", "middle", "lower")])
        assert np.argwhere(right)[:, 1].mean() < SIZE / 2
        shares = region_shares(np.random.default_rng(seed).random((SIZE, SIZE)), regions)
        assert math.isclose(sum(shares.values()), 1.0)


def test_unsegmentable_image_falls_back_to_a_grid_with_a_note() -> None:
    regions = locate_regions(np.full((SIZE, SIZE), 0.5))
    assert regions.method == "fixed grid" and "lung segmentation failed" in regions.note
    assert math.isclose(sum(region_shares(np.ones((SIZE, SIZE)), regions).values()), 1.0)


class _Difference(nn.Module):
    """|x - reference| pooled to a 16x16 map: the heat is exactly where the image changed."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("reference", reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d((x[:, :1] - self.reference).abs(), 8)


class _LesionModel(nn.Module):
    def __init__(self, reference: torch.Tensor, k: int) -> None:
        super().__init__()
        self.features = nn.Sequential(_Difference(reference))
        self.classifier = nn.Linear(1, 14)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            self.classifier.weight[k, 0] = 1.0


def _planted(side: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A phantom with a Mass well inside one zone of the ``side`` lung (by the phantom's own masks)."""
    k = CHEXNET_LABELS.index("Mass")
    vec = np.zeros(14, int)
    vec[k] = 1
    for seed in range(60):
        img, masks = render_phantom(vec, SIZE, np.random.default_rng(seed), return_masks=True)
        lesion = masks["Mass"] > 0.5
        if not lesion.any() or (lesion & (masks["heart"] > 0.5)).any():
            continue
        r, c = np.argwhere(lesion).mean(axis=0).round().astype(int)
        lungs = _gt_lungs(masks["lungs"])
        lung = lungs[0 if side == "right" else 1]
        if not lung[r, c]:
            continue
        rows = np.flatnonzero(lung.any(axis=1))
        z = (r - rows[0]) / (rows[-1] + 1 - rows[0]) * 3
        if min(abs(z - b) for b in (0, 1, 2, 3)) < 0.3:
            continue  # too close to a zone border to call
        zone = f"{side} {('upper', 'middle', 'lower')[int(z)]} zone"
        reference = render_phantom(np.zeros(14, int), SIZE, np.random.default_rng(seed))
        return img, reference, zone
    raise AssertionError("no phantom with a clearly placed lesion in 60 seeds")


@pytest.mark.parametrize("side", ["right", "left"])
def test_grad_cam_heat_lands_in_the_zone_of_a_planted_lesion(side: str) -> None:
    img, reference, zone = _planted(side)
    k = CHEXNET_LABELS.index("Mass")
    model = _LesionModel(torch.from_numpy(reference / 255.0).float()[None, None], k)
    x = torch.from_numpy(img / 255.0).float()[None, None].expand(1, 3, SIZE, SIZE)
    _, _, cams = grad_cam(model, x, [k])
    regions = locate_regions(img / 255.0)
    assert regions.method == "segmented lung fields"
    shares = region_shares(upsample_map(cams[k], SIZE), regions)
    assert max(shares, key=shares.get) == zone, shares
    same_side = sum(v for name, v in shares.items() if name.startswith(side))
    assert same_side > 0.5, shares  # and the lesion's lung holds most of the heat


# ------------------------------------------------------------------------------------------------
# Clinical report


def _biased_bundle(probs: dict[str, float], thresholds: dict[str, float] | None = None):
    """A bundle whose outputs are fixed by the classifier bias (zero weights): known probabilities."""
    bundle = _tiny_bundle(thresholds=[(thresholds or {}).get(n, 0.5) for n in CHEXNET_LABELS])
    with torch.no_grad():
        bundle.model.classifier.weight.zero_()
        for i, name in enumerate(CHEXNET_LABELS):
            p = probs.get(name, 0.05)
            bundle.model.classifier.bias[i] = math.log(p / (1 - p))
    return bundle


def test_borderline_finding_exclusive_with_a_confident_one_is_marked_unlikely(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png", np.random.default_rng(0).integers(0, 255, (80, 80)))
    bundle = _biased_bundle({"Cardiomegaly": 0.95, "Hernia": 0.55, "Effusion": 0.55, "Edema": 0.6})
    report, _ = build_report(bundle, image)
    f = {x["label"]: x for x in report["findings"]}
    assert f["Cardiomegaly"]["confidence"] == "confident"
    assert f["Hernia"]["confidence"] == "borderline" and f["Hernia"]["unlikely"]
    # Effusion co-occurs with Cardiomegaly (J ~ 0.07): borderline but not unlikely.
    assert f["Effusion"]["confidence"] == "borderline" and not f["Effusion"]["unlikely"]
    (note,) = report["exclusivity_notes"]
    assert note["finding"] == "Hernia" and note["confident_finding"] == "Cardiomegaly"
    assert note["jaccard"] == pytest.approx(0.0023, abs=5e-5) and note["images_with_both"] == 7
    assert "112,120" in note["source"]
    # Without a confident partner no note: Cardiomegaly only borderline now.
    report, _ = build_report(_biased_bundle({"Cardiomegaly": 0.6, "Hernia": 0.55}), image)
    assert report["exclusivity_notes"] == []


def test_report_json_and_html_hold_every_section(tmp_path: Path) -> None:
    pixels = render_phantom(np.zeros(14, int), 200, np.random.default_rng(0))
    image = _png(tmp_path / "rgba.png", pixels, mode="RGBA")  # any size and mode
    bundle = _tiny_bundle(seed=2, thresholds=[0.3] * 14)
    json_path, html_path, report = write_report(bundle, image, tmp_path / "out", top_channels=3)
    stored = json.loads(json_path.read_text())
    for key in ("image", "model", "findings", "positive_findings", "exclusivity_notes", "channel_evidence",
                "gradcam", "regions", "label_statistics", "definitions", "disclaimer"):
        assert key in stored, key
    assert stored["image"]["mode"] == "RGBA" and stored["image"]["original_size"] == [200, 200]
    assert len(stored["findings"]) == 14 and stored["positive_findings"]
    for name in stored["positive_findings"]:
        ev = stored["channel_evidence"][name]
        f = next(x for x in stored["findings"] if x["label"] == name)
        # The logit is exactly the channel contributions plus the bias.
        assert ev["logit"] == pytest.approx(f["logit"], abs=1e-4)
        assert ev["sum_of_contributions"] + ev["bias"] == pytest.approx(f["logit"], abs=1e-4)
        assert 1 <= len(ev["top_channels"]) <= 3
        contribs = [c["contribution"] for c in ev["top_channels"]]
        assert contribs == sorted(contribs, reverse=True)
        shares = stored["gradcam"][name]["region_shares"]
        assert set(shares) == set(REGION_NAMES)
        assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-6) or not any(shares.values())
    html = html_path.read_text()
    for anchor in ("id='summary'", "id='findings'", "id='exclusivity'", "id='evidence'", "id='regions'", "id='method'"):
        assert anchor in html, anchor
    assert html.count("src='data:image/png;base64,") >= 2  # regions + at least one heat map
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_report_without_positive_findings_still_shows_one_heatmap(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png", np.random.default_rng(1).integers(0, 255, (64, 64)))
    report, figures = build_report(_biased_bundle({}), image)
    assert report["positive_findings"] == []
    (name,) = report["gradcam"]
    assert "no positive finding" in report["gradcam"][name]["reason"]
    assert f"gradcam:{name}" in figures
    assert "No label is above its operating threshold" in render_report_html(report, figures)


def test_corrupt_image_and_mismatched_model_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="bad.png: cannot decode image"):
        build_report(_tiny_bundle(), bad)
    image = _png(tmp_path / "ok.png", np.zeros((32, 32)))
    config = arch_config("tiny", num_classes=13)
    wrong_head = new_bundle(build_model("densenet", config), config=config, input_size=64, labels=list(CHEXNET_LABELS),
                            thresholds=[0.5] * 14)
    with pytest.raises(BundleError, match="13 outputs but the bundle lists 14 labels"):
        build_report(wrong_head, image)
    with pytest.raises(BundleError, match="cannot run on a 8-px input"):
        build_report(_tiny_bundle(input_size=8), image)
    # Through the CLI: exit status 1, no traceback.
    path = tmp_path / "m.safetensors"
    save_bundle(_tiny_bundle(), path)
    assert main(["report", "--model", str(path), "--image", str(bad), "--out", str(tmp_path / "r")]) == 1


@pytest.mark.skipif(not (NIH_FULLRES / "images" / "00000013_003.png").is_file(), reason="nih_fullres not present")
def test_cli_report_on_a_real_full_resolution_image(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_bundle(_tiny_bundle(thresholds=[0.2] * 14), path)
    image = NIH_FULLRES / "images" / "00000013_003.png"
    assert main(["report", "--model", str(path), "--image", str(image), "--out", str(tmp_path / "rep")]) == 0
    html = (tmp_path / "rep" / "00000013_003.html").read_text()
    assert "Grad-CAM heat map for" in html
    stored = json.loads((tmp_path / "rep" / "00000013_003.json").read_text())
    assert stored["image"]["original_size"][0] >= 256


# ------------------------------------------------------------------------------------------------
# Regulator's run report


def _metrics(auroc: float, sens: float, spec: float, ece: float) -> dict:
    return {"n": 50, "positives": 10, "auroc": auroc, "ece": ece, "threshold": 0.4, "sensitivity": sens,
            "specificity": spec, "tp": int(10 * sens), "fp": int(40 * (1 - spec))}


def _fake_run(tmp_path: Path, *, scores: bool) -> tuple[Path, Path, str]:
    """A run recorded the way engine/loop.py records one (payload shapes copied from it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store_path = tmp_path / "audit.db"
    run_id = "abc123def4567890"
    fact = {"fact_id": "f1", "kind": "calibration_drift", "label": "Effusion", "monitor": "calibration_drift",
            "severity": "high", "message": "Effusion: calibration drifted (ECE 0.30 vs reference 0.05)",
            "measured": {"ece": 0.3}, "reference": {"ece": 0.05}, "threshold": {"calibration_drift.ece_increase": 0.05},
            "evidence": {}}
    cand = [{"fact_id": "f1", "kind": "calibration_drift", "label": "Effusion", "intervention": "temperature",
             "cost": 1.0, "expected_time_s": 1.0, "rule": "propose:calibration_drift:temperature",
             "reason": "always", "needs_approval": False},
            {"fact_id": "f1", "kind": "calibration_drift", "label": "Effusion", "intervention": "full_retrain",
             "cost": 10.0, "expected_time_s": 28800.0, "rule": "propose:calibration_drift:full_retrain",
             "reason": "always", "needs_approval": True}]
    before = {"Effusion": _metrics(0.80, 0.7, 0.6, 0.30), "Atelectasis": _metrics(0.70, 0.5, 0.7, 0.10)}
    after = {"Effusion": _metrics(0.80, 0.8, 0.55, 0.04), "Atelectasis": _metrics(0.70, 0.5, 0.7, 0.10)}
    verification = {"fact_id": "f1", "attempt": 1, "intervention": "temperature", "passed": True,
                    "checks": [{"name": "issue_gone", "value": 0, "limit": 0, "passed": True, "detail": "gone"},
                               {"name": "improvement_significant", "value": 0.2614, "limit": 0, "passed": True,
                                "detail": "ECE reduction", "low": 0.1042, "high": 0.3381, "level": 0.975, "n": 50,
                                "method": "paired_bootstrap", "reason": None, "candidate_k": 2},
                               {"name": "other_labels_noninferior", "value": None, "limit": -0.01, "passed": True,
                                "detail": "nothing to compare", "low": None, "high": None, "level": 0.95, "n": 50,
                                "method": "paired_bootstrap_mean", "reason": "no other label has both classes"}],
                    "before": before, "after": after, "acceptance": {"max_other_auroc_change": 0.01}}
    if scores:
        from safetensors.numpy import save_file

        rng = np.random.default_rng(0)
        y = (rng.random((50, 2)) < 0.3).astype(np.uint8)
        lb = (rng.normal(size=(50, 2)) + 1.5 * y).astype(np.float32)
        save_file({"labels": y, "logits_before": lb, "logits_after": (0.5 * lb).astype(np.float32)},
                  str(run_dir / "verify_scores.safetensors"),
                  metadata={"labels": json.dumps(["Effusion", "Atelectasis"])})
        verification["scores"] = {"file": "verify_scores.safetensors",
                                  "sha256": sha256_file(run_dir / "verify_scores.safetensors")}
    decision_path = atomic_write_json(run_dir / "decision.json", {"run_id": run_id, "remaining_facts": []})
    with AuditStore(store_path) as store:
        store.append(run_id, "run_started", {"policy": {"name": "default", "content_hash": "p" * 64},
                                             "model_hash": "a" * 64, "data_manifest_hash": "d" * 64, "n_images": 100,
                                             "split": "test", "seed": 0, "approve": [], "dry_run": False,
                                             "out_dir": str(run_dir), "tool_version": "0.1.0"})
        store.append(run_id, "facts", {"facts": [fact], "split": {"fit": {"n_images": 50}, "verify": {"n_images": 50}}})
        store.append(run_id, "decision", {"fact_id": "f1", "attempt": 1, "excluded": [], "candidates": cand,
                                          "chosen": cand[0], "rationale": "Chose temperature (cost 1): cheapest"})
        store.append(run_id, "intervention_applied", {"fact_id": "f1", "attempt": 1, "intervention": "temperature",
                                                      "status": "ok", "params": {}, "changes": {"T": 1.7},
                                                      "wall_time_s": 0.01, "classifier_only": True})
        store.append(run_id, "verification", verification)
        store.append(run_id, "outcome", {"fact_id": "f1", "attempt": 1, "intervention": "temperature",
                                         "outcome": "accepted"})
        store.append(run_id, "outcome", {"fact_id": "f1", "outcome": "treated", "intervention": "temperature",
                                         "rationale": "temperature passed every check"})
        store.append(run_id, "run_finished", {"status": "ok", "outcome": "treated", "exit_code": 0,
                                              "model_hash_before": "a" * 64, "model_hash_after": "b" * 64,
                                              "decision_sha256": sha256_file(decision_path), "wall_time_s": 1.0})
    return store_path, run_dir, run_id


def test_run_report_shows_candidates_metrics_and_integrity(tmp_path: Path) -> None:
    store_path, run_dir, run_id = _fake_run(tmp_path, scores=False)
    with AuditStore(store_path) as store:
        out = render_run_report(store, run_id, tmp_path / "r.html")
    html = out.read_text()
    for anchor in ("summary", "facts", "issues", "decisions", "outcome", "integrity", "limitations", "records"):
        assert f"id='{anchor}'" in html, anchor
    assert "propose:calibration_drift:temperature" in html and "★ chosen" in html and "full_retrain" in html
    assert "Chose temperature (cost 1): cheapest" in html
    # Statistical checks show their interval, level and method, or why they cannot be estimated.
    assert "0.2614 [0.1042, 0.3381]<br><small>97.5 % paired_bootstrap, candidate 2</small>" in html
    assert "cannot be estimated<br><small>no other label has both classes</small>" in html
    assert "audit chain intact" in html and "SHA-256 matches the audit record" in html
    assert html.count("src='data:image/png;base64,") == 3  # AUROC, ROC-space operating points, ECE
    assert "need per-image verify scores" in html  # the limitation is stated
    # A changed decision.json is reported, not trusted.
    (run_dir / "decision.json").write_text('{"run_id": "abc123def4567890", "remaining_facts": [], "x": 1}')
    with AuditStore(store_path) as store:
        info = collect_run(store, run_id)
    assert "does NOT match" in info["decision_check"]


def test_run_report_draws_curves_from_recorded_scores_and_cli(tmp_path: Path) -> None:
    store_path, run_dir, run_id = _fake_run(tmp_path, scores=True)
    assert main(["audit", "report", str(run_dir)]) == 0  # audit.db next to the run folder by default
    html = (run_dir / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 4  # + ROC curve and reliability diagram
    assert "SHA-256 matches the verification record" in html
    assert main(["audit", "report", run_id[:6], "--audit", str(store_path), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["audit", "report", run_id])  # neither a folder nor --audit
    assert exc.value.code == 2
