"""Per-image clinical report: findings at the operating thresholds, and the evidence behind them.

For one radiograph and one bundle the report states, per label, the probability against the
bundle's operating threshold; for every positive finding the classifier channels that carried it
(contribution ``w_kc * f_c``, where ``f_c`` is the pooled feature -- the logit is exactly their
sum plus the bias) and a Grad-CAM heat map mapped to anatomical regions; and it marks a
borderline finding as unlikely when its label practically never co-occurs with a confidently
present one in the NIH population (label Jaccard < 0.01, from the shipped NIH statistics).

Definitions (also written into every report):

* margin = ``logit(p) - logit(threshold)``: distance from the operating point in log-odds.
* confident = margin >= 1 (odds at least e times the threshold odds); borderline = 0 <= margin < 1.

The report is written as JSON (for systems) and as one self-contained HTML file (for people):
every figure is an embedded PNG, nothing is fetched. It supports a clinician's reading and is
not a diagnosis.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.errors import BundleError, DataError
from engine.core.storage import atomic_write_json, atomic_write_text, sha256_bytes
from model.bundle import Bundle
from model.explain.channels import LabelStats, polarized_channels, shipped_label_stats
from model.data import read_image
from model.features import to_model_input
from model.explain.gradcam import OUTSIDE, REGION_NAMES, RegionMap, grad_cam, locate_regions, region_shares, upsample_map

__all__ = [
    "CONFIDENT_MARGIN",
    "EXCLUSIVE_JACCARD",
    "DISPLAY_SIZE",
    "check_bundle",
    "build_report",
    "render_report_html",
    "write_report",
    "png_data_uri",
]

#: Log-odds margin above the threshold from which a finding counts as confidently present.
CONFIDENT_MARGIN = 1.0
#: Label Jaccard below which two labels are treated as practically exclusive.
EXCLUSIVE_JACCARD = 0.01
#: Resolution at which regions are located and overlays are drawn.
DISPLAY_SIZE = 256

DISCLAIMER = ("Decision support for a qualified reader, not a diagnosis. Probabilities come from a machine-learning "
              "model and are only as good as its validation on data like this image.")


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def png_data_uri(fig: Any) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is not kept)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
# Computation


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


def build_report(
    bundle: Bundle,
    image_path: str | Path,
    *,
    top_channels: int = 5,
    label_stats: LabelStats | None = None,
    model_path: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Analyse one image; returns ``(report JSON, {figure name: PNG data URI})``.

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
    raw = image_path.read_bytes()
    from PIL import Image

    with Image.open(image_path) as im:
        original_size, mode = list(im.size), im.mode

    stats = label_stats or shipped_label_stats()
    labels = list(meta.labels)
    # One backbone pass; a Grad-CAM map per label costs one gradient through the head only.
    logits, pooled, cams = _forward(bundle, model_input, list(range(len(labels))), where)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    findings = []
    for k, name in enumerate(labels):
        p, thr = float(probs[k]), float(meta.thresholds[k])
        margin = _logit(p) - _logit(thr)
        positive = p >= thr
        findings.append({
            "label": name, "probability": p, "threshold": thr, "logit": float(logits[k]), "margin": margin,
            "positive": bool(positive),
            "confidence": ("confident" if margin >= CONFIDENT_MARGIN else "borderline") if positive else "absent",
            "unlikely": False,
        })
    notes = _exclusivity_notes(findings, stats)
    for note in notes:
        next(f for f in findings if f["label"] == note["finding"])["unlikely"] = True

    positives = [k for k, f in enumerate(findings) if f["positive"]]
    if positives:
        targets = sorted(positives, key=lambda k: -probs[k])
        why = {k: "positive finding" for k in targets}
    else:
        top = int(np.argmax(probs - np.asarray(meta.thresholds)))
        targets, why = [top], {top: "closest to its threshold (no positive finding)"}

    regions = locate_regions(display)
    head = bundle.model.classifier
    weight = head.weight.detach().cpu().double().numpy()
    bias = head.bias.detach().cpu().double().numpy() if head.bias is not None else np.zeros(len(labels))
    polar = {c: (pi, ni) for c, pi, ni, _ in polarized_channels(weight)[0]} if len(labels) >= 2 else {}

    figures: dict[str, str] = {"regions": _regions_figure(display, regions)}
    evidence, heat = {}, {}
    for k in targets:
        name = labels[k]
        cam = cams[k]
        up = upsample_map(cam, DISPLAY_SIZE)
        shares = region_shares(up, regions)
        ranked = sorted(shares.items(), key=lambda kv: -kv[1])
        heat[name] = {
            "reason": why[k],
            "feature_map_size": list(cam.shape),
            "max_raw": float(cam.max()),
            "region_shares": shares,
            "top_regions": [r for r, v in ranked if v > 0][:3],
            "feature_map": np.round(cam, 6).tolist(),
            "note": None if cam.max() > 0 else (
                "no location carries positive evidence for this label (the Grad-CAM map is zero everywhere): the "
                "score rests on the classifier's bias and threshold, not on a localised image finding"),
        }
        evidence[name] = _channel_evidence(weight, float(bias[k]), pooled.astype(np.float64), k, top_channels, labels, polar)
        figures[f"gradcam:{name}"] = _overlay_figure(display, up, regions)

    report = {
        "report": "cxr-triage clinical report",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
        "image": {"path": str(image_path), "name": image_path.name, "sha256": sha256_bytes(raw),
                  "original_size": original_size, "mode": mode},
        "model": {"path": str(model_path) if model_path else None, "content_hash": bundle.content_hash(),
                  "arch": meta.arch, "input_size": meta.input_size, "tool_version": meta.tool_version,
                  "threshold_source": "bundle operating thresholds (Youden J on the training hold-out unless "
                                      "changed by a later treatment)"},
        "findings": findings,
        "positive_findings": [labels[k] for k in positives],
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
    return report, figures


# --------------------------------------------------------------------------------------------
# Figures: composed with numpy and saved with PIL (matplotlib figures cost ~0.3 s each here;
# the legends live in the HTML instead).

#: One colour per region (RGB 0..255), in REGION_NAMES order; the last (outside) is not drawn.
REGION_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 0, 0),
)


def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grey_rgb(display: np.ndarray) -> np.ndarray:
    return np.repeat((np.clip(display, 0, 1) * 255.0)[..., None], 3, axis=2)


def _outlines(rgb: np.ndarray, regions: RegionMap) -> np.ndarray:
    from scipy import ndimage

    out = rgb.copy()
    for i, name in enumerate(REGION_NAMES[:-1]):
        m = regions.masks[name]
        edge = m & ~ndimage.binary_erosion(m)
        out[edge] = REGION_COLOURS[i]
    return out


def _jet(x: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colours for values in [0, 1] (RGB 0..255)."""
    from matplotlib import colormaps

    return colormaps["jet"](np.clip(x, 0, 1))[..., :3] * 255.0


