"""The correction section of bench/RESULTS.md (kept apart: render_results.py is near its size limit).

Per model: the reported-false-positive corrections at k = 5 and k = 10 channels (median Δprob, how
many crossed below the threshold, true positives lost on fit and verify, median AUROC change, the
slowest correction) beside the paper's figures, and the attribution atomicity of parent and −50 %
compressed model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["section_correct"]

DASH = "—"


def _f(v: Any, spec: str) -> str:
    return DASH if not isinstance(v, (int, float)) else format(v, spec)


def section_correct(data: dict[str, Any]) -> list[str]:
    paper = data.get("paper") or {}
    lines = [f"Paper: Δprob {paper.get('delta_prob_k5', DASH)} with {paper.get('channels', 5)} channels, "
             f"{paper.get('tp_lost', 0)} true positives lost. Each image is one report, corrected alone "
             "(`interventions.zeroing_reported.correct_reported`, what `cli.py correct` applies); false positives and TPs "
             "lost on the test split, the attribution baseline (the label's TPs) and fit TPs lost on train_val.", ""]
    lines += ["| model | k | images | median Δprob | crossed | TPs lost fit / test | median AUROC change "
              "| slowest (s) | paper |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in (data.get("datasets") or {}).items():
        s = d.get("summary") or {}
        for k in (5, 10):
            r = s.get(f"k{k}") or {}
            ref = f"Δprob {paper.get('delta_prob_k5')}, 0 TP lost" if k == 5 else DASH
            lines.append(f"| {name} | {k} | {r.get('n', DASH)} ({s.get('n_labels', DASH)} labels) | "
                         f"{_f(r.get('median_delta_prob'), '+.3f')} | {r.get('crossed', DASH)}/{r.get('n', DASH)} | "
                         f"{r.get('tp_lost_fit', DASH)} / {r.get('tp_lost_test', DASH)} | "
                         f"{_f(r.get('median_auroc_change'), '+.4f')} | {_f(r.get('max_wall_time_s'), '.2f')} | {ref} |")
    lines += ["", "Attribution atomicity: median share of an image's positive evidence (against the label's fit "
              "TPs) carried by its top channels.", "",
              "| model | parameters parent → −50 % | top-5 parent | top-5 compressed | top-10 parent | "
              "top-10 compressed | compressed k=5 median Δprob |", "|---|---|---|---|---|---|---|"]
    for name, d in (data.get("datasets") or {}).items():
        s, p = d.get("summary") or {}, d.get("parameters") or {}
        lines.append(f"| {name} | {_f(p.get('parent'), ',')} → {_f(p.get('compressed'), ',')} | "
                     f"{_f(s.get('share_top5_parent'), '.1%')} | {_f(s.get('share_top5_compressed'), '.1%')} | "
                     f"{_f(s.get('share_top10_parent'), '.1%')} | {_f(s.get('share_top10_compressed'), '.1%')} | "
                     f"{_f(s.get('compressed_k5_median_delta_prob'), '+.3f')} |")
    if data.get("note"):
        lines += ["", f"Note: {data['note']}."]
    return lines
