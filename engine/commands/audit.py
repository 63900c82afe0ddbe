"""``cli.py audit verify|show|export|report``: the audit trail for regulators.

The store and its open/resolve helpers live in :mod:`engine.audit`; ``report`` renders one run
with :mod:`engine.reports.run_report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.padding import Padding

from engine.audit import AuditRecord, open_store, resolve_run
from engine.audit_models import check_model_files
from engine.commands.common import check_out_file
from engine.console import console
from engine.core.errors import EXIT_ERROR, EXIT_OK
from engine.core.storage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
)
from engine.reports.run_figures import draw_run_figures
from engine.reports.run_report import collect_run, render_run_html

__all__ = ["add_report_subcommand", "register", "summarise"]


def _add_audit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit", required=True, type=Path, metavar="PATH", help="audit store (SQLite file)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="verify, show or export the tamper-evident audit trail",
        description="The audit store is an append-only SQLite file whose records form a SHA-256 hash chain. "
        "'verify' finds edited, deleted and reordered records and names them; 'show' prints one run; "
        "'export' writes every record as JSON lines for archiving; 'report' (when installed) renders one run as "
        "a self-contained HTML page for a regulator.",
    )
    actions = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = actions.add_parser("verify", help="check the hash chain; exit 1 naming every broken record",
                           description="Walk the hash chain. Exit 0 when intact; exit 1 listing each problem "
                           "(e.g. 'record 7 (run ab12…): hash mismatch — edited', 'record 5 missing — deleted', "
                           "'record 9 out of order'). Prints the head hash: keep it elsewhere and pass it back "
                           "with --expect-head to detect a rewritten or truncated chain.")
    _add_audit_arg(v)
    v.add_argument("--expect-head", metavar="HASH", help="fail unless the chain ends at this record hash")
    v.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    v.set_defaults(func=run_verify)

    s = actions.add_parser("show", help="print the records of one run",
                           description="Show every record of a run: facts, candidates with cost and rule, the "
                           "choice and its rationale, verification checks, approvals and outcome.")
    s.add_argument("run", metavar="RUN", help="run id (a unique prefix is enough) or a run folder with decision.json")
    _add_audit_arg(s)
    s.add_argument("--json", action="store_true", help="print the raw records as JSON instead of tables")
    s.set_defaults(func=run_show)

    e = actions.add_parser("export", help="write the records as JSON lines (with their hashes)",
                           description="Write every record (or one run's) as canonical JSON, one per line, "
                           "including seq, prev_hash and record_hash so the chain can be re-checked offline.")
    _add_audit_arg(e)
    e.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl", help="output file")
    e.add_argument("--run", metavar="RUN", help="only this run's records (not independently verifiable)")
    e.set_defaults(func=run_export)

    add_report_subcommand(actions)


def run_verify(args: argparse.Namespace) -> int:
    with open_store(args.audit) as store:
        report = store.verify(expect_head=args.expect_head)
        files = check_model_files(store) if report.ok else None
    problems = list(report.problems) + (files.problems if files else [])
    if args.json:
        atomic_write_json(args.json, {"ok": not problems, "n_records": report.n_records, "problems": problems,
                                      "head_seq": report.head_seq, "head_hash": report.head_hash,
                                      "model_files_checked": files.checked if files else None,
                                      "notes": files.notes if files else []})
    for note in files.notes if files else []:
        console.print(f"  note: {escape(note)}", highlight=False)
    if not problems:
        console.print(f"[green]audit OK[/]: {report.n_records} record(s), hash chain intact; "
                      f"{files.checked if files else 0} model file(s) named by the records match their recorded "
                      f"hashes; head record {report.head_seq} hash {report.head_hash}")
        return EXIT_OK
    console.print(f"[bold red]audit FAILED[/]: {len(problems)} problem(s) in {report.n_records} record(s) "
                  f"of {escape(str(args.audit))}")
    for problem in problems:
        console.print(f"  • {escape(problem)}", highlight=False)
    return EXIT_ERROR


def _cands(cands: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c.get('intervention')} ({c.get('cost')}, {c.get('rule')})" for c in cands) or "none"


def summarise(rec: AuditRecord) -> str:
    """One readable paragraph per record (what a reviewer needs; `--json` has everything)."""
    p = rec.payload
    k = rec.kind
    if k == "run_started":
        return (f"policy {p.get('policy', {}).get('name')} ({str(p.get('policy', {}).get('content_hash'))[:12]}); "
                f"model {str(p.get('model_hash'))[:12]}; data {str(p.get('data_manifest_hash'))[:12]} "
                f"({p.get('n_images')} images, split {p.get('split')}); seed {p.get('seed')}; "
                f"approve {p.get('approve') or 'none'}" + ("; dry run" if p.get("dry_run") else ""))
    if k == "facts":
        facts = p.get("facts", [])
        lines = [f"{len(facts)} fact(s)"]
        quiet: dict[str, list[str]] = {}
        for f in facts:
            if f["severity"] in ("info", "low") and f["kind"] in ("cannot_assess", "prevalence_shift", "input_drift"):
                quiet.setdefault(f["kind"], []).append(f.get("label") or "model")
            else:
                lines.append(f"- {f['kind']}/{f.get('label') or 'model'} [{f['severity']}]: {f['message']}")
        lines += [f"- {kind} ({len(v)}): {', '.join(v)}" for kind, v in quiet.items()]
        return "\n".join(lines)
    if k == "decision":
        chosen = p.get("chosen")
        pick = f"chose {chosen['intervention']} (cost {chosen['cost']}, rule {chosen['rule']})" if chosen else "no choice"
        return (f"fact {p.get('fact_id')} attempt {p.get('attempt')}: {pick}; candidates: {_cands(p.get('candidates', []))}"
                + (f"; excluded {', '.join(p['excluded'])}" if p.get("excluded") else "")
                + f". Why: {p.get('rationale')}")
    if k == "approval":
        return f"{p.get('intervention')} approved by {p.get('approved_by')} (cost {p.get('cost')})"
    if k == "intervention_applied":
        if p.get("status") == "error":
            return f"{p.get('intervention')} failed: {p.get('error')}"
        return (f"{p.get('intervention')} applied in {p.get('wall_time_s', 0):.3f} s; params {p.get('params')}; "
                f"changes {json.dumps(p.get('changes'), sort_keys=True)[:300]}")
    if k == "verification":
        checks = "; ".join(f"{c['name']}={c['value']} (limit {c['limit']}) {'ok' if c['passed'] else 'FAILED'}"
                           for c in p.get("checks", []))
        return f"{p.get('intervention')}: {'PASSED' if p.get('passed') else 'FAILED'} — {checks}"
    if k == "outcome":
        return (f"fact {p.get('fact_id')}: {p.get('outcome')}"
                + (f" ({p.get('intervention')})" if p.get("intervention") else "")
                + (f" — {p['rationale']}" if p.get("rationale") else "")
                + (f"; failed checks {', '.join(p['failed_checks'])}" if p.get("failed_checks") else ""))
    if k == "run_finished":
        if p.get("status") == "error":
            return f"run failed: {p.get('error')}"
        return (f"{p.get('outcome')} (exit {p.get('exit_code')}); model {str(p.get('model_hash_before'))[:12]} → "
                f"{str(p.get('model_hash_after'))[:12]}; {p.get('wall_time_s', 0):.2f} s")
    return json.dumps(p, sort_keys=True)[:400]


def run_show(args: argparse.Namespace) -> int:
    with open_store(args.audit) as store:
        run_id = resolve_run(store, args.run)
        records = store.records(run_id)
    if args.json:
        console.print_json(json.dumps([r.to_dict() for r in records]))
        return EXIT_OK
    console.print(f"[bold]audit records of run {run_id}[/] ({len(records)}) in {escape(str(args.audit))}")
    for rec in records:
        console.print(f"[bold cyan]#{rec.seq}[/] {rec.time.replace('+00:00', 'Z')} [bold]{rec.kind}[/]", highlight=False)
        console.print(Padding(escape(summarise(rec)), (0, 0, 0, 4)), highlight=False)
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    with open_store(args.audit) as store:
        if args.run:
            run_id = resolve_run(store, args.run)
            records = store.records(run_id)
            atomic_write_bytes(args.out, b"".join(canonical_json(r.to_dict()) + b"\n" for r in records))
            n = len(records)
        else:
            store.export_jsonl(args.out)
            n = store.verify().n_records
    console.print(f"wrote {n} record(s) to {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# `cli.py audit report RUN [--audit PATH] [--out FILE]`


def add_report_subcommand(actions: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``audit`` subcommands."""
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
    r.set_defaults(func=run_report, usage_error=r.error)


def run_report(args: argparse.Namespace) -> int:
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
        atomic_write_text(out, render_run_html(info, draw_run_figures(info)))
    chain = info["chain"]
    status = "[green]intact[/]" if chain["ok"] else f"[bold red]BROKEN ({len(chain['problems'])} problem(s))[/]"
    console.print(f"Wrote {out} for run {run_id} ({len(info['records'])} records; audit chain {status}; "
                  f"{info['decision_check']})", highlight=False)
    return EXIT_OK
