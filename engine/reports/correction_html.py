"""How a correction of a reported false positive reads in the reports (regulator and clinical).

Both show the report row (image, label, reporter, note, CSV row), the zeroed channels with their old
weights, the bias change, each reported image's Δprob, and the statement that the other labels are
unchanged — with what it was checked on (the verification's ``other_labels_logits_identical`` check,
or in a bundle's history the intervention's own check on the fit split and the reported images),
never a claim the record does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.reports.html import esc, num

__all__ = ["corrections_for_image", "clinical_correction_section", "run_correction_html"]


def corrections_for_image(history: Sequence[dict[str, Any]], image: str) -> list[dict[str, Any]]:
    """The ``zero_classifier_weights`` steps of a bundle's history that answered a report of ``image``."""
    return [h for h in history if h.get("op") == "zero_classifier_weights" and h.get("reason") == "reported_fp"
            and any(r.get("image") == image for r in h.get("reported_images") or [])]


def _reports_table(reports: Sequence[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{esc(r.get('image'))}</td><td>{esc(r.get('label'))}</td><td>{esc(r.get('reporter'))}"
                   f"</td><td>{esc(r.get('note'))}</td><td>{esc(r.get('row') or 'command line')}</td></tr>"
                   for r in reports)
    return ("<table><tr><th>image</th><th>reported not</th><th>reporter</th><th>note</th><th>CSV row</th></tr>"
            + rows + "</table>")


def _weights_html(op: dict[str, Any]) -> list[str]:
    chans = op.get("channels") or []
    rows = "".join(f"<tr><td>{esc(c)}</td><td>{num(v, '+.5f')}</td><td>0</td></tr>"
                   for c, v in zip(chans, op.get("old_values") or [], strict=False))
    return [f"<p>{len(chans)} weight(s) of the {esc(op.get('label'))} classifier row (row {esc(op.get('row'))}) set "
            f"to zero; bias {num(op.get('bias_old'), '+.5f')} → {num(op.get('bias_new'), '+.5f')} "
            f"({esc(op.get('baseline'))}).</p>",
            "<table><tr><th>channel</th><th>old weight</th><th>new weight</th></tr>" + rows + "</table>"]


def _images_html(images: Sequence[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{esc(i.get('image'))}</td><td>{num(i.get('prob_before'), '.4f')}</td>"
        f"<td>{num(i.get('prob_after'), '.4f')}</td><td>{num(i.get('delta_prob'), '+.4f')}</td>"
        f"<td>{'yes' if i.get('crossed') else 'no'}</td></tr>" for i in images)
    return ("<table><tr><th>reported image</th><th>probability before</th><th>after</th><th>Δprob</th>"
            "<th>below the threshold</th></tr>" + rows + "</table>")


def run_correction_html(fact: dict[str, Any], applied: dict[str, Any] | None,
                        verification: dict[str, Any] | None) -> list[str]:
    """The regulator report's block for one attempt at a ``reported_fp`` fact."""
    out = ["<h5>Reported false positive</h5>", _reports_table((fact.get("evidence") or {}).get("reports") or [])]
    changes = (applied or {}).get("changes") or {}
    if changes.get("op") == "zero_classifier_weights":
        out += _weights_html(changes)
    checks = {c.get("name"): c for c in (verification or {}).get("checks", [])}
    if "reported_prob_fell" in checks:
        out.append(_images_html(checks["reported_prob_fell"].get("images") or []))
    if "fit_tp_lost" in checks or "tp_lost" in checks:
        out.append(f"<p>True positives lost: fit split {esc(checks.get('fit_tp_lost', {}).get('value'))}, verify "
                   f"split {esc(checks.get('tp_lost', {}).get('value'))}.</p>")
    same = checks.get("other_labels_logits_identical")
    if same:
        cls = "ok" if same.get("passed") else "bad"
        out.append(f"<p class='{cls}'>Other labels: {esc(same.get('detail'))}.</p>")
    return out


def clinical_correction_section(corrections: Sequence[dict[str, Any]], image: str) -> list[str]:
    """The clinical report's section for an image whose report corrected the model (empty when none)."""
    if not corrections:
        return []
    out = ["<h2 id='correction'>Correction of a reported false positive</h2>"]
    for op in corrections:
        out.append(_reports_table([r for r in op.get("reports") or [] if r.get("image") == image]
                                  or [{"image": image, "label": op.get("label")}]))
        out += _weights_html(op)
        out.append(_images_html([i for i in op.get("reported_images") or [] if i.get("image") == image]))
        same = op.get("other_labels_logits_identical") or {}
        if same.get("identical"):
            out.append(f"<p>Other labels unchanged: checked, their logits bit-identical on "
                       f"{esc(same.get('images_checked'))} images ({esc(same.get('on'))}) when the change was made; "
                       "the verification on the held-out split is in the run's regulator report.</p>")
    return out
