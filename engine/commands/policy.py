"""``cli.py policy validate|explain|revise|replay``: check a policy, read it as tables, revise its costs,
re-decide recorded runs under it (the computation of ``replay`` is :mod:`engine.replay`)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from engine.console import console, plain_output, print_line
from engine.core.errors import DataError, PolicyError
from engine.core.facts import ACTIONABLE_KINDS, IssueFact
from engine.core.storage import atomic_write_text

__all__ = ["register", "run", "explain_rows"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policy",
        help="validate a policy, explain which treatment each issue kind gets, revise its costs, replay audits",
        description="Work with a treatment policy (the YAML change-control plan): 'validate' checks it, "
        "'explain' shows, for each issue kind, the candidate treatments in the order they would be tried "
        "with their costs and conditions, and 'revise' proposes new costs from measured durations and "
        "outcomes in an audit store (as a diff; the policy file is never edited), and 'replay' re-decides the runs "
        "recorded in an audit store under another policy.",
    )
    actions = p.add_subparsers(dest="policy_action", metavar="ACTION")
    actions.required = True

    v = actions.add_parser("validate", help="check a policy file; print its name and content hash",
                           description="Validate a policy file. Exit status 0 when valid, 1 with the "
                           "file and key path of every problem otherwise.")
    v.add_argument("policy", type=Path, metavar="P", help="policy YAML file")
    v.set_defaults(func=run)

    e = actions.add_parser("explain", help="tables: candidates per issue kind, costs, conditions, default choice",
                           description="For each issue kind: the candidate interventions in selection order "
                           "(cost, then expected time, then name), each rule's conditions in words, and which one "
                           "would be chosen when every condition holds. Also lists per-label overrides.")
    e.add_argument("policy", type=Path, metavar="P", help="policy YAML file")
    e.set_defaults(func=run)

    r = actions.add_parser("revise", help="propose revised costs from an audit store's measured times/outcomes",
                           description="Propose a revised cost matrix from the wall times and outcomes of the "
                           "interventions recorded in an audit store (see rules/revise.py for the rule). Prints a "
                           "unified diff of the policy; never edits it.")
    r.add_argument("policy", type=Path, metavar="P", help="policy YAML file")
    r.add_argument("--audit", required=True, type=Path, metavar="DB",
                   help="audit store (SQLite), or a JSON Lines file of {intervention, wall_time_s, outcome}")
    r.add_argument("--out", type=Path, metavar="FILE", help="also write the diff here (not the policy itself)")
    r.add_argument("--min-observations", type=int, default=3,
                   help="timed attempts needed before an intervention's cost is revised (default: %(default)s)")
    r.set_defaults(func=run)

    _register_replay(actions)


def _register_replay(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "replay", help="re-decide the runs recorded in an audit store under another policy (no model, no data)",
        description="Rebuild every recorded run's issue facts from the audit store (each checked against its "
        "recorded fact id) and ask the rules of the policy given with --policy what they would have chosen first "
        "(candidates with their costs and the rules that proposed them, the cheapest chosen), beside the first "
        "decision recorded then and what was done then (attempts and outcome). Each decision is marked "
        "'identical' (same choice and candidates), 'same choice' (the same intervention at another cost, or other "
        "candidates), 'changed' (another intervention, or escalation instead of an automatic change), "
        "'undetermined' (it depends on what an older audit store does not record: whether the bundle had a "
        "compression history) or 'not recorded' (no decision then: an earlier treatment had resolved the issue). Reads only "
        "the record: answers 'had retraining been priced at 1, what would you have done?'. Runs that ended "
        "before monitoring are listed as skipped.",
        epilog="example: cli.py policy replay --audit T/audit.db --policy policies/cheap_retraining.yaml")
    p.add_argument("--audit", required=True, type=Path, metavar="DB", help="audit store (SQLite) written by triage")
    p.add_argument("--policy", required=True, type=Path, metavar="P2", dest="policy",
                   help="the policy to re-decide under (YAML)")
    p.add_argument("--run", action="append", default=[], metavar="RUN", dest="runs",
                   help="only this run (id, unique id prefix, or run folder with decision.json); repeatable; "
                        "default: every run in the store")
    p.add_argument("--json", action="store_true", help="print the replay as JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rules.policy import load_policy

    policy = load_policy(args.policy)
    if args.policy_action == "validate":
        return _validate(policy, args)
    if args.policy_action == "explain":
        return _explain(policy)
    if args.policy_action == "replay":
        return _replay(policy, args)
    return _revise(policy, args)


def _validate(policy: Any, args: argparse.Namespace) -> int:
    from rules.ruleset import rule_specs

    n_rules = len(rule_specs(policy))
    console.print(f"[bold green]OK[/] {escape(str(args.policy))}: policy {escape(policy.name)!s} "
                  f"version {escape(policy.version)}, sha256 {policy.content_hash}; "
                  f"{len(policy.treatments)} issue kinds, {n_rules} treatment rules, "
                  f"auto-approval up to cost {policy.approval.auto_max_cost:g}", highlight=False)
    return 0


def _favourable_fact(policy: Any, kind: str, label: str | None) -> IssueFact:
    """A fact of ``kind`` on which every applicability condition just holds (for 'what would be chosen')."""
    cond = policy.conditions_for(label)
    return IssueFact(kind=kind, monitor="policy explain", label=label, severity="medium",
                     message=f"hypothetical {kind} with every condition met",
                     measured={"auroc_intact": True, "positives": cond.partial_retrain.min_positives},
                     evidence={"n_channels_needed": 1})


def explain_rows(policy: Any, label: str | None = None) -> dict[str, Any]:
    """For each treated issue kind: candidates in order and the decision on a favourable fact."""
    from rules.decide import decide
    from rules.ruleset import rule_specs

    specs = {(s.kind, s.intervention): s for s in rule_specs(policy)}
    kinds = [k for k in ACTIONABLE_KINDS if k in policy.treatments]
    facts = [_favourable_fact(policy, k, label) for k in kinds]
    decisions = decide(facts, policy, run_id=f"explain-{policy.content_hash[:12]}",
                       context={"has_compression_history": True})
    out: dict[str, Any] = {}
    for kind, decision in zip(kinds, decisions, strict=True):
        names = sorted(policy.treatments_for(kind),
                       key=lambda n: (policy.cost(n, label), policy.expected_time(n), n))
        out[kind] = {
            "candidates": [{"intervention": n, "cost": policy.cost(n, label),
                            "expected_time_s": policy.expected_time(n),
                            "needs_approval": policy.needs_approval(policy.cost(n, label)),
                            "conditions": specs[(kind, n)].words()} for n in names],
            "chosen": decision.chosen.intervention if decision.chosen else None,
            "rationale": decision.rationale,
        }
    return out


def _explain(policy: Any) -> int:
    from rules.decide import format_duration

    where = f" ({policy.source_path})" if policy.source_path else ""
    console.print(f"[bold]Policy {escape(policy.name)}[/] version {escape(policy.version)}{escape(where)}, "
                  f"sha256 {policy.content_hash[:16]}…", highlight=False)
    if policy.description:
        console.print(escape(policy.description), highlight=False)
    rows = explain_rows(policy)
    table = Table(title="Candidates per issue kind, in the order they would be tried", show_lines=True)
    for col in ("issue kind", "#", "intervention", "default", "cost", "expected time", "approval", "proposed when"):
        table.add_column(col, justify="right" if col in ("#", "cost", "expected time") else "left")
    for kind, info in rows.items():
        if not info["candidates"]:
            table.add_row(kind, "", "(none: always escalated)", "", "", "", "", "")
        for i, c in enumerate(info["candidates"], 1):
            mark = "[bold green]chosen[/]" if c["intervention"] == info["chosen"] else ""
            table.add_row(kind if i == 1 else "", str(i), c["intervention"], mark, f"{c['cost']:g}",
                          format_duration(c["expected_time_s"]),
                          "needs --approve" if c["needs_approval"] else "automatic", escape(c["conditions"]))
    console.print(table)
    console.print("[bold]Default choice[/] (every condition met; a candidate whose condition fails is skipped and "
                  "the next one is tried; a rejected treatment is excluded and the next one is tried):")
    for kind, info in rows.items():
        console.print(f"  [bold]{kind}[/]: {escape(info['rationale'])}", highlight=False)
    console.print(f"Approval: costs above {policy.approval.auto_max_cost:g} need --approve NAME. Budget: at most "
                  f"{policy.budget.max_attempts_per_issue} attempts per issue, total cost "
                  f"{policy.budget.max_total_cost:g} per run. Acceptance: "
                  + ", ".join(f"{k}={v}" for k, v in policy.acceptance.model_dump().items()), highlight=False)

    if policy.labels:
        table = Table(title="Per-label overrides", show_lines=True)
        for col in ("label", "section", "override", "effect on the default choice"):
            table.add_column(col)
        for label, override in policy.labels.items():
            label_rows = explain_rows(policy, label) if override.costs else rows
            flips = [f"{k}: {rows[k]['chosen']} -> {v['chosen']}" for k, v in label_rows.items()
                     if v["chosen"] != rows[k]["chosen"]]
            first = True
            for section in ("costs", "acceptance", "conditions", "params", "monitors"):
                value = getattr(override, section)
                if not value:
                    continue
                table.add_row(label if first else "", section, escape(json.dumps(value, sort_keys=True)),
                              escape("; ".join(flips) or "none") if first else "")
                first = False
            if first:
                table.add_row(label, "", "(empty)", "none")
        console.print(table)
    return 0


def _read_observations(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: audit store not found")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {i} is not JSON ({exc.msg})") from None
        return out
    from engine.audit import AuditStore

    with AuditStore(path) as store:
        return store.observations()


def _revise(policy: Any, args: argparse.Namespace) -> int:
    from rules.decide import format_duration
    from rules.revise import revise_costs

    if args.out is not None and args.out.resolve() == args.policy.resolve():
        raise PolicyError(f"--out {args.out}: refusing to write over the policy itself; the revision is a "
                          "proposal to review and apply by hand")
    observations = _read_observations(args.audit)
    result = revise_costs(policy, observations, min_observations=args.min_observations)
    table = Table(title=f"Measured interventions ({len(observations)} attempts in {args.audit})")
    for col in ("intervention", "attempts", "accepted", "rejected", "errors", "median time", "cost", "proposed",
                "why"):
        table.add_column(col, justify="left" if col in ("intervention", "why") else "right")
    for r in result.rows:
        proposed = f"[bold]{r.new_cost:g}[/]" if r.changed else f"{r.new_cost:g}"
        table.add_row(r.intervention, str(r.n), str(r.accepted), str(r.rejected), str(r.errors),
                      "n/a" if r.median_time_s is None else format_duration(r.median_time_s), f"{r.old_cost:g}",
                      proposed, escape(r.reason))
    console.print(table)
    if result.skipped:
        console.print(f"[yellow]not in the policy's costs, skipped:[/] {escape(', '.join(result.skipped))}")
    if result.diff:
        console.print(Syntax(result.diff, "diff", theme="ansi_dark", background_color="default"))
        console.print("Review the diff and apply it by hand; the policy file was not changed.")
    else:
        console.print("No revision proposed: the measured costs match the policy.")
    if args.out is not None:
        atomic_write_text(args.out, result.diff)
        console.print(f"Wrote {escape(str(args.out))}")
    return 0


# --------------------------------------------------------------------------------------------
# `policy replay`

_VERDICT = {"identical": "[green]identical[/]", "same_choice": "[cyan]same choice[/], other cost or candidates",
            "changed": "[bold yellow]CHANGED[/]", "undetermined": "[magenta]undetermined[/]",
            "not_recorded": "not recorded then"}


def _cost_cell(view: Any, name: str) -> str:
    """One candidate's cost in a decision, marked when it is the one chosen (or the escalation)."""
    if view is None:
        return "(not recorded)" if name == "" else ""
    c = next((c for c in view.candidates if c.intervention == name), None)
    if c is None:
        return "—"
    text = f"{c.cost:g}" + (" needs --approve" if c.needs_approval else "")
    if view.chosen is not None and c.key == view.chosen.key:
        return f"[bold]{escape(text)} ← chosen[/]"
    if view.chosen is None:
        return f"[bold]{escape(text)} ← escalate[/]"
    return escape(text)