def _regions_figure(display: np.ndarray, regions: RegionMap) -> str:
    rgb = _grey_rgb(display)
    lab = regions.label_image()
    colours = np.asarray(REGION_COLOURS, dtype=np.float64)[lab]
    inside = lab != REGION_NAMES.index(OUTSIDE)
    rgb[inside] = 0.6 * rgb[inside] + 0.4 * colours[inside]
    return _png_uri(_outlines(rgb, regions))


def _overlay_figure(display: np.ndarray, heat: np.ndarray, regions: RegionMap) -> str:
    """Image and heat overlay side by side, region outlines on the overlay."""
    grey = _grey_rgb(display)
    peak = heat.max()
    norm = heat / peak if peak > 0 else np.zeros_like(heat)
    alpha = (0.15 + 0.5 * norm)[..., None] * (norm[..., None] > 0.02)
    over = (1 - alpha) * grey + alpha * _jet(norm)
    over = _outlines(over, regions)
    gap = np.full((grey.shape[0], 6, 3), 255.0)
    return _png_uri(np.concatenate([grey, gap, over], axis=1))


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:15px;margin-bottom:6px} table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:right} th{background:#f2f2f2}
td.l,th.l{text-align:left} .muted{color:#666;font-size:12px} .disc{background:#fff8e1;border:1px solid #f0d58c;
padding:8px;font-size:13px} .pos{color:#b00020;font-weight:600} .bord{color:#b26a00;font-weight:600}
.unl{text-decoration:line-through} .note{background:#eef5ff;border-left:4px solid #3b73c4;padding:6px 10px;margin:6px 0;
font-size:13px} .bar{position:relative;width:160px;height:10px;background:#eee;display:inline-block}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#5b8def} .bar i{position:absolute;top:-3px;bottom:-3px;
width:2px;background:#b00020} img{max-width:100%;image-rendering:auto} .kv td{text-align:left}
.fig{display:flex;gap:14px;align-items:flex-start;margin:6px 0} .fig img{border:1px solid #ccc}
.legend{font-size:12px;color:#333;max-width:300px} .legend div{margin:2px 0}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle;border:1px solid #888}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _bar(p: float, thr: float) -> str:
    return (f'<span class="bar" title="probability {p:.3f}, threshold {thr:.3f}"><span style="width:{p * 100:.1f}%">'
            f'</span><i style="left:{thr * 100:.1f}%"></i></span>')


def render_report_html(report: dict[str, Any], figures: dict[str, str]) -> str:
    """One self-contained HTML page for a report from :func:`build_report`."""
    img, model = report["image"], report["model"]
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report {_e(img['name'])}</title>"
           f"<style>{_CSS}</style></head><body>"]
    out.append(f"<h1>Chest X-ray model report: {_e(img['name'])}</h1>")
    out.append(f"<div class='muted'>generated {_e(report['generated_at'])} · image sha256 {_e(img['sha256'][:16])}… · "
               f"{img['original_size'][0]}×{img['original_size'][1]} px ({_e(img['mode'])}) · model "
               f"{_e(model['arch'])} at {model['input_size']} px, bundle {_e(model['content_hash'][:16])}…</div>")
    out.append(f"<p class='disc'>{_e(report['disclaimer'])}</p>")

    out.append("<h2 id='summary'>Summary</h2>")
    pos = [f for f in report["findings"] if f["positive"]]
    if pos:
        items = []
        for f in pos:
            cls = "bord" if f["confidence"] == "borderline" else "pos"
            flag = " — <b>unlikely</b> (see notes)" if f["unlikely"] else ""
            items.append(f"<li><span class='{cls}'>{_e(f['label'])}</span>: p = {f['probability']:.3f} "
                         f"(threshold {f['threshold']:.3f}, {f['confidence']}){flag}</li>")
        out.append("<ul>" + "".join(items) + "</ul>")
    else:
        out.append("<p>No label is above its operating threshold.</p>")

    out.append("<h2 id='findings'>Findings at the operating thresholds</h2><table><tr><th class='l'>label</th>"
               "<th>probability</th><th>threshold</th><th class='l'></th><th>margin (log-odds)</th>"
               "<th class='l'>status</th></tr>")
    for f in report["findings"]:
        status = ("absent" if not f["positive"] else f["confidence"] + (" · unlikely" if f["unlikely"] else ""))
        cls = "" if not f["positive"] else ("bord" if f["confidence"] == "borderline" else "pos")
        out.append(f"<tr><td class='l {cls}'>{_e(f['label'])}</td><td>{f['probability']:.3f}</td>"
                   f"<td>{f['threshold']:.3f}</td><td class='l'>{_bar(f['probability'], f['threshold'])}</td>"
                   f"<td>{f['margin']:+.2f}</td><td class='l'>{_e(status)}</td></tr>")
    out.append("</table>")
    d = report["definitions"]
    out.append(f"<p class='muted'>Thresholds: {_e(model['threshold_source'])}. Confident: {_e(d['confident'])}; "
               f"borderline: {_e(d['borderline'])}; margin = {_e(d['margin'])}.</p>")

    out.append("<h2 id='exclusivity'>Mutual-exclusivity notes</h2>")
    if report["exclusivity_notes"]:
        for n in report["exclusivity_notes"]:
            out.append(f"<div class='note'>{_e(n['text'])}<br><span class='muted'>label statistics: "
                       f"{_e(n['source'])}</span></div>")
    else:
        out.append(f"<p>None: no borderline finding has label Jaccard &lt; {EXCLUSIVE_JACCARD} with a confident "
                   f"finding.</p>")
    out.append(f"<p class='muted'>Label statistics: {_e(report['label_statistics']['source'])}.</p>")

    out.append("<h2 id='evidence'>Evidence per finding</h2>")
    for name, h in report["gradcam"].items():
        ev = report["channel_evidence"][name]
        out.append(f"<h3>{_e(name)} <span class='muted'>({_e(h['reason'])})</span></h3>")
        fig = figures.get(f"gradcam:{name}")
        if fig:
            out.append(f"<div class='fig'><img width='777' alt='Grad-CAM heat map for {_e(name)}' src='{fig}'><div class='legend'>"
                       "left: image; right: Grad-CAM heat (blue low → red high, scaled to this map's peak) with region "
                       "outlines (colours as in <a href='#regions'>Anatomical regions</a>)</div></div>")
        if h.get("note"):
            out.append(f"<div class='note'>{_e(h['note'])}</div>")
        fm = h["feature_map_size"]
        out.append(f"<p class='muted'>Heat computed on a {fm[0]}×{fm[1]} feature map and upsampled; regions: "
                   f"{_e(report['regions']['method'])}.</p>")
        if any(v > 0 for v in h["region_shares"].values()):
            out.append("<table><tr><th class='l'>region</th><th>share of heat</th></tr>")
            for region, share in sorted(h["region_shares"].items(), key=lambda kv: -kv[1]):
                if share >= 0.005:
                    out.append(f"<tr><td class='l'>{_e(region)}</td><td>{share:.1%}</td></tr>")
            out.append("</table>")
        out.append(f"<p>Channel evidence: logit {ev['logit']:+.3f} = contributions {ev['sum_of_contributions']:+.3f} "
                   f"(positive {ev['positive_evidence']:+.3f}, negative {ev['negative_evidence']:+.3f}) + bias "
                   f"{ev['bias']:+.3f}.</p>")
        out.append("<table><tr><th>channel</th><th>weight w</th><th>activation f</th><th>contribution w·f</th>"
                   "<th>share of positive evidence</th><th class='l'>polarized: also votes against</th></tr>")
        for row in ev["top_channels"]:
            share = "n/a" if row["share_of_positive_evidence"] is None else f"{row['share_of_positive_evidence']:.1%}"
            against = ", ".join(row["also_against"]) if row["polarized"] else "—"
            out.append(f"<tr><td>{row['channel']}</td><td>{row['weight']:+.4f}</td><td>{row['activation']:.4f}</td>"
                       f"<td>{row['contribution']:+.4f}</td><td>{share}</td><td class='l'>{_e(against)}</td></tr>")
        out.append("</table>")

    r = report["regions"]
    out.append("<h2 id='regions'>Anatomical regions</h2>")
    legend = "".join(
        f"<div><span class='sw' style='background:rgb{REGION_COLOURS[i]}'></span>{_e(n)}</div>"
        for i, n in enumerate(REGION_NAMES[:-1]))
    out.append(f"<div class='fig'><img width='384' alt='anatomical regions' src='{figures['regions']}'><div class='legend'>"
               f"{legend}</div></div>")
    out.append(f"<p>Method: {_e(r['method'])}. {_e(r['convention'])} (R marks the patient's right).</p>")
    if r["note"]:
        out.append(f"<div class='note'>{_e(r['note'])}</div>")

    out.append("<h2 id='method'>Method</h2><table class='kv'>")
    for k, v in d.items():
        out.append(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>")
    out.append(f"<tr><th class='l'>model file</th><td>{_e(model['path'])}</td></tr>")
    out.append(f"<tr><th class='l'>image file</th><td>{_e(img['path'])}</td></tr></table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    bundle: Bundle,
    image_path: str | Path,
    out_dir: str | Path,
    *,
    top_channels: int = 5,
    label_stats: LabelStats | None = None,
    model_path: str | Path | None = None,
) -> tuple[Path, Path, dict[str, Any]]:
    """Build and write ``<image stem>.json`` and ``<image stem>.html`` into ``out_dir`` (atomically)."""
    report, figures = build_report(bundle, image_path, top_channels=top_channels, label_stats=label_stats,
                                   model_path=model_path)
    out_dir = Path(out_dir)
    stem = Path(image_path).stem
    json_path = atomic_write_json(out_dir / f"{stem}.json", report)
    html_path = atomic_write_text(out_dir / f"{stem}.html", render_report_html(report, figures))
    return json_path, html_path, report
