"""``cli.py backtest``: how often a policy heals and how often it harms, on patients triage never saw."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from engine.backtest import (
    BASELINES,
    CLEAN,
    build_document,
    contenders,
    load_scenarios,
    run_backtest,
    scenarios_from_flags,
    write_document,
)
from engine.commands.common import check_out_folder
from engine.console import console, plain_output, print_line, progress_task
from engine.core.errors import EXIT_OK, EXIT_USAGE
from model.data.faults import FAULT_SYNTAX
from rules.policy import load_policy

__all__ = ["register", "run"]

EPILOG = """\
Each scenario's dataset split is divided patient-disjoint into an AUDIT part (triage sees it) and a
HOLDOUT part (only the judge sees it); the fault is injected into each with fresh randomness. Every
policy triages the audit part; the baselines treat it naively; each treated model is judged on the
holdout with and without the fault. Clean controls run beside every fault. Runs that wait for a
human are run once more with the escalation approved (--no-approved-reruns skips that).

outputs: OUT/backtest.json (every verdict, rates with 95 % Wilson intervals, targets), OUT/backtest.html,
OUT/runs/<scenario>/<policy>/decision.json, OUT/audit.db (every triage; `policy replay` reads it),
OUT/results/*.json (one per scenario and contender: a killed backtest resumes from them).

faults: """ + "; ".join(FAULT_SYNTAX) + f"; {CLEAN} (no fault)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backtest", help="measure how often a policy heals and harms on held-out patients, against naive baselines",
        description="Triage faulted copies of a labelled dataset under each policy and judge every decision on "
        "patients triage never saw, against no_action, always_threshold and always_retrain.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("scenarios (either --scenarios, or --model/--data/--faults)")
    src.add_argument("--scenarios", type=Path, metavar="YAML", help="scenarios file: scenarios: [{model, data, "
                     "faults: [...], seeds, split, name, holdout_fraction}] (paths relative to the file)")
    src.add_argument("--model", type=Path, help="model bundle audited in every scenario")
    src.add_argument("--shortcut-model", type=Path, metavar="M",
                     help="model that learned the shortcut: audited in shortcut:LABEL scenarios instead of --model")
    src.add_argument("--data", type=Path, help="labelled NIH-layout dataset (its --split is divided)")
    src.add_argument("--split", default="test", choices=["train_val", "test", "all"],
                     help="which split of --data to divide into audit and holdout (default: %(default)s)")
    src.add_argument("--faults", nargs="+", metavar="SPEC", help="fault specs (see below); a clean control per "
                     "model and seed is always added")
    src.add_argument("--seeds", type=int, default=3, help="seeds per fault, 0..N-1 (default: %(default)s)")
    src.add_argument("--holdout-fraction", type=float, default=0.5,
                     help="share of patients in the holdout part (default: %(default)s)")
    p.add_argument("--policy", type=Path, action="append", required=True, metavar="YAML",
                   help="policy to backtest (repeatable); the first also judges the baselines")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES),
                   help="naive policies to compare against (default: all)")
    p.add_argument("--out", type=Path, required=True, help="output folder (re-run to resume)")
    p.add_argument("--no-approved-reruns", action="store_true",
                   help="do not re-run escalated scenarios with the escalation approved")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples per interval "
                   "(default: %(default)s)")
    p.set_defaults(func=run)


def _scenarios(args: argparse.Namespace) -> list | None:
    if args.scenarios is not None:
        if args.model or args.data or args.faults:
            console.print("[bold red]usage error:[/] give --scenarios or --model/--data/--faults, not both")
            return None
        return load_scenarios(args.scenarios)
    missing = [f for f, v in (("--model", args.model), ("--data", args.data), ("--faults", args.faults)) if not v]
    if missing:
        console.print(f"[bold red]usage error:[/] missing {', '.join(missing)} (or give --scenarios YAML)")
        return None
    if args.seeds < 1 or not 0 < args.holdout_fraction < 1:
        console.print("[bold red]usage error:[/] --seeds must be >= 1 and --holdout-fraction in (0, 1)")
        return None
    return scenarios_from_flags(args.model, args.data, args.split, args.faults, args.seeds,
                                shortcut_model=args.shortcut_model, holdout_fraction=args.holdout_fraction)


def _rate(r: dict | None) -> str:
    return "n/a" if not r or not r["n"] else f"{r['k']}/{r['n']} [{r['low']:.0%}-{r['high']:.0%}]"


def _rate_lines(s: dict) -> None:
    """The rates table as unwrapped lines for a log: one per fault kind and contender."""
    print_line("backtest: rates on the holdout (95 % Wilson intervals)", markup=False)
    for k in s["fault_kinds"]:
        for c in s["contenders"]:
            r = s["by_fault"][k][c]
            print_line(f"fault {k} contender {c}: n {r['n']}; healed {_rate(r['healed'])}; harmed "
                       f"{_rate(r['harmed'])}; escalated {_rate(r['escalated'])}; changed {_rate(r['changed'])}; "
                       f"mean cost {r['mean_cost']:.2f}", markup=False)


def _render(doc: dict) -> None:
    s = doc["summary"]
    if plain_output():
        _rate_lines(s)
    else:
        console.print(_rate_table(s))
    say = print_line if plain_output() else console.print
    for e in s["errors"]:
        say(f"[red]could not run[/] {escape(e['scenario'])} / {escape(e['contender'])}: {escape(e['error'])}")
    for t in doc["targets"]:
        unmet = [c["target"] for c in t["checks"] if not c["met"]]
        say(f"{escape(t['policy'])}: " + ("[green]every target met[/]" if not unmet else
                                          "[yellow]not met:[/] " + escape("; ".join(unmet))))


def _rate_table(s: dict) -> Table:
    table = Table(title="backtest: rates on the holdout (95 % Wilson intervals)")
    for col in ("fault", "contender", "n", "healed", "harmed", "escalated", "changed", "cost"):
        table.add_column(col)
    for k in s["fault_kinds"]:
        for c in s["contenders"]:
            r = s["by_fault"][k][c]
            table.add_row(k, c, str(r["n"]), _rate(r["healed"]), _rate(r["harmed"]), _rate(r["escalated"]),
                          _rate(r["changed"]), f"{r['mean_cost']:.2f}")
    return table


def run(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
    scenarios = _scenarios(args)
    if scenarios is None:
        return EXIT_USAGE
    policies = [load_policy(p) for p in args.policy]
    who = contenders(policies, args.baselines)
    console.print(f"Backtest: {len(scenarios)} scenario(s) x {len(who)} contender(s) into {escape(str(args.out))}")
    with progress_task("backtest", len(scenarios) * len(who)) as bar:
        results = run_backtest(scenarios, who, args.out, approve_escalations=not args.no_approved_reruns,
                               n_boot=args.bootstrap, progress=lambda done, total, what: bar(done, total))
    doc = build_document(scenarios, who, results)
    json_path, html_path = write_document(args.out, doc)
    _render(doc)
    console.print(f"wrote {json_path} and {html_path}")
    return EXIT_OK