def _issue_cell(f: Any) -> str:
    done = "; ".join(f"{a.intervention or 'none'} {a.result}" for a in f.attempts) or "nothing tried"
    lines = [f"[bold]{escape(f'{f.kind} / {f.label or chr(8212)}')}[/] {escape(f'[{f.severity}]')}", _VERDICT[f.status],
             f"done then: {escape(done)}; outcome {escape(f.outcome or 'none recorded')}"]
    if f.note:
        lines.append(f"[dim]{escape(f.note)}[/]")
    return "\n".join(lines)


def _replay_title(run: Any) -> str:
    then = run.policy_then
    return (f"run {run.run_id}" + (f" (instance {run.instance})" if run.instance > 1 else "")
            + f": decided then under {then.get('name')} ({str(then.get('content_hash'))[:12]}), "
            f"outcome {run.outcome_then or 'unfinished'}")


def _fact_names(f: Any) -> tuple[list[Any], list[str]]:
    """The decisions shown for a fact and every intervention any of them names, in first-seen order."""
    views = [v for v in (f.under_p2, f.alternative, f.then) if v is not None]
    return views, list(dict.fromkeys(c.intervention for v in views for c in v.candidates))


def _replay_lines(run: Any, policy_name: str) -> None:
    """The replay table as unwrapped lines for a log: one per issue, then one per candidate."""
    print_line(escape(_replay_title(run)))
    for f in run.facts:
        print_line("issue " + "; ".join(_issue_cell(f).split("\n")))
        views, names = _fact_names(f)
        for name in names:
            rules = sorted({c.rule for v in views for c in v.candidates if c.intervention == name})
            alt = (f"; with a compression history {_cost_cell(f.alternative, name)}"
                   if f.alternative is not None else "")
            print_line(f"  candidate {escape(name)}: cost then {_cost_cell(f.then, name)}; under "
                       f"{escape(policy_name)} {_cost_cell(f.under_p2, name)}{alt}; proposed by "
                       f"{escape(', '.join(rules))}")


