"""Regulator's HTML report of one triage run, rendered from the audit store (and ``decision.json``).

The audit records are the source of truth: every section below is built from the run's records
(``run_started``, ``facts``, ``decision``, ``approval``, ``intervention_applied``,
``verification``, ``outcome``, ``run_finished``), in sequence order. ``decision.json`` and the
treated bundle in the run folder are not trusted but *checked*: their SHA-256 must match what the
``run_finished`` record says. The chain itself is verified (:meth:`AuditStore.verify`) and its
status printed at the top.

Curves: a verification record holds per-label summary metrics (AUROC, ECE, the operating point),
from which the report draws AUROC and ECE before/after and the operating points in ROC space.
Full ROC curves and reliability diagrams need per-image scores of the verify split; when a
verification record names a scores file (``payload["scores"] = {"file": <relative to the run
folder>, "sha256": ...}``, a safetensors file with ``labels`` (N, K) uint8, ``logits_before`` and
``logits_after`` (N, K) float32 and a ``labels`` JSON list in its metadata) whose hash matches, they
are drawn from it; otherwise the report says what is missing.

The page is self-contained: figures are embedded PNGs, no script, nothing fetched.
"""

from __future__ import annotations

import argparse
import html
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import AuditError
from engine.core.storage import atomic_write_text, sha256_file

__all__ = ["collect_run", "render_run_report", "render_run_html", "add_report_subcommand"]

_SEVERITY_COLOUR = {"critical": "#8b0000", "high": "#c62828", "medium": "#ef6c00", "low": "#f9a825", "info": "#607d8b"}
_OUTCOME_COLOUR = {"treated": "#2e7d32", "healthy": "#2e7d32", "planned": "#1565c0", "needs_approval": "#ef6c00",
                   "untreated": "#c62828", "error": "#8b0000"}


# --------------------------------------------------------------------------------------------
# Gathering


def _as_dict(rec: Any) -> dict[str, Any]:
    return rec.to_dict() if hasattr(rec, "to_dict") else dict(rec)


