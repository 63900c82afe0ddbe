"""``cli.py triage``: monitor → decide → apply to a copy → verify → accept or escalate, with an audit trail."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from engine.audit import AuditStore
from engine.commands.common import add_data_args, check_out_folder, load_data, load_model
from engine.console import console, err_console, plain_output, print_line, progress_task
from engine.core.errors import EXIT_NEEDS_APPROVAL, EXIT_OK, EXIT_USAGE
from engine.monitors.reported_fp import read_reports
from engine.triage import EXIT_UNTREATED, TriageOutcome, run_triage
from rules.policy import Policy, load_policy

__all__ = ["register", "run", "EXIT_STATUS_HELP"]

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}  healthy, or every issue treated and verified (also: --dry-run with a plan needing no approval)
  1  error (bad model, data, policy or audit store; the message says which)
  2  usage error
  {EXIT_NEEDS_APPROVAL}  issues remain whose next treatment needs a human's --approve NAME (cron alert)
  {EXIT_UNTREATED}  issues remain untreated: every candidate failed verification, none is applicable,
     or the policy's budget ran out (takes precedence over {EXIT_NEEDS_APPROVAL})"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "triage",
        help="find issues, choose the cheapest verified treatment under a policy, keep an audit trail",
        description="Run the policy's monitors on a labelled validation set, let the rules propose "
        "treatments, apply the cheapest to a copy of the model (learning only from a FIT half), verify it "
        "on the patient-disjoint VERIFY half, and accept it or roll back and escalate to the next "
        "candidate. Writes RUN_DIR/decision.json (every issue, candidate, cost, rule, choice, check and "
        "outcome; byte-identical for the same inputs and seed), RUN_DIR/model.safetensors when the model "
        "changed, and appends every step to the audit store.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="deployed (compressed) model bundle (.safetensors)")
    add_data_args(p, default_split="test")
    p.add_argument("--policy", required=True, type=Path, help="policy YAML (cost matrix, acceptance, approval)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="folder for decision.json and the "
                   "treated model")
    p.add_argument("--approve", action="extend", nargs="+", default=[], metavar="NAME",
                   help="intervention(s) a human approves for this run even above the policy's automatic cost "
                   "ceiling (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="monitor and decide only; write the plan, apply nothing")
    p.add_argument("--audit", type=Path, metavar="PATH",
                   help="audit store (SQLite); default: audit.db next to RUN_DIR (RUN_DIR/../audit.db)")
    p.add_argument("--parent", type=Path, metavar="PARENT",
                   help="the uncompressed parent bundle (compression-fidelity checks and re-optimisation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/verify split and the treatments "
                   "(default: %(default)s)")
    p.add_argument("--reports", type=Path, metavar="FILE.csv",
                   help="readers' false-positive reports (columns image,label,reporter,note): each label's "
                   "reports become one reported_fp fact, treated like the monitors' facts")
    p.set_defaults(func=run)


def _load_policy(path: Path) -> Policy:
    return load_policy(path)


def _check_approve(names: list[str]) -> list[str]:
    from interventions.registry import available_interventions

    known = available_interventions()
    unknown = sorted(set(names) - set(known))
    if unknown:
        err_console.print(f"[bold red]usage error:[/] --approve: unknown intervention(s) {', '.join(unknown)}; "
                          f"expected some of: {', '.join(known)}", highlight=False)
    return unknown


def _fmt_cost(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return "?"


_OUTCOME_STYLE = {
    "treated": "green", "resolved_earlier": "green", "planned": "cyan", "needs_approval": "yellow",
    "exhausted": "red", "no_candidate": "red", "budget_exhausted": "red",
}


def _steps(tr: dict[str, Any]) -> tuple[list[str], float]:
    """The attempts of one treatment as ``intervention -> result`` and the cost they spent."""
    steps, cost = [], 0.0
    for a in tr["attempts"]:
        chosen = a.get("chosen")
        if chosen is None:
            continue
        steps.append(f"{chosen['intervention']} -> {a.get('result')}")
        if a.get("result") in ("accepted", "rejected", "error"):
            cost += float(chosen.get("cost") or 0.0)
    return steps, cost


def _issue_table(d: dict[str, Any]) -> Table:
    """The rich table of a terminal: issues, candidates, decision, cost, outcome."""
    table = Table(title=f"triage run {d['run_id']} — policy {escape(d['policy']['name'])}", show_lines=True)
    for col in ("issue", "candidates (cost)", "decision", "cost", "outcome"):
        table.add_column(col, justify="right" if col == "cost" else "left")
    for tr in d["treatments"]:
        issue = f"[bold]{tr['kind']}[/]\n{escape(tr['label'] or 'model')} ({tr['severity']})"
        first = tr["attempts"][0] if tr["attempts"] else {}
        cands = "\n".join(f"{escape(str(c.get('intervention')))} {_fmt_cost(c.get('cost'))}"
                          for c in first.get("candidates", [])) or "—"
        steps, cost = _steps(tr)
        style = _OUTCOME_STYLE.get(tr["outcome"], "white")
        table.add_row(issue, cands, "\n".join(escape(s.replace(" -> ", " → ")) for s in steps) or "—",
                      _fmt_cost(cost), f"[{style}]{tr['outcome']}[/]")
    return table


def _plain_issues(d: dict[str, Any]) -> None:
    """One unwrapped line per issue for a log (stdout not a terminal): kind, label, decision, outcome."""
    print_line(f"triage run {d['run_id']}, policy {d['policy']['name']}: {len(d['treatments'])} actionable "
               "issue(s)", markup=False)
    for tr in d["treatments"]:
        steps, cost = _steps(tr)
        print_line(f"issue {tr['kind']} {tr['label'] or 'model'} ({tr['severity']}): decision "
                   f"{', '.join(steps) or 'none'}; cost {_fmt_cost(cost)}; outcome {tr['outcome']}", markup=False)


def render(outcome: TriageOutcome, *, out_dir: Path, audit_path: Path) -> None:
    """The final summary: a table on a terminal, one line per issue in a log; then the closing lines."""
    d = outcome.decision
    plain = plain_output()

    def say(text: str, **kw: Any) -> None:
        if plain:
            print_line(text)
        else:
            console.print(text, **kw)

    if d["treatments"]:
        if plain:
            _plain_issues(d)
        else:
            console.print(_issue_table(d))
    treated_ids = {t["fact_id"] for t in d["treatments"]}
    info = [f for f in d["facts"] if f["fact_id"] not in treated_ids]
    if info:
        by_kind: dict[str, list[str]] = {}
        for f in info:
            by_kind.setdefault(f["kind"], []).append(f.get("label") or "model")
        say("informational: " + "; ".join(
            f"{kind} ({len(v)}: {', '.join(v[:6])}{' …' if len(v) > 6 else ''})" for kind, v in by_kind.items()),
            highlight=False)
    _closing(outcome, audit_path, say)


def _closing(outcome: TriageOutcome, audit_path: Path, say: Callable[[str], None]) -> None:
    """Outcome, model hashes, files written, the audit store and what needs approval."""
    d, m = outcome.decision, outcome.decision["model"]
    style = {"healthy": "green", "treated": "green", "planned": "cyan", "needs_approval": "yellow"}.get(
        outcome.outcome, "red")
    say(f"outcome: [bold {style}]{outcome.outcome}[/] (exit {outcome.exit_code}); "
        f"{len(d['facts'])} fact(s), {len(d['treatments'])} actionable; "
        f"verify split {d['data']['verify']['n_images']} images / fit {d['data']['fit']['n_images']}")
    say(f"model {m['before'][:16]} → {m['after'][:16]}" + (" (changed)" if m["changed"] else " (unchanged)"))
    say(escape(f"wrote {outcome.decision_path}" + (f" and {outcome.model_path}" if outcome.model_path else "")))
    say(escape(f"audit: {audit_path}"))
    if d["remaining_facts"]:
        say(f"[yellow]{len(d['remaining_facts'])} actionable issue(s) still detected on the whole set "
            "after this run[/]: " + ", ".join(f"{f['kind']}/{f.get('label') or 'model'}"
                                             for f in d["remaining_facts"]))
    approvals = sorted({a["plan"]["intervention"] for t in d["treatments"] for a in t["attempts"]
                        if a.get("result") == "needs_approval"})
    if approvals:
        say("[yellow]needs approval:[/] rerun with " + " ".join(f"--approve {n}" for n in approvals))


def run(args: argparse.Namespace) -> int:
    if args.approve and _check_approve(args.approve):
        return EXIT_USAGE
    check_out_folder(args.out)
    bundle = load_model(args.model)
    dataset = load_data(args)
    policy = _load_policy(args.policy)
    parent = load_model(args.parent) if args.parent else None
    reports = read_reports(args.reports, dataset, bundle.labels) if args.reports else []
    out_dir: Path = args.out
    audit_path: Path = args.audit or out_dir.resolve().parent / "audit.db"
    header = (f"Triage of [bold]{escape(args.model.name)}[/] on {len(dataset)} images of {escape(str(args.data))} "
              f"(split {dataset.split}) under policy {escape(policy.name)}" + (" — dry run" if args.dry_run else ""))
    if plain_output():  # a log line is never wrapped
        print_line(header)
    else:
        console.print(header)
    with ExitStack() as stack, AuditStore(audit_path) as audit:
        current: dict[str, Any] = {"stage": None, "cb": None}

        def progress(stage: str, done: int, total: int) -> None:
            if stage != current["stage"]:
                stack.close()
                current["stage"] = stage
                current["cb"] = stack.enter_context(progress_task(stage, total or None))
            current["cb"](done, total or None)

        outcome = run_triage(bundle, dataset, policy, seed=args.seed, approve=args.approve, dry_run=args.dry_run,
                             parent=parent, audit=audit, out_dir=out_dir, progress=progress,
                             skip_bad=args.skip_bad, model_path=args.model, parent_path=args.parent,
                             reports=reports)
        stack.close()
    render(outcome, out_dir=out_dir, audit_path=audit_path)
    return outcome.exit_code
