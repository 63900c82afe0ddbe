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

Three steps, kept apart: :func:`collect_run` gathers and checks (records, files, scores),
:func:`engine.reports.run_figures.draw_run_figures` draws, :func:`render_run_html` writes markup.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.audit import run_instances
from engine.core.errors import AuditError
from engine.core.facts import ACTIONABLE_KINDS
from engine.core.storage import atomic_write_text, sha256_file
from engine.reports.correction_html import run_correction_html
from engine.reports.html import RUN_REPORT_CSS, badge, esc, hash_code, kv_table, num, page
from engine.reports.run_figures import draw_run_figures

__all__ = ["collect_run", "render_run_report", "render_run_html"]

_SEVERITY_COLOUR = {"critical": "#8b0000", "high": "#c62828", "medium": "#ef6c00", "low": "#f9a825", "info": "#607d8b"}
_OUTCOME_COLOUR = {"treated": "#2e7d32", "healthy": "#2e7d32", "planned": "#1565c0", "needs_approval": "#ef6c00",
                   "untreated": "#c62828", "error": "#8b0000"}


# --------------------------------------------------------------------------------------------
# Gathering


def _as_dict(rec: Any) -> dict[str, Any]:
    return rec.to_dict() if hasattr(rec, "to_dict") else dict(rec)


def _treatments(instance: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Per fact: its attempts (decision → approval → applied → verification → outcome) and final outcome."""
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
    return fact_order, treatments


def _check_decision(run_dir: Path, finished: dict[str, Any]) -> tuple[Any, str]:
    """decision.json of the run folder, and whether its SHA-256 is the one run_finished recorded."""
    path = run_dir / "decision.json"
    if not path.is_file():
        return None, f"{path}: not found"
    decision = None
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
    return decision, decision_check


def _check_model(finished: dict[str, Any]) -> str | None:
    """Whether the treated bundle named by run_finished is there and has the recorded hash."""
    model_path = finished.get("model_path")
    if not model_path:
        return None
    mp = Path(model_path)
    if not mp.is_file():
        return f"{mp}: treated bundle not found"
    digest = sha256_file(mp)
    ok = digest == finished.get("model_hash_after")
    return (f"{mp}: SHA-256 {'matches' if ok else 'does NOT match'} the recorded model hash "
            f"after treatment ({digest[:16]}…)")


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


def _collect_scores(run_dir: str | None, fact_order: list[str],
                    treatments: dict[str, dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """For every verification with before/after metrics: its per-image scores (or None) and where
    they came from (or why there are none), keyed by (fact id, attempt)."""
    scores: dict[tuple[str, int], dict[str, Any]] = {}
    for fid in fact_order:
        for n, attempt in sorted(treatments[fid]["attempts"].items()):
            v = attempt.get("verification")
            if not v or not (v.get("before", {}) and v.get("after", {})):
                continue
            arrays, source = _load_scores(run_dir, v.get("scores"))
            scores[(fid, n)] = {"arrays": arrays, "source": source}
    return scores


def collect_run(store: Any, run_id: str, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the report shows about ``run_id``, grouped; raises AuditError if the run is unknown.

    The same deterministic run id is recorded again when a run is repeated; the latest instance
    (records from its last ``run_started``) is reported and the number of instances stated.
    """
    records = [_as_dict(r) for r in store.records(run_id)]
    if not records:
        raise AuditError(f"{getattr(store, 'path', 'audit store')}: no records for run {run_id!r}")
    starts = [r for r in records if r["kind"] == "run_started"]
    instance = run_instances(records)[-1]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in instance:
        by_kind.setdefault(r["kind"], []).append(r)
    started = (by_kind.get("run_started") or [{}])[0].get("payload", {})
    finished = (by_kind.get("run_finished") or [{}])[-1].get("payload", {})
    facts_payload = (by_kind.get("facts") or [{}])[0].get("payload", {})
    fact_order, treatments = _treatments(instance)

    if run_dir is None and started.get("out_dir"):
        run_dir = started["out_dir"]
    run_dir = Path(run_dir) if run_dir else None
    decision, decision_check, model_check = None, "no run folder recorded", None
    if run_dir is not None:
        decision, decision_check = _check_decision(run_dir, finished)
        model_check = _check_model(finished)
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
        # per verification: per-image scores (or None) and their source, for the figures and the page
        "scores": _collect_scores(str(run_dir) if run_dir else None, fact_order, treatments),
    }