def collect_run(store: Any, run_id: str, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the report shows about ``run_id``, grouped; raises AuditError if the run is unknown.

    The same deterministic run id is recorded again when a run is repeated; the latest instance
    (records from its last ``run_started``) is reported and the number of instances stated.
    """
    records = [_as_dict(r) for r in store.records(run_id)]
    if not records:
        raise AuditError(f"{getattr(store, 'path', 'audit store')}: no records for run {run_id!r}")
    starts = [i for i, r in enumerate(records) if r["kind"] == "run_started"]
    instance = records[starts[-1]:] if starts else records
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in instance:
        by_kind.setdefault(r["kind"], []).append(r)
    started = (by_kind.get("run_started") or [{}])[0].get("payload", {})
    finished = (by_kind.get("run_finished") or [{}])[-1].get("payload", {})
    facts_payload = (by_kind.get("facts") or [{}])[0].get("payload", {})

    # Per fact: its attempts (decision → approval → applied → verification → outcome) and final outcome.
    fact_order: list[str] = []
    treatments: dict[str, dict[str, Any]] = {}
    for r in instance:
        p = r["payload"]
        fid = p.get("fact_id")
        if fid is None or r["kind"] not in ("decision", "approval", "intervention_applied", "verification", "outcome"):
            continue
        if fid not in treatments:
            fact_order.append(fid)
            treatments[fid] = {"attempts": {}, "final": None}
        t = treatments[fid]
        if r["kind"] == "outcome" and "attempt" not in p:
            t["final"] = p
            continue
        attempt = t["attempts"].setdefault(int(p.get("attempt", 0)), {})
        key = r["kind"] if r["kind"] != "outcome" else "attempt_outcome"
        attempt[key] = p

    if run_dir is None and started.get("out_dir"):
        run_dir = started["out_dir"]
    run_dir = Path(run_dir) if run_dir else None
    decision, decision_check = None, "no run folder recorded"
    model_check = None
    if run_dir is not None:
        path = run_dir / "decision.json"
        if path.is_file():
            digest = sha256_file(path)
            expected = finished.get("decision_sha256")
            if expected is None:
                decision_check = f"{path}: present; the run_finished record holds no hash to compare"
            elif digest == expected:
                decision_check = f"{path}: SHA-256 matches the audit record ({digest[:16]}…)"
            else:
                decision_check = (f"{path}: SHA-256 {digest[:16]}… does NOT match the audit record "
                                  f"({str(expected)[:16]}…) — the file was changed or belongs to another run instance")
            try:
                decision = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                decision_check += f"; unreadable JSON ({exc})"
        else:
            decision_check = f"{path}: not found"
        model_path = finished.get("model_path")
        if model_path:
            mp = Path(model_path)
            if not mp.is_file():
                model_check = f"{mp}: treated bundle not found"
            else:
                digest = sha256_file(mp)
                ok = digest == finished.get("model_hash_after")
                model_check = (f"{mp}: SHA-256 {'matches' if ok else 'does NOT match'} the recorded model hash "
                               f"after treatment ({digest[:16]}…)")
    verify = store.verify()
    return {
        "run_id": run_id,
        "store_path": str(getattr(store, "path", "")),
        "records": instance,
        "n_instances": max(1, len(starts)),
        "started": started,
        "finished": finished,
        "facts": facts_payload.get("facts", []),
        "split": facts_payload.get("split", {}),
        "fact_order": fact_order,
        "treatments": treatments,
        "run_dir": str(run_dir) if run_dir else None,
        "decision": decision,
        "decision_check": decision_check,
        "model_check": model_check,
        "chain": {"ok": bool(verify.ok), "n_records": verify.n_records, "problems": list(verify.problems),
                  "head_seq": verify.head_seq, "head_hash": verify.head_hash},
    }


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg; Figure objects, no pyplot state)


def _fig(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=90, layout="constrained")


def _uri(fig: Any) -> str:
    from model.explain.evidence import png_data_uri

    return png_data_uri(fig)


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
    return _uri(fig)


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
    return _uri(fig)


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
    return _uri(fig)


def _load_scores(run_dir: str | None, spec: Any) -> tuple[dict[str, np.ndarray] | None, str]:
    """Per-image verify scores named by a verification record, checked against its hash."""
    if not isinstance(spec, dict) or not spec.get("file"):
        return None, "no per-image scores recorded"
    if run_dir is None:
        return None, "scores file named but the run folder is unknown"
    path = Path(run_dir) / str(spec["file"])
    if not path.resolve().is_relative_to(Path(run_dir).resolve()):
        return None, f"scores file {spec['file']!r} lies outside the run folder; ignored"
    if not path.is_file():
        return None, f"{path}: scores file not found"
    if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
        return None, f"{path}: SHA-256 does not match the verification record; not used"
    try:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        names = json.loads(meta.get("labels", "[]"))
    except Exception as exc:  # a damaged file must not stop the report
        return None, f"{path}: unreadable scores file ({type(exc).__name__}: {exc})"
    if not {"labels", "logits_before", "logits_after"} <= set(arrays):
        return None, f"{path}: expected tensors labels, logits_before, logits_after"
    arrays["names"] = np.asarray(names, dtype=object)
    return arrays, f"{path} (SHA-256 matches the verification record)"


def _curves_figure(scores: dict[str, np.ndarray], label: str) -> str | None:
    from model.metrics import auroc, sigmoid

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
    return _uri(fig)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b;max-width:1150px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:30px}
h3{font-size:15px;margin:18px 0 6px} h4{font-size:13px;margin:12px 0 4px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0} th,td{border:1px solid #d0d0d0;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f2f2f2} td.w{overflow-wrap:anywhere} td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;color:#fff;border-radius:3px;padding:1px 7px;font-size:12px;font-weight:600}
.muted{color:#666;font-size:12px} .ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600}
.box{border:1px solid #ccc;background:#fafafa;padding:8px 12px;margin:8px 0} code{font-size:12px}
tr.chosen td{background:#e8f5e9} tr.treated td{background:#fff8e1} details{margin:6px 0}
pre{background:#f6f6f6;padding:6px;font-size:11px;overflow-x:auto;max-height:420px}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} img{max-width:100%;border:1px solid #ddd}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return _e(x)


def _badge(text: str, colour: str) -> str:
    return f"<span class='badge' style='background:{colour}'>{_e(text)}</span>"


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _hash(h: Any) -> str:
    return "n/a" if not h else f"<code>{_e(h)}</code>"


def _val(v: Any) -> str:
    return _num(v, ".4g") if isinstance(v, (int, float)) and not isinstance(v, bool) else _e(v)


def _fact_row(f: dict[str, Any]) -> str:
    """One issue; measured/reference show the first 8 entries (the records appendix has all)."""
    measured = "<br>".join(f"{_e(k)} {_val(v)}" for k, v in list(f.get("measured", {}).items())[:8])
    ref = "<br>".join(f"{_e(k)} {_val(v)}" for k, v in list(f.get("reference", {}).items())[:8])
    thr = "<br>".join(f"{_e(k)} = {_val(v)}" for k, v in f.get("threshold", {}).items())
    sev = f.get("severity", "info")
    return (f"<tr><td>{_badge(sev, _SEVERITY_COLOUR.get(sev, '#607d8b'))}</td><td>{_e(f.get('kind'))}</td>"
            f"<td>{_e(f.get('label') or 'model')}</td><td>{_e(f.get('monitor'))}</td><td>{_e(f.get('message'))}</td>"
            f"<td class='muted w' style='max-width:230px'>{measured}</td><td class='muted w' style='max-width:200px'>{ref}</td>"
            f"<td class='muted w' style='max-width:150px'>{thr}</td>"
            f"<td><code style='font-size:10px'>{_e(f.get('fact_id'))}</code></td></tr>")


def _facts_table(facts: list[dict[str, Any]]) -> str:
    return ("<table><tr><th>severity</th><th>kind</th><th>label</th><th>monitor</th><th style='min-width:280px'>"
            "message</th><th>measured</th><th>reference</th><th>policy threshold fired</th><th>fact id</th></tr>"
            + "".join(_fact_row(x) for x in facts) + "</table>")


def _candidates_table(attempt: dict[str, Any]) -> str:
    d = attempt.get("decision", {})
    chosen = d.get("chosen") or {}
    rows = ["<table><tr><th></th><th>intervention</th><th>cost</th><th>expected time (s)</th><th>rule</th>"
            "<th>why the rule fired</th><th>needs approval</th></tr>"]
    for c in d.get("candidates", []):
        is_chosen = chosen and c.get("intervention") == chosen.get("intervention") and c.get("rule") == chosen.get("rule")
        rows.append(f"<tr class='{'chosen' if is_chosen else ''}'><td>{'★ chosen' if is_chosen else ''}</td>"
                    f"<td>{_e(c.get('intervention'))}</td><td class='n'>{_num(c.get('cost'), 'g')}</td>"
                    f"<td class='n'>{_num(c.get('expected_time_s'), 'g')}</td><td><code>{_e(c.get('rule'))}</code></td>"
                    f"<td>{_e(c.get('reason'))}</td><td>{'yes' if c.get('needs_approval') else 'no'}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _checks_table(checks: list[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>check</th><th>value</th><th>limit</th><th>result</th><th>detail</th></tr>"]
    for c in checks:
        res = "<span class='ok'>passed</span>" if c.get("passed") else "<span class='bad'>FAILED</span>"
        rows.append(f"<tr><td>{_e(c.get('name'))}</td><td class='n'>{_num(c.get('value'), '.4g')}</td>"
                    f"<td class='n'>{_num(c.get('limit'), '.4g')}</td><td>{res}</td><td>{_e(c.get('detail'))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _metrics_table(before: dict, after: dict, treated: str | None) -> str:
    rows = ["<table><tr><th>label</th><th>n / positives</th><th>AUROC before</th><th>after</th><th>Δ</th>"
            "<th>sensitivity before → after</th><th>specificity before → after</th><th>ECE before → after</th>"
            "<th>threshold before → after</th><th>TP / FP before → after</th></tr>"]
    for label in sorted(set(before) | set(after)):
        b, a = before.get(label, {}), after.get(label, {})
        ab, aa = b.get("auroc"), a.get("auroc")
        delta = "n/a" if ab is None or aa is None else f"{aa - ab:+.4f}"
        rows.append(
            f"<tr class='{'treated' if label == treated else ''}'><td>{_e(label)}{' ◀ treated' if label == treated else ''}</td>"
            f"<td class='n'>{_e(b.get('n', a.get('n')))} / {_e(b.get('positives', a.get('positives')))}</td>"
            f"<td class='n'>{_num(ab, '.4f')}</td><td class='n'>{_num(aa, '.4f')}</td><td class='n'>{delta}</td>"
            f"<td class='n'>{_num(b.get('sensitivity'))} → {_num(a.get('sensitivity'))}</td>"
            f"<td class='n'>{_num(b.get('specificity'))} → {_num(a.get('specificity'))}</td>"
            f"<td class='n'>{_num(b.get('ece'))} → {_num(a.get('ece'))}</td>"
            f"<td class='n'>{_num(b.get('threshold'))} → {_num(a.get('threshold'))}</td>"
            f"<td class='n'>{_e(b.get('tp'))}/{_e(b.get('fp'))} → {_e(a.get('tp'))}/{_e(a.get('fp'))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_run_html(info: dict[str, Any]) -> str:
    """The report page for the data gathered by :func:`collect_run`."""
    s, f, chain = info["started"], info["finished"], info["chain"]
    facts = info["facts"]
    by_id = {x.get("fact_id"): x for x in facts}
    outcome = f.get("outcome") or ("error" if f.get("status") == "error" else "unfinished")
    records = info["records"]
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Triage run {_e(info['run_id'])}"
           f"</title><style>{_CSS}</style></head><body>"]
    out.append(f"<h1>Triage run <code>{_e(info['run_id'])}</code> — report for review</h1>")
    out.append(f"<div class='muted'>generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from audit "
               f"store {_e(info['store_path'])} · records {records[0]['seq']}–{records[-1]['seq']} · tool "
               f"{_e(s.get('tool_version'))}"
               + (f" · this run id was recorded {info['n_instances']} times; the latest is shown"
                  if info["n_instances"] > 1 else "") + "</div>")

    # -- summary --------------------------------------------------------------------------------
    changed = f.get("model_hash_before") != f.get("model_hash_after")
    actionable = [x for x in facts if x.get("kind") in _actionable_kinds()]
    chain_html = (f"<span class='ok'>audit chain intact</span> ({chain['n_records']} records)" if chain["ok"]
                  else f"<span class='bad'>audit chain BROKEN: {len(chain['problems'])} problem(s)</span>")
    out.append("<h2 id='summary'>Summary</h2><div class='box'>")
    out.append(f"<p>Outcome: {_badge(outcome, _OUTCOME_COLOUR.get(outcome, '#607d8b'))} (exit {_e(f.get('exit_code'))})"
               f" · {len(facts)} issue fact(s), {len(actionable)} actionable · model "
               f"{'<b>changed</b>' if changed else 'unchanged'} · {chain_html}</p><ul>")
    for fid in info["fact_order"]:
        t = info["treatments"][fid]
        fact = by_id.get(fid, {})
        final = t["final"] or {}
        out.append(f"<li><b>{_e(fact.get('kind', '?'))} / {_e(fact.get('label') or 'model')}</b>: "
                   f"{_e(final.get('outcome', 'no outcome recorded'))}"
                   + (f" with {_e(final.get('intervention'))}" if final.get("intervention") else "")
                   + (f" — {_e(final.get('rationale'))}" if final.get("rationale") else "") + "</li>")
    out.append("</ul></div>")

    # -- facts of the run -----------------------------------------------------------------------
    split = info["split"]
    out.append("<h2 id='facts'>Run facts</h2>")
    out.append(_kv([
        ("policy", f"{_e(s.get('policy', {}).get('name'))} · {_hash(s.get('policy', {}).get('content_hash'))}"),
        ("model before", _hash(s.get("model_hash"))),
        ("model after", _hash(f.get("model_hash_after")) + (f" · {_e(f.get('model_path'))}" if f.get("model_path") else "")),
        ("parent model", _hash(s.get("parent_hash"))),
        ("data", f"{_e(s.get('data_root'))} · split {_e(s.get('split'))} · {_e(s.get('n_images'))} images"),
        ("data manifest", _hash(s.get("data_manifest_hash"))),
        ("fit split", f"{_e(split.get('fit', {}).get('n_images'))} images, {_e(split.get('fit', {}).get('n_patients'))} "
                      f"patients · {_hash(split.get('fit', {}).get('manifest_hash'))}"),
        ("verify split", f"{_e(split.get('verify', {}).get('n_images'))} images, "
                         f"{_e(split.get('verify', {}).get('n_patients'))} patients (patient-disjoint from fit) · "
                         f"{_hash(split.get('verify', {}).get('manifest_hash'))}"),
        ("seed", _e(s.get("seed"))),
        ("approvals given", _e(", ".join(s.get("approve") or []) or "none")),
        ("dry run", "yes" if s.get("dry_run") else "no"),
        ("started / finished (UTC)", f"{_e(records[0]['time'])} / {_e(records[-1]['time'])}"),
        ("wall time", f"{_num(f.get('wall_time_s'), '.2f')} s"),
        ("run folder", _e(info["run_dir"])),
    ]))

    # -- issues ---------------------------------------------------------------------------------
    out.append("<h2 id='issues'>Issues found by the monitors</h2>")
    informational = [x for x in facts if x not in actionable]
    if actionable:
        out.append(f"<p>{len(actionable)} actionable issue(s), in the order they were treated:</p>" + _facts_table(actionable))
    else:
        out.append("<p>No actionable issue.</p>")
    if informational:
        out.append(f"<details><summary>{len(informational)} informational fact(s) (not treated: "
                   f"{_e(', '.join(sorted({str(x.get('kind')) for x in informational})))})</summary>"
                   + _facts_table(informational) + "</details>")

    # -- decisions ------------------------------------------------------------------------------
    out.append("<h2 id='decisions'>Candidates, decisions and verification</h2>")
    if not info["fact_order"]:
        out.append("<p>No actionable issue: nothing was decided.</p>")
    limitations: list[str] = []
    for fid in info["fact_order"]:
        t = info["treatments"][fid]
        fact = by_id.get(fid, {})
        out.append(f"<h3>{_e(fact.get('kind', '?'))} / {_e(fact.get('label') or 'model')} "
                   f"<span class='muted'>fact {_e(fid)}</span></h3>")
        for n, attempt in sorted(t["attempts"].items()):
            d = attempt.get("decision", {})
            out.append(f"<h4>Attempt {n}</h4>")
            if d:
                out.append(_candidates_table(attempt))
                if d.get("excluded"):
                    out.append(f"<p class='muted'>excluded (rejected earlier for this issue): "
                               f"{_e(', '.join(d['excluded']))}</p>")
                out.append(f"<p><b>Decision:</b> {_e(d.get('rationale'))}</p>")
            if "approval" in attempt:
                a = attempt["approval"]
                out.append(f"<p>Approval: {_e(a.get('intervention'))} approved by {_e(a.get('approved_by'))} "
                           f"(cost {_num(a.get('cost'), 'g')}).</p>")
            applied = attempt.get("intervention_applied")
            if applied:
                if applied.get("status") == "error":
                    out.append(f"<p class='bad'>Intervention {_e(applied.get('intervention'))} failed: "
                               f"{_e(applied.get('error'))}</p>")
                else:
                    out.append(f"<p>Applied {_e(applied.get('intervention'))} to a copy in "
                               f"{_num(applied.get('wall_time_s'), '.3f')} s (classifier only: "
                               f"{'yes' if applied.get('classifier_only') else 'no'}); candidate model "
                               f"{_hash(applied.get('model_hash_candidate'))}.</p>")
                    out.append("<details><summary>parameters and changes</summary><pre>"
                               + _e(json.dumps({"params": applied.get("params"), "changes": applied.get("changes"),
                                                "fit_metrics": applied.get("fit_metrics")}, indent=1, sort_keys=True))
                               + "</pre></details>")
            v = attempt.get("verification")
            if v:
                verdict = "<span class='ok'>PASSED</span>" if v.get("passed") else "<span class='bad'>FAILED</span>"
                out.append(f"<p>Verification on the held-out verify split: {verdict}</p>")
                out.append(_checks_table(v.get("checks", [])))
                acc = v.get("acceptance")
                if acc:
                    out.append(f"<p class='muted'>acceptance limits: {_e(json.dumps(acc, sort_keys=True))}</p>")
                before, after = v.get("before", {}), v.get("after", {})
                if before and after:
                    label = fact.get("label")
                    out.append(f"<h4>Before / after on the verify split (attempt {n})</h4>")
                    out.append(_metrics_table(before, after, label))
                    figs = [_auroc_figure(before, after, label), _roc_space_figure(before, after, label),
                            _ece_figure(before, after, label)]
                    scores, why = _load_scores(info["run_dir"], v.get("scores"))
                    if scores is not None and label:
                        curve = _curves_figure(scores, label)
                        if curve:
                            figs.insert(0, curve)
                        out.append(f"<p class='muted'>ROC curve and reliability diagram from {_e(why)}.</p>")
                    else:
                        limitations.append(f"attempt {n} for {fact.get('kind')}/{fact.get('label')}: {why} — ROC "
                                           "curves and reliability diagrams need per-image verify scores; shown "
                                           "instead: AUROC and ECE before/after and the operating points in ROC space")
                    out.append("<div class='figs'>" + "".join(
                        f"<img alt='verification figure {i + 1}' src='{u}'>" for i, u in enumerate(figs)) + "</div>")
            ao = attempt.get("attempt_outcome")
            if ao:
                extra = f"; failed checks: {', '.join(ao['failed_checks'])}" if ao.get("failed_checks") else ""
                back = f"; rolled back to {_hash(ao.get('rolled_back_to'))}" if ao.get("rolled_back_to") else ""
                out.append(f"<p><b>Result:</b> {_e(ao.get('outcome'))}{_e(extra)}{back}</p>")
        final = t["final"]
        if final:
            out.append(f"<div class='box'><b>Outcome for this issue:</b> {_e(final.get('outcome'))}"
                       + (f" ({_e(final.get('intervention'))})" if final.get("intervention") else "")
                       + (f". {_e(final.get('rationale'))}" if final.get("rationale") else "") + "</div>")

    # -- outcome --------------------------------------------------------------------------------
    out.append("<h2 id='outcome'>Outcome</h2>")
    if f.get("status") == "error":
        out.append(f"<p class='bad'>The run failed: {_e(f.get('error'))}</p>")
    out.append(_kv([
        ("outcome", _badge(outcome, _OUTCOME_COLOUR.get(outcome, "#607d8b"))),
        ("exit status", _e(f.get("exit_code"))),
        ("model before → after", f"{_hash(f.get('model_hash_before'))} → {_hash(f.get('model_hash_after'))}"),
    ]))
    decision = info.get("decision") or {}
    remaining = decision.get("remaining_facts")
    if remaining is not None:
        if remaining:
            out.append("<p>Actionable issues still detected on the whole set after the run (from decision.json):</p>"
                       + _facts_table(remaining))
        else:
            out.append("<p>No actionable issue remains on the whole set after the run (from decision.json).</p>")
    walls = f.get("wall_times_s") or {}
    if walls:
        out.append("<details><summary>wall times per stage</summary><table>" + "".join(
            f"<tr><td>{_e(k)}</td><td class='n'>{_num(v, '.3f')} s</td></tr>" for k, v in walls.items()) + "</table></details>")

    # -- integrity ------------------------------------------------------------------------------
    out.append("<h2 id='integrity'>Integrity</h2>")
    rows = [("audit chain", chain_html),
            ("audit head", f"record {_e(chain['head_seq'])} · {_hash(chain['head_hash'])}"),
            ("this run's records", f"{len(records)} (seq {records[0]['seq']}–{records[-1]['seq']}); last record hash "
                                   f"{_hash(records[-1].get('record_hash'))}"),
            ("decision.json", _e(info["decision_check"]))]
    if info["model_check"]:
        rows.append(("treated bundle", _e(info["model_check"])))
    out.append(_kv(rows))
    if chain["problems"]:
        out.append("<ul>" + "".join(f"<li class='bad'>{_e(p)}</li>" for p in chain["problems"]) + "</ul>")
    out.append("<p class='muted'>Keep the head hash elsewhere; <code>cli.py audit verify --expect-head HASH</code> "
               "then also detects a rewritten or truncated chain.</p>")

    out.append("<h2 id='limitations'>Limitations of this report</h2>")
    if limitations:
        out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in limitations) + "</ul>")
    else:
        out.append("<p>None noted.</p>")

    out.append("<h2 id='records'>Audit records of this run</h2>")
    for r in records:
        out.append(f"<details><summary>#{r['seq']} · {_e(r['kind'])} · {_e(r['time'])} · "
                   f"<code>{_e(str(r.get('record_hash'))[:16])}…</code></summary><pre>"
                   + _e(json.dumps(r, indent=1, sort_keys=True)) + "</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)


def _actionable_kinds() -> tuple[str, ...]:
    from engine.core.facts import ACTIONABLE_KINDS

    return ACTIONABLE_KINDS


def render_run_report(store: Any, run_id: str, out_path: str | Path, *, run_dir: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of ``run_id`` to ``out_path`` (atomically)."""
    info = collect_run(store, run_id, run_dir)
    return atomic_write_text(out_path, render_run_html(info))


# --------------------------------------------------------------------------------------------
# CLI: `cli.py audit report RUN [--audit PATH] [--out FILE]`


def add_report_subcommand(actions: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``audit`` subcommands (called by ``engine.commands.audit``)."""
    r = actions.add_parser(
        "report",
        help="write a self-contained HTML report of one triage run for a regulator",
        description="Render one run from the audit store: the run's facts and hashes, every issue, every "
        "candidate with its cost and the rule that proposed it, the decision and its rationale, verification "
        "checks and before/after metrics on the verify split (with figures), the outcome, and the audit chain's "
        "verification status. decision.json and the treated bundle in the run folder are checked against the "
        "hashes in the audit records.",
    )
    r.add_argument("run", metavar="RUN", help="run id (a unique prefix is enough) or a run folder with decision.json")
    r.add_argument("--audit", type=Path, metavar="PATH",
                   help="audit store (default: audit.db next to the run folder, as `triage` writes it)")
    r.add_argument("--out", type=Path, metavar="FILE",
                   help="output HTML (default: RUN/report.html for a run folder, else run-<id>.html)")
    r.set_defaults(func=_run_report, usage_error=r.error)


def _run_report(args: argparse.Namespace) -> int:
    from engine.commands.audit import open_store, resolve_run
    from engine.console import console

    run_path = Path(args.run)
    is_folder = (run_path / "decision.json").is_file()
    audit = args.audit
    if audit is None:
        if not is_folder:
            args.usage_error("--audit PATH is required unless RUN is a run folder (then RUN/../audit.db is used)")
        audit = run_path.resolve().parent / "audit.db"
    with open_store(audit) as store:
        run_id = resolve_run(store, args.run)
        out = args.out or (run_path / "report.html" if is_folder else Path(f"run-{run_id}.html"))
        info = collect_run(store, run_id, run_path if is_folder else None)
        atomic_write_text(out, render_run_html(info))
    chain = info["chain"]
    status = "[green]intact[/]" if chain["ok"] else f"[bold red]BROKEN ({len(chain['problems'])} problem(s))[/]"
    console.print(f"Wrote {out} for run {run_id} ({len(info['records'])} records; audit chain {status}; "
                  f"{info['decision_check']})", highlight=False)
    return 0
