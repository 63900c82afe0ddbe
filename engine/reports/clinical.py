"""The per-image clinical report as one self-contained HTML page (markup only).

The findings and their evidence are computed by :func:`model.explain.evidence.explain_image`
(the report's JSON), the figures drawn by :mod:`engine.reports.clinical_figures`; this module
arranges them on a page (every figure an embedded PNG, nothing fetched) and writes
``<image stem>.json`` and ``<image stem>.html``. The page supports a clinician's reading and is
not a diagnosis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.storage import atomic_write_json, atomic_write_text
from engine.reports.clinical_figures import REGION_COLOURS, clinical_figures
from engine.reports.correction_html import clinical_correction_section, corrections_for_image
from engine.reports.html import CLINICAL_REPORT_CSS, esc, page
from model.bundle import Bundle
from model.explain.channels import LabelStats
from model.explain.evidence import EXCLUSIVE_JACCARD, explain_image
from model.explain.gradcam import REGION_NAMES

__all__ = ["build_report", "render_report_html", "write_report"]


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
    evidence = explain_image(bundle, image_path, top_channels=top_channels, label_stats=label_stats,
                             model_path=model_path)
    report = evidence.report
    # a correction this image's report made to the model (its history records every changed weight)
    report["corrections"] = corrections_for_image(bundle.meta.history, Path(image_path).name)
    return report, clinical_figures(evidence)


# --------------------------------------------------------------------------------------------
# HTML, one function per section of the page


def _bar(p: float, thr: float) -> str:
    return (f'<span class="bar" title="probability {p:.3f}, threshold {thr:.3f}"><span style="width:{p * 100:.1f}%">'
            f'</span><i style="left:{thr * 100:.1f}%"></i></span>')


def _header(report: dict[str, Any]) -> list[str]:
    img, model = report["image"], report["model"]
    return [f"<h1>Chest X-ray model report: {esc(img['name'])}</h1>",
            f"<div class='muted'>generated {esc(report['generated_at'])} · image sha256 {esc(img['sha256'][:16])}… · "
            f"{img['original_size'][0]}×{img['original_size'][1]} px ({esc(img['mode'])}) · model "
            f"{esc(model['arch'])} at {model['input_size']} px, bundle {esc(model['content_hash'][:16])}…</div>",
            f"<p class='disc'>{esc(report['disclaimer'])}</p>"]


def _summary_section(report: dict[str, Any]) -> list[str]:
    out = ["<h2 id='summary'>Summary</h2>"]
    pos = [f for f in report["findings"] if f["positive"]]
    if pos:
        items = []
        for f in pos:
            cls = "bord" if f["confidence"] == "borderline" else "pos"
            flag = " — <b>unlikely</b> (see notes)" if f["unlikely"] else ""
            items.append(f"<li><span class='{cls}'>{esc(f['label'])}</span>: p = {f['probability']:.3f} "
                         f"(threshold {f['threshold']:.3f}, {f['confidence']}){flag}</li>")
        out.append("<ul>" + "".join(items) + "</ul>")
    else:
        out.append("<p>No label is above its operating threshold.</p>")
    return out


def _findings_section(report: dict[str, Any]) -> list[str]:
    out = ["<h2 id='findings'>Findings at the operating thresholds</h2><table><tr><th class='l'>label</th>"
           "<th>probability</th><th>threshold</th><th class='l'></th><th>margin (log-odds)</th>"
           "<th class='l'>status</th></tr>"]
    for f in report["findings"]:
        status = ("absent" if not f["positive"] else f["confidence"] + (" · unlikely" if f["unlikely"] else ""))
        cls = "" if not f["positive"] else ("bord" if f["confidence"] == "borderline" else "pos")
        out.append(f"<tr><td class='l {cls}'>{esc(f['label'])}</td><td>{f['probability']:.3f}</td>"
                   f"<td>{f['threshold']:.3f}</td><td class='l'>{_bar(f['probability'], f['threshold'])}</td>"
                   f"<td>{f['margin']:+.2f}</td><td class='l'>{esc(status)}</td></tr>")
    out.append("</table>")
    d = report["definitions"]
    out.append(f"<p class='muted'>Thresholds: {esc(report['model']['threshold_source'])}. Confident: "
               f"{esc(d['confident'])}; borderline: {esc(d['borderline'])}; margin = {esc(d['margin'])}.</p>")
    return out


def _exclusivity_section(report: dict[str, Any]) -> list[str]:
    out = ["<h2 id='exclusivity'>Mutual-exclusivity notes</h2>"]
    if report["exclusivity_notes"]:
        for n in report["exclusivity_notes"]:
            out.append(f"<div class='note'>{esc(n['text'])}<br><span class='muted'>label statistics: "
                       f"{esc(n['source'])}</span></div>")
    else:
        out.append(f"<p>None: no borderline finding has label Jaccard &lt; {EXCLUSIVE_JACCARD} with a confident "
                   f"finding.</p>")
    out.append(f"<p class='muted'>Label statistics: {esc(report['label_statistics']['source'])}.</p>")
    return out


def _finding_evidence(report: dict[str, Any], name: str, h: dict[str, Any], fig: str | None) -> list[str]:
    """One explained label: its heat map, the regions' shares of heat and the channels behind the logit."""
    ev = report["channel_evidence"][name]
    out = [f"<h3>{esc(name)} <span class='muted'>({esc(h['reason'])})</span></h3>"]
    if fig:
        out.append(f"<div class='fig'><img width='777' alt='Grad-CAM heat map for {esc(name)}' src='{fig}'><div class='legend'>"
                   "left: image; right: Grad-CAM heat (blue low → red high, scaled to this map's peak) with region "
                   "outlines (colours as in <a href='#regions'>Anatomical regions</a>)</div></div>")
    if h.get("note"):
        out.append(f"<div class='note'>{esc(h['note'])}</div>")
    fm = h["feature_map_size"]
    out.append(f"<p class='muted'>Heat computed on a {fm[0]}×{fm[1]} feature map and upsampled; regions: "
               f"{esc(report['regions']['method'])}.</p>")
    if any(v > 0 for v in h["region_shares"].values()):
        out.append("<table><tr><th class='l'>region</th><th>share of heat</th></tr>")
        for region, share in sorted(h["region_shares"].items(), key=lambda kv: -kv[1]):
            if share >= 0.005:
                out.append(f"<tr><td class='l'>{esc(region)}</td><td>{share:.1%}</td></tr>")
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
                   f"<td>{row['contribution']:+.4f}</td><td>{share}</td><td class='l'>{esc(against)}</td></tr>")
    out.append("</table>")
    return out