def _replay_table(run: Any, policy_name: str) -> Table:
    """One row per candidate of each issue: its cost then and under the policy, and the rule that proposed it."""
    title = _replay_title(run)
    alt = any(f.alternative is not None for f in run.facts)
    table = Table(title=escape(title))
    table.add_column("issue", ratio=3, overflow="fold")
    table.add_column("candidate", ratio=2, overflow="fold")
    table.add_column("cost then", ratio=2)
    table.add_column(f"cost under {policy_name}" + (" (no compression history)" if alt else ""), ratio=2)
    if alt:
        table.add_column("(with a compression history)", ratio=2)
    table.add_column("proposed by rule", ratio=3, overflow="fold")
    for f in run.facts:
        views, names = _fact_names(f)
        for i, name in enumerate(names):
            rules = sorted({c.rule for v in views for c in v.candidates if c.intervention == name})
            row = [_issue_cell(f) if i == 0 else "", escape(name), _cost_cell(f.then, name), _cost_cell(f.under_p2, name)]
            if alt:
                row.append(_cost_cell(f.alternative, name) if f.alternative is not None else "same")
            table.add_row(*row, escape(", ".join(rules)), end_section=i == len(names) - 1)
    return table


def _choice(view: Any) -> str:
    if view is None:
        return "no decision recorded"
    if view.chosen is None:
        return "escalate to a human"
    c = view.chosen
    return f"{c.intervention} (cost {c.cost:g}, rule {c.rule}{', needs --approve' if c.needs_approval else ''})"