# --------------------------------------------------------------------------------------------
# Tables


def _val(v: Any) -> str:
    return num(v, ".4g") if isinstance(v, (int, float)) and not isinstance(v, bool) else esc(v)


def _fact_row(f: dict[str, Any]) -> str:
    """One issue; measured/reference show the first 8 entries (the records appendix has all)."""
    measured = "<br>".join(f"{esc(k)} {_val(v)}" for k, v in list(f.get("measured", {}).items())[:8])
    ref = "<br>".join(f"{esc(k)} {_val(v)}" for k, v in list(f.get("reference", {}).items())[:8])
    thr = "<br>".join(f"{esc(k)} = {_val(v)}" for k, v in f.get("threshold", {}).items())
    sev = f.get("severity", "info")
    return (f"<tr><td>{badge(sev, _SEVERITY_COLOUR.get(sev, '#607d8b'))}</td><td>{esc(f.get('kind'))}</td>"
            f"<td>{esc(f.get('label') or 'model')}</td><td>{esc(f.get('monitor'))}</td><td>{esc(f.get('message'))}</td>"
            f"<td class='muted w' style='max-width:230px'>{measured}</td><td class='muted w' style='max-width:200px'>{ref}</td>"
            f"<td class='muted w' style='max-width:150px'>{thr}</td>"
            f"<td><code style='font-size:10px'>{esc(f.get('fact_id'))}</code></td></tr>")


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
                    f"<td>{esc(c.get('intervention'))}</td><td class='n'>{num(c.get('cost'), 'g')}</td>"
                    f"<td class='n'>{num(c.get('expected_time_s'), 'g')}</td><td><code>{esc(c.get('rule'))}</code></td>"
                    f"<td>{esc(c.get('reason'))}</td><td>{'yes' if c.get('needs_approval') else 'no'}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _check_value(c: dict[str, Any]) -> str:
    """A check's value; with its interval, level and method where it carries one (statistical checks)."""
    if "level" not in c:
        return num(c.get("value"), ".4g")
    if c.get("value") is None:
        return f"cannot be estimated<br><small>{esc(c.get('reason'))}</small>"
    interval = "" if c.get("low") is None else f" [{num(c.get('low'), '.4g')}, {num(c.get('high'), '.4g')}]"
    how = f"{num(100 * float(c['level']), '.3g')} % {esc(c.get('method'))}"
    if c.get("candidate_k") is not None:
        how += f", candidate {esc(c['candidate_k'])}"
    return f"{num(c.get('value'), '.4g')}{interval}<br><small>{how}</small>"


