"""The backtest's self-contained HTML: rates per fault kind with their intervals, the targets, every scenario.

Reads only the backtest document (``backtest.json``'s content): a rates table and a figure (heal
and harm rates with 95 % Wilson intervals per fault kind and contender), approved escalations, the
issue's targets with the figures they were judged on, and a per-scenario table linking each run's
``decision.json`` (relative to the report, which is written next to them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.reports.html import (
    BASE_CSS,
    RUN_REPORT_CSS,
    badge,
    esc,
    num,
    page,
    png_data_uri,
)

__all__ = ["rates_figure", "render_backtest_report"]

_COLOURS = ("#1565c0", "#2e7d32", "#6a1b9a", "#9e9e9e", "#ef6c00", "#c62828", "#00838f", "#5d4037")


def _rate_text(r: dict[str, Any] | None) -> str:
    if not r or r.get("n", 0) == 0:
        return "n/a"
    return f"{r['k']}/{r['n']} = {num(r['rate'], '.0%')} <span class='muted'>[{num(r['low'], '.0%')}, {num(r['high'], '.0%')}]</span>"


def rates_figure(summary: dict[str, Any], metric: str) -> str:
    """Grouped bars of ``metric`` (``healed`` / ``harmed``) per fault kind and contender, Wilson error bars."""
    from matplotlib.figure import Figure

    kinds = [k for k in summary["fault_kinds"] if any(summary["by_fault"][k][c].get(metric) for c in summary["contenders"])]
    names = summary["contenders"]
    fig = Figure(figsize=(max(5.0, 1.2 * len(kinds) + 2), 3.0), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, c in enumerate(names):
        vals, lo, hi = [], [], []
        for k in kinds:
            r = summary["by_fault"][k][c].get(metric)
            ok = bool(r) and r["n"] > 0
            vals.append(r["rate"] if ok else np.nan)
            lo.append(r["rate"] - r["low"] if ok else 0)
            hi.append(r["high"] - r["rate"] if ok else 0)
        x = np.arange(len(kinds)) + (i - (len(names) - 1) / 2) * width
        ax.bar(x, vals, width=width, color=_COLOURS[i % len(_COLOURS)], label=c, yerr=[lo, hi], capsize=2,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel(f"{metric} rate")
    ax.set_title(f"{metric} (95 % Wilson intervals)", fontsize=9)
    ax.legend(fontsize=7, ncols=min(5, len(names)), loc="upper center", frameon=False)
    return png_data_uri(fig)


def _rates_table(summary: dict[str, Any]) -> str:
    head = ("<tr><th class='l'>fault</th><th class='l'>contender</th><th>n</th><th>detected</th><th>changed</th>"
            "<th>escalated</th><th>healed</th><th>share of the fault's facts gone</th><th>harmed</th><th>false treatment</th>"
            "<th>heal - harm</th>"
            "<th>mean cost</th><th>median wall s</th></tr>")
    rows = []
    for k in summary["fault_kinds"]:
        for c in summary["contenders"]:
            r = summary["by_fault"][k][c]
            rows.append(f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(c)}</td><td>{r['n']}</td>"
                        + "".join(f"<td>{_rate_text(r.get(m))}</td>" for m in ("detected", "changed", "escalated", "healed"))
                        + f"<td>{num(r.get('mean_healed_share'), '.0%')}</td>"
                        + "".join(f"<td>{_rate_text(r.get(m))}</td>" for m in ("harmed", "false_treatment"))
                        + f"<td>{num(r['heal_minus_harm'], '+.2f')}</td><td>{num(r['mean_cost'], '.2f')}</td>"
                        f"<td>{num(r['median_wall_time_s'], '.1f')}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _approved_table(summary: dict[str, Any]) -> str:
    if not summary["approved"]:
        return "<p class='muted'>No run escalated to a human, so there was nothing to approve.</p>"
    rows = []
    for k, per in summary["approved"].items():
        for c, r in per.items():
            rows.append(f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(c)}</td><td class='l'>"
                        f"{esc(', '.join(r['approve']))}</td><td>{r['n']}</td><td>{_rate_text(r['changed'])}</td>"
                        f"<td>{_rate_text(r['healed'])}</td><td>{_rate_text(r['harmed'])}</td>"
                        f"<td>{num(r['median_wall_time_s'], '.1f')}</td></tr>")
    return ("<table><tr><th class='l'>fault</th><th class='l'>policy</th><th class='l'>approved</th><th>n</th>"
            "<th>changed</th><th>healed</th><th>harmed</th><th>median wall s</th></tr>" + "".join(rows) + "</table>")


def _targets(targets: list[dict[str, Any]]) -> str:
    parts = []
    for t in targets:
        items = "".join(
            f"<li>{badge('met', '#2e7d32') if c['met'] else badge('not met', '#c62828')} {esc(c['target'])}: "
            f"{num(c.get('value'), '.3f')}" + (f" (limit {num(c.get('limit'), '.3f')})" if "limit" in c else "")
            + "</li>" for c in t["checks"])
        parts.append(f"<h3>{esc(t['policy'])}</h3><ul>{items}</ul>")
    return "".join(parts)


def _scenario_rows(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        link = f"<a href='{esc(r['decision'])}'>decision.json</a>" if r.get("decision") else esc(r.get("note", ""))
        treated = ", ".join(f"{t['label'] or '-'}: {t['intervention']}" for t in r["treatments"]
                            if t["outcome"] == "treated") or "—"
        approved = r.get("approved")
        after_approval = ("" if not approved else
                          f"{esc(', '.join(approved['approve']))}: {'healed' if approved['healed'] else 'not healed'}"
                          f"{', HARMED' if approved['harmed'] else ''}")
        rows.append(
            f"<tr><td class='l'>{esc(r['scenario']['name'])}</td><td class='l'>{esc(r['contender'])}</td>"
            f"<td>{'yes' if r['detected'] else 'no'}</td><td class='l'>{esc(r.get('status', ''))}: {esc(r['outcome'])}</td>"
            f"<td class='l'>{esc(treated)}</td><td>{'—' if r['healed'] is None else ('yes' if r['healed'] else 'no')}</td>"
            f"<td>{'yes' if r['harmed'] else 'no'}</td><td class='l'>{esc('; '.join(r['harm_reasons'])[:300])}</td>"
            f"<td class='l'>{after_approval}</td><td>{link}</td></tr>")
    return ("<table><tr><th class='l'>scenario</th><th class='l'>contender</th><th>detected</th><th class='l'>outcome"
            "</th><th class='l'>accepted</th><th>healed</th><th>harmed</th><th class='l'>why harmed</th>"
            "<th class='l'>approved escalation</th><th>record</th></tr>" + "".join(rows) + "</table>")


def _errors(summary: dict[str, Any]) -> str:
    if not summary.get("errors"):
        return ""
    items = "".join(f"<li>{esc(e['scenario'])} / {esc(e['contender'])}: {esc(e['error'])}</li>" for e in summary["errors"])
    return f"<div class='note'>{len(summary['errors'])} run(s) could not run and are left out of the rates:<ul>{items}</ul></div>"


def render_backtest_report(doc: dict[str, Any]) -> str:
    """The report's HTML from the backtest document."""
    summary = doc["summary"]
    body = [
        "<h1>Backtest: are the decisions right on patients triage never saw?</h1>",
        (f"<p class='muted'>{len(doc['scenarios'])} scenario(s) x {len(summary['contenders'])} contender(s); "
        f"holdout part of each scenario untouched by triage. Tool {esc(doc['tool_version'])}.</p>"),
        "<h2>Definitions</h2><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>"
                                             for k, v in doc["definitions"].items()) + "</ul>",
        "<h2>Rates per fault kind (95 % Wilson intervals)</h2>", _rates_table(summary),
        (f"<div class='fig'><img alt='heal rates' src='{rates_figure(summary, 'healed')}'>"
        f"<img alt='harm rates' src='{rates_figure(summary, 'harmed')}'></div>"),
        "<h2>What approving an escalation buys</h2>", _approved_table(summary),
        "<h2>Targets</h2>", _targets(doc["targets"]),
        "<h2>Every scenario</h2>", _errors(summary), _scenario_rows([r for r in doc["results"] if not r.get("error")]),
    ]
    return page("cxr-triage backtest", BASE_CSS + RUN_REPORT_CSS, body)