def _change_line(f: Any, policy_name: str) -> str:
    line = f"{f.status}: {f.kind} / {f.label or 'model'}: then {_choice(f.then)}; under {policy_name} {_choice(f.under_p2)}"
    if f.alternative is not None:
        line += f" (with a compression history: {_choice(f.alternative)})"
    return line


def _replay(policy: Any, args: argparse.Namespace) -> int:
    from engine.audit import open_store
    from engine.replay import replay_audit

    with open_store(args.audit) as store:
        result = replay_audit(store, policy, args.runs)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
        return 0
    plain = plain_output()
    say = print_line if plain else functools.partial(console.print, highlight=False)
    say(f"[bold]Replay of {len(result.runs)} run(s)[/] from {escape(str(args.audit))} under policy "
        f"{escape(policy.name)} version {escape(policy.version)} (sha256 {policy.content_hash[:16]}…); "
        "first decisions, from the record alone")
    for run in result.runs:
        if run.same_policy:
            say(f"run {run.run_id}: decided then under this same policy")
        for note in run.context_notes:
            say(f"[yellow]run {run.run_id}: {escape(note)}[/]")
        if not run.facts:
            say(f"run {run.run_id}: no actionable facts then; nothing to decide")
            continue
        if plain:
            _replay_lines(run, policy.name)
        else:
            console.print(_replay_table(run, policy.name))
        for f in run.facts:
            if f.status in ("changed", "undetermined"):
                say(escape(_change_line(f, policy.name)))
    for s in result.skipped:
        say(f"[yellow]skipped[/] {escape(s.reason)}")
    counts = result.counts()
    total = sum(counts.values())
    say(f"{total} decision(s): " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n)
        if total else "no decisions to compare")
    return 0
