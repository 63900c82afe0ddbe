"""Per-image clinical evidence: findings at the operating thresholds, and the evidence behind them.

For one radiograph and one bundle the report states, per label, the probability against the
bundle's operating threshold; for every positive finding the classifier channels that carried it
(contribution ``w_kc * f_c``, where ``f_c`` is the pooled feature -- the logit is exactly their
sum plus the bias) and a Grad-CAM heat map mapped to anatomical regions; and it marks a
borderline finding as unlikely when its label practically never co-occurs with a confidently
present one in the NIH population (label Jaccard < 0.01, from the shipped NIH statistics).

Definitions (also written into every report):

* margin = ``logit(p) - logit(threshold)``: distance from the operating point in log-odds.
* confident = margin >= 1 (odds at least e times the threshold odds); borderline = 0 <= margin < 1.

This module computes the report's JSON (for systems) and keeps what its figures are drawn from;
the figures and the self-contained HTML page (for people) are drawn by
:mod:`engine.reports.clinical_figures` and :mod:`engine.reports.clinical`. The report supports a
clinician's reading and is not a diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.errors import BundleError, DataError
from engine.core.storage import sha256_bytes
from model.bundle import Bundle
from model.data import read_image
from model.explain.channels import LabelStats, polarized_channels, shipped_label_stats
from model.explain.gradcam import REGION_NAMES, RegionMap, grad_cam, locate_regions, region_shares, upsample_map
from model.features import to_model_input

__all__ = [
    "CONFIDENT_MARGIN",
    "EXCLUSIVE_JACCARD",
    "DISPLAY_SIZE",
    "DISCLAIMER",
    "ImageEvidence",
    "check_bundle",
    "explain_image",
]

#: Log-odds margin above the threshold from which a finding counts as confidently present.
CONFIDENT_MARGIN = 1.0
#: Label Jaccard below which two labels are treated as practically exclusive.
EXCLUSIVE_JACCARD = 0.01
#: Resolution at which regions are located and overlays are drawn.
DISPLAY_SIZE = 256

DISCLAIMER = ("Decision support for a qualified reader, not a diagnosis. Probabilities come from a machine-learning "
              "model and are only as good as its validation on data like this image.")


@dataclass(frozen=True)
class ImageEvidence:
    """What :func:`explain_image` found: the report's JSON, and what its figures are drawn from."""

    #: The report as JSON data (what ``cli.py report`` writes as ``<image>.json``).
    report: dict[str, Any]
    #: The image in [0, 1] at ``DISPLAY_SIZE`` px, on which regions were located.
    display: np.ndarray
    regions: RegionMap
    #: Grad-CAM heat per explained label, upsampled to ``DISPLAY_SIZE``, in report order.
    heat_maps: dict[str, np.ndarray]


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def check_bundle(bundle: Bundle, where: str = "model") -> None:
    """Refuse a bundle whose head does not match its own labels/thresholds (clear BundleError)."""
    head = getattr(bundle.model, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or not hasattr(bundle.model, "features"):
        raise BundleError(f"{where}: model has no DenseNet-style '.features' + linear '.classifier'; "
                          "cannot attribute its outputs")
    n_labels, n_thr, n_out = len(bundle.meta.labels), len(bundle.meta.thresholds), head.out_features
    if not n_labels == n_thr == n_out:
        raise BundleError(f"{where}: classifier has {n_out} outputs but the bundle lists {n_labels} labels and "
                          f"{n_thr} thresholds; expected one of each per output")


# --------------------------------------------------------------------------------------------
# Computation, in named steps


def _forward(bundle: Bundle, image: np.ndarray, targets: list[int], where: str):
    x = to_model_input(image[None], bundle.meta)
    device = next(bundle.model.parameters()).device
    try:
        return grad_cam(bundle.model, x.to(device), targets)
    except RuntimeError as exc:
        raise BundleError(f"{where}: the model cannot run on a {bundle.meta.input_size}-px input with "
                          f"{bundle.meta.in_channels} channel(s) ({exc})") from exc


def _channel_evidence(weight: np.ndarray, bias: float, pooled: np.ndarray, k: int, top: int,
                      labels: Sequence[str], polar: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    contrib = weight[k] * pooled
    order = np.argsort(-contrib, kind="stable")
    positive_total = float(contrib[contrib > 0].sum())
    rows = []
    for c in order[:top]:
        if contrib[c] <= 0:
            break
        pos, neg = polar.get(int(c), (np.array([], int), np.array([], int)))
        rows.append({
            "channel": int(c),
            "weight": float(weight[k, c]),
            "activation": float(pooled[c]),
            "contribution": float(contrib[c]),
            "share_of_positive_evidence": float(contrib[c] / positive_total) if positive_total > 0 else None,
            "polarized": int(c) in polar,
            "also_against": [labels[i] for i in neg if i != k] if int(c) in polar else [],
        })
    return {
        "logit": float(contrib.sum() + bias),
        "bias": float(bias),
        "sum_of_contributions": float(contrib.sum()),
        "positive_evidence": positive_total,
        "negative_evidence": float(contrib[contrib < 0].sum()),
        "top_channels": rows,
    }


def _exclusivity_notes(findings: list[dict[str, Any]], stats: LabelStats) -> list[dict[str, Any]]:
    confident = [f for f in findings if f["confidence"] == "confident"]
    notes = []
    for f in findings:
        if f["confidence"] != "borderline":
            continue
        for other in confident:
            j = stats.pair_jaccard(f["label"], other["label"])
            if j is None or j >= EXCLUSIVE_JACCARD:
                continue
            i, k = stats.index(f["label"]), stats.index(other["label"])
            both = int(stats.cooccurrence[i, k])
            notes.append({
                "finding": f["label"],
                "confident_finding": other["label"],
                "jaccard": j,
                "images_with_both": both,
                "source": stats.source,
                "text": (f"{f['label']} is borderline (p = {f['probability']:.3f}, threshold {f['threshold']:.3f}) "
                         f"while {other['label']} is confidently present (p = {other['probability']:.3f}); the two "
                         f"labels almost never co-occur (label Jaccard {j:.4f}, {both} of {stats.n_images:,} images "
                         f"with both). {f['label']} is marked unlikely."),
            })
    return notes


def _image_info(image_path: Path) -> dict[str, Any]:
    from PIL import Image

    raw = image_path.read_bytes()
    with Image.open(image_path) as im:
        original_size, mode = list(im.size), im.mode
    return {"path": str(image_path), "name": image_path.name, "sha256": sha256_bytes(raw),
            "original_size": original_size, "mode": mode}


def _model_info(bundle: Bundle, model_path: str | Path | None) -> dict[str, Any]:
    meta = bundle.meta
    return {"path": str(model_path) if model_path else None, "content_hash": bundle.content_hash(),
            "arch": meta.arch, "input_size": meta.input_size, "tool_version": meta.tool_version,
            "threshold_source": "bundle operating thresholds (Youden J on the training hold-out unless "
                                "changed by a later treatment)"}


def _findings(labels: Sequence[str], probs: np.ndarray, logits: np.ndarray,
              thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Every label's probability against its threshold, with margin and confidence."""
    findings = []
    for k, name in enumerate(labels):
        p, thr = float(probs[k]), float(thresholds[k])
        margin = _logit(p) - _logit(thr)
        positive = p >= thr
        findings.append({
            "label": name, "probability": p, "threshold": thr, "logit": float(logits[k]), "margin": margin,
            "positive": bool(positive),
            "confidence": ("confident" if margin >= CONFIDENT_MARGIN else "borderline") if positive else "absent",
            "unlikely": False,
        })
    return findings


def _targets(positives: list[int], probs: np.ndarray, thresholds: Sequence[float]) -> tuple[list[int], dict[int, str]]:
    """The labels to explain, most probable first, and why: every positive finding, or else the
    one closest to its threshold."""
    if positives:
        targets = sorted(positives, key=lambda k: -probs[k])
        return targets, {k: "positive finding" for k in targets}
    top = int(np.argmax(probs - np.asarray(thresholds)))
    return [top], {top: "closest to its threshold (no positive finding)"}


def _head(bundle: Bundle, n_labels: int) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The classifier's weight and bias (float64) and its polarized channels."""
    head = bundle.model.classifier
    weight = head.weight.detach().cpu().double().numpy()
    bias = head.bias.detach().cpu().double().numpy() if head.bias is not None else np.zeros(n_labels)
    polar = {c: (pi, ni) for c, pi, ni, _ in polarized_channels(weight)[0]} if n_labels >= 2 else {}
    return weight, bias, polar


def _heat_entry(cam: np.ndarray, up: np.ndarray, regions: RegionMap, reason: str) -> dict[str, Any]:
    """One label's Grad-CAM map and the share of its heat in each region."""
    shares = region_shares(up, regions)
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return {
        "reason": reason,
        "feature_map_size": list(cam.shape),
        "max_raw": float(cam.max()),
        "region_shares": shares,
        "top_regions": [r for r, v in ranked if v > 0][:3],
        "feature_map": np.round(cam, 6).tolist(),
        "note": None if cam.max() > 0 else (
            "no location carries positive evidence for this label (the Grad-CAM map is zero everywhere): the "
            "score rests on the classifier's bias and threshold, not on a localised image finding"),
    }


def _report_json(image: dict[str, Any], model: dict[str, Any], findings: list[dict[str, Any]],
                 positive_findings: list[str], notes: list[dict[str, Any]], evidence: dict[str, Any],
                 heat: dict[str, Any], regions: RegionMap, stats: LabelStats) -> dict[str, Any]:
    return {
        "report": "cxr-triage clinical report",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "image": image,
        "model": model,
        "findings": findings,
        "positive_findings": positive_findings,
        "exclusivity_notes": notes,
        "channel_evidence": evidence,
        "gradcam": heat,
        "regions": {"method": regions.method, "note": regions.note, "names": list(REGION_NAMES),
                    "convention": "NIH display convention: the patient's right is on the image's left",
                    "resolution": DISPLAY_SIZE},
        "label_statistics": stats.describe(),
        "definitions": {
            "margin": "logit(p) - logit(threshold)",
            "confident": f"margin >= {CONFIDENT_MARGIN}",
            "borderline": f"0 <= margin < {CONFIDENT_MARGIN}",
            "unlikely": f"borderline and label Jaccard < {EXCLUSIVE_JACCARD} with a confident finding",
            "contribution": "w_kc * f_c: classifier weight times the channel's pooled feature; "
                            "logit = sum of contributions + bias",
            "gradcam": "Grad-CAM on relu(model.features(x)), the classifier's input map; positive part, "
                       "bilinearly upsampled; region share = heat in region / total heat",
        },
    }


def explain_image(
    bundle: Bundle,
    image_path: str | Path,
    *,
    top_channels: int = 5,
    label_stats: LabelStats | None = None,
    model_path: str | Path | None = None,
) -> ImageEvidence:
    """Analyse one image: the report's JSON and what its figures are drawn from.

    Raises :class:`DataError` for an unreadable image and :class:`BundleError` for a model whose
    head does not match its labels or that cannot run at its own input size.
    """
    image_path = Path(image_path)
    where = str(model_path or "model")
    if top_channels < 1:
        raise ValueError(f"The 'top_channels' parameter must be >= 1. Got {top_channels!r} instead.")
    check_bundle(bundle, where)
    if not image_path.is_file():
        raise DataError(f"{image_path}: image file does not exist")
    meta = bundle.meta
    model_input = read_image(image_path, meta.input_size)
    display = read_image(image_path, DISPLAY_SIZE)
    image = _image_info(image_path)

    stats = label_stats or shipped_label_stats()
    labels = list(meta.labels)
    # One backbone pass; a Grad-CAM map per label costs one gradient through the head only.
    logits, pooled, cams = _forward(bundle, model_input, list(range(len(labels))), where)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    findings = _findings(labels, probs, logits, meta.thresholds)
    notes = _exclusivity_notes(findings, stats)
    for note in notes:
        next(f for f in findings if f["label"] == note["finding"])["unlikely"] = True

    positives = [k for k, f in enumerate(findings) if f["positive"]]
    targets, why = _targets(positives, probs, meta.thresholds)
    regions = locate_regions(display)
    weight, bias, polar = _head(bundle, len(labels))
    evidence, heat, heat_maps = {}, {}, {}
    for k in targets:
        name = labels[k]
        heat_maps[name] = upsample_map(cams[k], DISPLAY_SIZE)
        heat[name] = _heat_entry(cams[k], heat_maps[name], regions, why[k])
        evidence[name] = _channel_evidence(weight, float(bias[k]), pooled.astype(np.float64), k, top_channels, labels, polar)

    report = _report_json(image, _model_info(bundle, model_path), findings, [labels[k] for k in positives], notes,
                          evidence, heat, regions, stats)
    return ImageEvidence(report, display, regions, heat_maps)