def _evidence_section(report: dict[str, Any], figures: dict[str, str]) -> list[str]:
    out = ["<h2 id='evidence'>Evidence per finding</h2>"]
    for name, h in report["gradcam"].items():
        out += _finding_evidence(report, name, h, figures.get(f"gradcam:{name}"))
    return out


def _regions_section(report: dict[str, Any], figures: dict[str, str]) -> list[str]:
    r = report["regions"]
    legend = "".join(
        f"<div><span class='sw' style='background:rgb{REGION_COLOURS[i]}'></span>{esc(n)}</div>"
        for i, n in enumerate(REGION_NAMES[:-1]))
    out = ["<h2 id='regions'>Anatomical regions</h2>",
           f"<div class='fig'><img width='384' alt='anatomical regions' src='{figures['regions']}'><div class='legend'>"
           f"{legend}</div></div>",
           f"<p>Method: {esc(r['method'])}. {esc(r['convention'])} (R marks the patient's right).</p>"]
    if r["note"]:
        out.append(f"<div class='note'>{esc(r['note'])}</div>")
    return out


def _method_section(report: dict[str, Any]) -> list[str]:
    out = ["<h2 id='method'>Method</h2><table class='kv'>"]
    for k, v in report["definitions"].items():
        out.append(f"<tr><th class='l'>{esc(k)}</th><td>{esc(v)}</td></tr>")
    # str(): a report built without a model path names the model file "None"
    out.append(f"<tr><th class='l'>model file</th><td>{esc(str(report['model']['path']))}</td></tr>")
    out.append(f"<tr><th class='l'>image file</th><td>{esc(report['image']['path'])}</td></tr></table>")
    return out


def render_report_html(report: dict[str, Any], figures: dict[str, str]) -> str:
    """One self-contained HTML page for a report from :func:`build_report`."""
    body = [*_header(report), *_summary_section(report), *_findings_section(report), *_exclusivity_section(report),
            *clinical_correction_section(report.get("corrections") or [], report["image"]["name"]),
            *_evidence_section(report, figures), *_regions_section(report, figures), *_method_section(report)]
    return page(f"Report {esc(report['image']['name'])}", CLINICAL_REPORT_CSS, body)


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
