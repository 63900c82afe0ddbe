"""``cli.py policy validate|explain|revise``: check a policy, read it as tables, revise its costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from engine.console import console
from engine.core.errors import DataError, PolicyError
from engine.core.facts import ACTIONABLE_KINDS, IssueFact
from engine.core.storage import atomic_write_text

__all__ = ["register", "run", "explain_rows"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policy",
        help="validate a policy, explain which treatment each issue kind gets, revise its costs",
        description="Work with a treatment policy (the YAML change-control plan): 'validate' checks it, "
        "'explain' shows, for each issue kind, the candidate treatments in the order they would be tried "
        "with their costs and conditions, and 'revise' proposes new costs from measured durations and "
        "outcomes in an audit store (as a diff; the policy file is never edited).",
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


def run(args: argparse.Namespace) -> int:
    from rules.policy import load_policy

    policy = load_policy(args.policy)
    if args.policy_action == "validate":
        return _validate(policy, args)
    if args.policy_action == "explain":
        return _explain(policy)
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
