"""The run report's figures (matplotlib, Agg; Figure objects, no pyplot state), as PNG data URIs.

Drawn from what :func:`engine.reports.run_report.collect_run` gathered: a verification record's
per-label summary metrics give AUROC and ECE before/after and the operating points in ROC space;
per-image verify scores, when the record names a scores file that checked out, give the ROC
curve and reliability diagram of the treated label.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.reports.html import png_data_uri
from model.metrics import auroc, sigmoid

__all__ = ["verification_figures", "draw_run_figures"]


def _fig(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=90, layout="constrained")


def _metric(m: dict[str, Any], label: str, key: str) -> float | None:
    v = m.get(label, {}).get(key)
    return None if v is None else float(v)


def _auroc_figure(before: dict, after: dict, treated: str | None) -> str:
    labels = sorted(set(before) | set(after))
    fig = _fig(6.6, 0.28 * len(labels) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    b = [np.nan if _metric(before, x, "auroc") is None else _metric(before, x, "auroc") for x in labels]
    a = [np.nan if _metric(after, x, "auroc") is None else _metric(after, x, "auroc") for x in labels]
    ax.barh(y + 0.2, b, height=0.4, color="#9e9e9e", label="before")
    ax.barh(y - 0.2, a, height=0.4, color="#1565c0", label="after")
    ax.axvline(0.5, color="k", lw=0.6, ls=":")
    ax.set_yticks(y, [f"{x} ◀" if x == treated else x for x in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC on the verify split")
    ax.legend(fontsize=8, loc="lower right")
    return png_data_uri(fig)


def _roc_space_figure(before: dict, after: dict, treated: str | None) -> str:
    fig = _fig(4.4, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="k", lw=0.6, ls=":")
    for label in sorted(set(before) & set(after)):
        sb, pb = _metric(before, label, "sensitivity"), _metric(before, label, "specificity")
        sa, pa = _metric(after, label, "sensitivity"), _metric(after, label, "specificity")
        if None in (sb, pb, sa, pa):
            continue
        main = label == treated
        colour = "#c62828" if main else "#b0bec5"
        ax.annotate("", xy=(1 - pa, sa), xytext=(1 - pb, sb),
                    arrowprops=dict(arrowstyle="->", color=colour, lw=1.6 if main else 0.8))
        ax.plot([1 - pb], [sb], "o", mfc="none", color=colour, ms=6 if main else 4)
        ax.plot([1 - pa], [sa], "o", color=colour, ms=6 if main else 4)
        if main:
            ax.text(1 - pa + 0.02, sa - 0.05, label, fontsize=8, color=colour)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("operating points: ○ before → ● after", fontsize=9)
    return png_data_uri(fig)


def _ece_figure(before: dict, after: dict, treated: str | None) -> str:
    labels = sorted(set(before) | set(after))
    fig = _fig(6.6, 2.6)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    b = [np.nan if _metric(before, k, "ece") is None else _metric(before, k, "ece") for k in labels]
    a = [np.nan if _metric(after, k, "ece") is None else _metric(after, k, "ece") for k in labels]
    ax.bar(x - 0.2, b, width=0.4, color="#9e9e9e", label="before")
    ax.bar(x + 0.2, a, width=0.4, color="#1565c0", label="after")
    ax.set_xticks(x, [f"{k} ◀" if k == treated else k for k in labels], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ECE (10 bins)")
    ax.legend(fontsize=8)
    return png_data_uri(fig)


def _curves_figure(scores: dict[str, np.ndarray], label: str) -> str | None:
    names = list(scores["names"])
    if label not in names:
        return None
    k = names.index(label)
    y = scores["labels"][:, k].astype(int)
    if y.min() == y.max():
        return None
    fig = _fig(8.2, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for key, colour, name in (("logits_before", "#9e9e9e", "before"), ("logits_after", "#1565c0", "after")):
        p = sigmoid(scores[key][:, k].astype(np.float64))
        order = np.argsort(-p, kind="stable")
        tp = np.concatenate([[0], np.cumsum(y[order])]) / y.sum()
        fp = np.concatenate([[0], np.cumsum(1 - y[order])]) / (len(y) - y.sum())
        ax1.plot(fp, tp, color=colour, label=f"{name} (AUROC {auroc(y, p):.3f})")
        bins = np.clip((p * 10).astype(int), 0, 9)
        xs, ys, ns = [], [], []
        for b in range(10):
            m = bins == b
            if m.any():
                xs.append(p[m].mean())
                ys.append(y[m].mean())
                ns.append(m.sum())
        ax2.plot(xs, ys, "o-", color=colour, label=name, ms=4)
    ax1.plot([0, 1], [0, 1], "k:", lw=0.6)
    ax1.set_xlabel("1 − specificity")
    ax1.set_ylabel("sensitivity")
    ax1.set_title(f"ROC, {label}", fontsize=9)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.plot([0, 1], [0, 1], "k:", lw=0.6)
    ax2.set_xlabel("mean predicted probability")
    ax2.set_ylabel("observed frequency")
    ax2.set_title(f"reliability, {label}", fontsize=9)
    ax2.legend(fontsize=8)
    return png_data_uri(fig)


def verification_figures(before: dict, after: dict, label: str | None,
                         scores: dict[str, np.ndarray] | None) -> list[str]:
    """One verification's figures, in page order: the ROC curve and reliability diagram of ``label``
    first when per-image ``scores`` allow them, then AUROC, operating points and ECE before/after."""
    figs = [_auroc_figure(before, after, label), _roc_space_figure(before, after, label),
            _ece_figure(before, after, label)]
    if scores is not None and label:
        curve = _curves_figure(scores, label)
        if curve:
            figs.insert(0, curve)
    return figs


def draw_run_figures(info: dict[str, Any]) -> dict[tuple[str, int], list[str]]:
    """Every verification's figures, keyed by (fact id, attempt) as in ``info["scores"]``."""
    by_id = {x.get("fact_id"): x for x in info["facts"]}
    figures: dict[tuple[str, int], list[str]] = {}
    for fid in info["fact_order"]:
        label = by_id.get(fid, {}).get("label")
        for n, attempt in sorted(info["treatments"][fid]["attempts"].items()):
            v = attempt.get("verification")
            if not v or not (v.get("before", {}) and v.get("after", {})):
                continue
            scores = info["scores"][(fid, n)]["arrays"]
            figures[(fid, n)] = verification_figures(v["before"], v["after"], label, scores)
    return figures