def _checks_table(checks: list[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>check</th><th>value [interval]</th><th>limit</th><th>result</th><th>detail</th></tr>"]
    for c in checks:
        res = "<span class='ok'>passed</span>" if c.get("passed") else "<span class='bad'>FAILED</span>"
        rows.append(f"<tr><td>{esc(c.get('name'))}</td><td class='n'>{_check_value(c)}</td>"
                    f"<td class='n'>{num(c.get('limit'), '.4g')}</td><td>{res}</td><td>{esc(c.get('detail'))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _cell(m: dict, key: str, spec: str = ".3f") -> str:
    """A number, or ``n/a (reason)`` where the split's metrics say why it cannot be estimated."""
    if m.get(key) is None and m.get(f"{key}_reason"):
        return f"n/a ({esc(m[f'{key}_reason'])})"
    return num(m.get(key), spec)


def _metrics_table(before: dict, after: dict, treated: str | None) -> str:
    rows = ["<table><tr><th>label</th><th>n / positives</th><th>AUROC before</th><th>after</th><th>Δ</th>"
            "<th>sensitivity before → after</th><th>specificity before → after</th><th>ECE before → after</th>"
            "<th>threshold before → after</th><th>TP / FP before → after</th></tr>"]
    for label in sorted(set(before) | set(after)):
        b, a = before.get(label, {}), after.get(label, {})
        ab, aa = b.get("auroc"), a.get("auroc")
        delta = "n/a" if ab is None or aa is None else f"{aa - ab:+.4f}"
        rows.append(
            f"<tr class='{'treated' if label == treated else ''}'><td>{esc(label)}{' ◀ treated' if label == treated else ''}</td>"
            f"<td class='n'>{esc(b.get('n', a.get('n')))} / {esc(b.get('positives', a.get('positives')))}</td>"
            f"<td class='n'>{_cell(b, 'auroc', '.4f')}</td><td class='n'>{_cell(a, 'auroc', '.4f')}</td><td class='n'>{delta}</td>"
            f"<td class='n'>{_cell(b, 'sensitivity')} → {_cell(a, 'sensitivity')}</td>"
            f"<td class='n'>{_cell(b, 'specificity')} → {_cell(a, 'specificity')}</td>"
            f"<td class='n'>{_cell(b, 'ece')} → {_cell(a, 'ece')}</td>"
            f"<td class='n'>{num(b.get('threshold'))} → {num(a.get('threshold'))}</td>"
            f"<td class='n'>{esc(b.get('tp'))}/{esc(b.get('fp'))} → {esc(a.get('tp'))}/{esc(a.get('fp'))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)




# --------------------------------------------------------------------------------------------
# HTML, one function per section of the page


def _chain_html(chain: dict[str, Any]) -> str:
    return (f"<span class='ok'>audit chain intact</span> ({chain['n_records']} records)" if chain["ok"]
            else f"<span class='bad'>audit chain BROKEN: {len(chain['problems'])} problem(s)</span>")


def _header(info: dict[str, Any]) -> list[str]:
    s, records = info["started"], info["records"]
    return [f"<h1>Triage run <code>{esc(info['run_id'])}</code> — report for review</h1>",
            f"<div class='muted'>generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from audit "
            f"store {esc(info['store_path'])} · records {records[0]['seq']}–{records[-1]['seq']} · tool "
            f"{esc(s.get('tool_version'))}"
            + (f" · this run id was recorded {info['n_instances']} times; the latest is shown"
               if info["n_instances"] > 1 else "") + "</div>"]


def _summary_section(info: dict[str, Any], by_id: dict[Any, dict[str, Any]], actionable: list[dict[str, Any]],
                     outcome: str) -> list[str]:
    f = info["finished"]
    changed = f.get("model_hash_before") != f.get("model_hash_after")
    out = ["<h2 id='summary'>Summary</h2><div class='box'>",
           f"<p>Outcome: {badge(outcome, _OUTCOME_COLOUR.get(outcome, '#607d8b'))} (exit {esc(f.get('exit_code'))})"
           f" · {len(info['facts'])} issue fact(s), {len(actionable)} actionable · model "
           f"{'<b>changed</b>' if changed else 'unchanged'} · {_chain_html(info['chain'])}</p><ul>"]
    for fid in info["fact_order"]:
        t = info["treatments"][fid]
        fact = by_id.get(fid, {})
        final = t["final"] or {}
        out.append(f"<li><b>{esc(fact.get('kind', '?'))} / {esc(fact.get('label') or 'model')}</b>: "
                   f"{esc(final.get('outcome', 'no outcome recorded'))}"
                   + (f" with {esc(final.get('intervention'))}" if final.get("intervention") else "")
                   + (f" — {esc(final.get('rationale'))}" if final.get("rationale") else "") + "</li>")
    out.append("</ul></div>")
    return out


def _run_facts_section(info: dict[str, Any]) -> list[str]:
    s, f, split, records = info["started"], info["finished"], info["split"], info["records"]
    return ["<h2 id='facts'>Run facts</h2>", kv_table([
        ("policy", f"{esc(s.get('policy', {}).get('name'))} · {hash_code(s.get('policy', {}).get('content_hash'))}"),
        ("model before", hash_code(s.get("model_hash"))),
        ("model after", hash_code(f.get("model_hash_after")) + (f" · {esc(f.get('model_path'))}" if f.get("model_path") else "")),
        ("parent model", hash_code(s.get("parent_hash"))),
        ("data", f"{esc(s.get('data_root'))} · split {esc(s.get('split'))} · {esc(s.get('n_images'))} images"),
        ("data manifest", hash_code(s.get("data_manifest_hash"))),
        ("fit split", f"{esc(split.get('fit', {}).get('n_images'))} images, {esc(split.get('fit', {}).get('n_patients'))} "
                      f"patients · {hash_code(split.get('fit', {}).get('manifest_hash'))}"),
        ("verify split", f"{esc(split.get('verify', {}).get('n_images'))} images, "
                         f"{esc(split.get('verify', {}).get('n_patients'))} patients (patient-disjoint from fit) · "
                         f"{hash_code(split.get('verify', {}).get('manifest_hash'))}"),
        ("seed", esc(s.get("seed"))),
        ("approvals given", esc(", ".join(s.get("approve") or []) or "none")),
        ("dry run", "yes" if s.get("dry_run") else "no"),
        ("started / finished (UTC)", f"{esc(records[0]['time'])} / {esc(records[-1]['time'])}"),
        ("wall time", f"{num(f.get('wall_time_s'), '.2f')} s"),
        ("run folder", esc(info["run_dir"])),
    ])]


def _issues_section(facts: list[dict[str, Any]], actionable: list[dict[str, Any]]) -> list[str]:
    out = ["<h2 id='issues'>Issues found by the monitors</h2>"]
    informational = [x for x in facts if x not in actionable]
    if actionable:
        out.append(f"<p>{len(actionable)} actionable issue(s), in the order they were treated:</p>" + _facts_table(actionable))
    else:
        out.append("<p>No actionable issue.</p>")
    if informational:
        out.append(f"<details><summary>{len(informational)} informational fact(s) (not treated: "
                   f"{esc(', '.join(sorted({str(x.get('kind')) for x in informational})))})</summary>"
                   + _facts_table(informational) + "</details>")
    return out


def _decision_html(d: dict[str, Any], attempt: dict[str, Any]) -> list[str]:
    out = [_candidates_table(attempt)]
    if d.get("excluded"):
        out.append(f"<p class='muted'>excluded (rejected earlier for this issue): "
                   f"{esc(', '.join(d['excluded']))}</p>")
    out.append(f"<p><b>Decision:</b> {esc(d.get('rationale'))}</p>")
    return out


def _applied_html(applied: dict[str, Any]) -> list[str]:
    if applied.get("status") == "error":
        return [f"<p class='bad'>Intervention {esc(applied.get('intervention'))} failed: "
                f"{esc(applied.get('error'))}</p>"]
    return [f"<p>Applied {esc(applied.get('intervention'))} to a copy in "
            f"{num(applied.get('wall_time_s'), '.3f')} s (classifier only: "
            f"{'yes' if applied.get('classifier_only') else 'no'}); candidate model "
            f"{hash_code(applied.get('model_hash_candidate'))}.</p>",
            "<details><summary>parameters and changes</summary><pre>"
            + esc(json.dumps({"params": applied.get("params"), "changes": applied.get("changes"),
                              "fit_metrics": applied.get("fit_metrics")}, indent=1, sort_keys=True))
            + "</pre></details>"]


def _verification_html(v: dict[str, Any], n: int, fact: dict[str, Any], scores: dict[str, Any] | None,
                       figs: list[str] | None) -> tuple[list[str], str | None]:
    """The verification of attempt ``n``, and the report's limitation when curves could not be drawn."""
    verdict = "<span class='ok'>PASSED</span>" if v.get("passed") else "<span class='bad'>FAILED</span>"
    out = [f"<p>Verification on the held-out verify split: {verdict}</p>", _checks_table(v.get("checks", []))]
    acc = v.get("acceptance")
    if acc:
        out.append(f"<p class='muted'>acceptance limits: {esc(json.dumps(acc, sort_keys=True))}</p>")
    before, after = v.get("before", {}), v.get("after", {})
    if not (before and after):
        return out, None
    label = fact.get("label")
    limitation = None
    out.append(f"<h4>Before / after on the verify split (attempt {n})</h4>")
    out.append(_metrics_table(before, after, label))
    why = scores["source"] if scores else "no per-image scores recorded"
    if scores and scores["arrays"] is not None and label:
        out.append(f"<p class='muted'>ROC curve and reliability diagram from {esc(why)}.</p>")
    else:
        limitation = (f"attempt {n} for {fact.get('kind')}/{fact.get('label')}: {why} — ROC "
                      "curves and reliability diagrams need per-image verify scores; shown "
                      "instead: AUROC and ECE before/after and the operating points in ROC space")
    out.append("<div class='figs'>" + "".join(
        f"<img alt='verification figure {i + 1}' src='{u}'>" for i, u in enumerate(figs or [])) + "</div>")
    return out, limitation


def _attempt_html(info: dict[str, Any], fid: str, n: int, attempt: dict[str, Any], fact: dict[str, Any],
                  figures: dict[tuple[str, int], list[str]]) -> tuple[list[str], str | None]:
    """One attempt: candidates and decision, approval, application, verification, result."""
    out = [f"<h4>Attempt {n}</h4>"]
    limitation = None
    d = attempt.get("decision", {})
    if d:
        out += _decision_html(d, attempt)
    if "approval" in attempt:
        a = attempt["approval"]
        out.append(f"<p>Approval: {esc(a.get('intervention'))} approved by {esc(a.get('approved_by'))} "
                   f"(cost {num(a.get('cost'), 'g')}).</p>")
    applied = attempt.get("intervention_applied")
    if applied:
        out += _applied_html(applied)
    v = attempt.get("verification")
    if fact.get("kind") == "reported_fp" and (applied or v):
        out += run_correction_html(fact, applied, v)
    if v:
        lines, limitation = _verification_html(v, n, fact, info.get("scores", {}).get((fid, n)),
                                               figures.get((fid, n)))
        out += lines
    ao = attempt.get("attempt_outcome")
    if ao:
        extra = f"; failed checks: {', '.join(ao['failed_checks'])}" if ao.get("failed_checks") else ""
        back = f"; rolled back to {hash_code(ao.get('rolled_back_to'))}" if ao.get("rolled_back_to") else ""
        out.append(f"<p><b>Result:</b> {esc(ao.get('outcome'))}{esc(extra)}{back}</p>")
    return out, limitation


def _decisions_section(info: dict[str, Any], by_id: dict[Any, dict[str, Any]],
                       figures: dict[tuple[str, int], list[str]]) -> tuple[list[str], list[str]]:
    """Every treated fact's attempts; also returns the limitations noted on the way."""
    out = ["<h2 id='decisions'>Candidates, decisions and verification</h2>"]
    if not info["fact_order"]:
        out.append("<p>No actionable issue: nothing was decided.</p>")
    limitations: list[str] = []
    for fid in info["fact_order"]:
        t = info["treatments"][fid]
        fact = by_id.get(fid, {})
        out.append(f"<h3>{esc(fact.get('kind', '?'))} / {esc(fact.get('label') or 'model')} "
                   f"<span class='muted'>fact {esc(fid)}</span></h3>")
        for n, attempt in sorted(t["attempts"].items()):
            lines, limitation = _attempt_html(info, fid, n, attempt, fact, figures)
            out += lines
            if limitation is not None:
                limitations.append(limitation)
        final = t["final"]
        if final:
            out.append(f"<div class='box'><b>Outcome for this issue:</b> {esc(final.get('outcome'))}"
                       + (f" ({esc(final.get('intervention'))})" if final.get("intervention") else "")
                       + (f". {esc(final.get('rationale'))}" if final.get("rationale") else "") + "</div>")
    return out, limitations


def _outcome_section(info: dict[str, Any], outcome: str) -> list[str]:
    f = info["finished"]
    out = ["<h2 id='outcome'>Outcome</h2>"]
    if f.get("status") == "error":
        out.append(f"<p class='bad'>The run failed: {esc(f.get('error'))}</p>")
    out.append(kv_table([
        ("outcome", badge(outcome, _OUTCOME_COLOUR.get(outcome, "#607d8b"))),
        ("exit status", esc(f.get("exit_code"))),
        ("model before → after", f"{hash_code(f.get('model_hash_before'))} → {hash_code(f.get('model_hash_after'))}"),
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
            f"<tr><td>{esc(k)}</td><td class='n'>{num(v, '.3f')} s</td></tr>" for k, v in walls.items()) + "</table></details>")
    return out


def _integrity_section(info: dict[str, Any]) -> list[str]:
    chain, records = info["chain"], info["records"]
    rows = [("audit chain", _chain_html(chain)),
            ("audit head", f"record {esc(chain['head_seq'])} · {hash_code(chain['head_hash'])}"),
            ("this run's records", f"{len(records)} (seq {records[0]['seq']}–{records[-1]['seq']}); last record hash "
                                   f"{hash_code(records[-1].get('record_hash'))}"),
            ("decision.json", esc(info["decision_check"]))]
    if info["model_check"]:
        rows.append(("treated bundle", esc(info["model_check"])))
    out = ["<h2 id='integrity'>Integrity</h2>", kv_table(rows)]
    if chain["problems"]:
        out.append("<ul>" + "".join(f"<li class='bad'>{esc(p)}</li>" for p in chain["problems"]) + "</ul>")
    out.append("<p class='muted'>Keep the head hash elsewhere; <code>cli.py audit verify --expect-head HASH</code> "
               "then also detects a rewritten or truncated chain.</p>")
    return out


def _limitations_section(limitations: list[str]) -> list[str]:
    out = ["<h2 id='limitations'>Limitations of this report</h2>"]
    if limitations:
        out.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in limitations) + "</ul>")
    else:
        out.append("<p>None noted.</p>")
    return out


def _records_section(records: list[dict[str, Any]]) -> list[str]:
    out = ["<h2 id='records'>Audit records of this run</h2>"]
    for r in records:
        out.append(f"<details><summary>#{r['seq']} · {esc(r['kind'])} · {esc(r['time'])} · "
                   f"<code>{esc(str(r.get('record_hash'))[:16])}…</code></summary><pre>"
                   + esc(json.dumps(r, indent=1, sort_keys=True)) + "</pre></details>")
    return out


def render_run_html(info: dict[str, Any], figures: dict[tuple[str, int], list[str]] | None = None) -> str:
    """The report page for the data gathered by :func:`collect_run`; ``figures`` are those of
    :func:`engine.reports.run_figures.draw_run_figures` (drawn here when not given)."""
    if figures is None:
        figures = draw_run_figures(info)
    facts = info["facts"]
    by_id = {x.get("fact_id"): x for x in facts}
    actionable = [x for x in facts if x.get("kind") in ACTIONABLE_KINDS]
    f = info["finished"]
    outcome = f.get("outcome") or ("error" if f.get("status") == "error" else "unfinished")
    body = [*_header(info), *_summary_section(info, by_id, actionable, outcome), *_run_facts_section(info),
            *_issues_section(facts, actionable)]
    decisions, limitations = _decisions_section(info, by_id, figures)
    body += [*decisions, *_outcome_section(info, outcome), *_integrity_section(info),
             *_limitations_section(limitations), *_records_section(info["records"])]
    return page(f"Triage run {esc(info['run_id'])}", RUN_REPORT_CSS, body)


def render_run_report(store: Any, run_id: str, out_path: str | Path, *, run_dir: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of ``run_id`` to ``out_path`` (atomically)."""
    info = collect_run(store, run_id, run_dir)
    return atomic_write_text(out_path, render_run_html(info, draw_run_figures(info)))
