"""``cli.py correct``: a reader's report "image X is not L" through the triage loop, as its only fact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from engine.audit import AuditStore
from engine.commands.common import add_data_args, check_out_folder, load_data, load_model
from engine.commands.triage import EXIT_STATUS_HELP, render
from engine.console import console, plain_output, print_line
from engine.core.errors import UsageError
from engine.monitors.reported_fp import reports_from_args
from engine.triage import TriageOutcome, run_triage
from rules.policy import Policy, load_policy, policy_from_dict

__all__ = ["register", "run", "DEFAULT_POLICY"]

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "correct",
        help="surgically correct a reported false positive (a few weights of one classifier row)",
        description="Turn a reader's report (IMAGE is not LABEL) into a reported_fp fact and run it, as the "
        "only fact, through the triage loop: the policy's treatments for reported_fp (default: zeroing a few "
        "channels of LABEL's classifier row, then a threshold above the image, then classifier retraining) are "
        "applied to a copy, verified on the patient-disjoint verify split (every reported image's Δprob, true "
        "positives lost on fit and verify, LABEL's AUROC, the other labels' logits bit-identical) and accepted "
        "or escalated. Writes RUN_DIR/decision.json and, when the model changed, RUN_DIR/model.safetensors; a "
        "rejected correction is kept for review (never deployed) in RUN_DIR/candidates/.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="deployed model bundle (.safetensors)")
    add_data_args(p, default_split="test")
    p.add_argument("--image", required=True, action="append", metavar="NAME",
                   help="image reported as a false positive (a file name in the data; repeatable)")
    p.add_argument("--label", required=True, help="the finding the image(s) do not show")
    p.add_argument("--max-channels", type=int, metavar="K",
                   help="at most K channels zeroed (sets conditions.zeroing.max_channels and "
                   "params.zeroing.max_channels; default: the policy's, 10 in the default policy)")
    p.add_argument("--reporter", default="cli", help="who reported it, for the audit record (default: %(default)s)")
    p.add_argument("--note", default="", help="the reader's note, for the audit record")
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY,
                   help="policy YAML (default: policies/default.yaml of this tool)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="folder for decision.json and the "
                   "corrected model")
    p.add_argument("--audit", type=Path, metavar="PATH",
                   help="audit store (SQLite); default: audit.db next to RUN_DIR (RUN_DIR/../audit.db)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/verify split (default: %(default)s)")
    p.set_defaults(func=run)


def policy_with_cap(path: Path, max_channels: int | None) -> Policy:
    """The policy at ``path``, with ``--max-channels`` as both the rule's and the plugin's cap."""
    policy = load_policy(path)
    if max_channels is None:
        return policy
    if max_channels < 1:
        raise UsageError(f"--max-channels {max_channels}: must be at least 1")
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.setdefault("conditions", {}).setdefault("zeroing", {})["max_channels"] = max_channels
    data.setdefault("params", {}).setdefault("zeroing", {})["max_channels"] = max_channels
    return policy_from_dict(data, f"{path} (with --max-channels {max_channels})")


def _summary(outcome: TriageOutcome) -> list[str]:
    """One line per attempt: the channels zeroed (old weights), the bias, each image's Δprob, TPs lost."""
    lines = []
    for tr in outcome.decision["treatments"]:
        for a in tr["attempts"]:
            checks = {c["name"]: c for c in (a.get("verify") or {}).get("checks", [])}
            ch = a.get("changes") or {}
            if "reported_prob_fell" not in checks:
                continue
            what = a["chosen"]["intervention"]
            if ch.get("op") == "zero_classifier_weights":
                what += " of channel(s) " + ", ".join(f"{c} (w {v:+.4f})" for c, v in
                                                       zip(ch["channels"], ch["old_values"], strict=True))
                what += f", bias {ch['bias_old']:+.4f} -> {ch['bias_new']:+.4f}"
            images = "; ".join(f"{i['image']} Δprob {i['delta_prob']:+.4f}" + (" (crossed)" if i["crossed"] else "")
                               for i in checks["reported_prob_fell"].get("images", []))
            lost = f"TPs lost fit {checks['fit_tp_lost']['value']}, verify {checks.get('tp_lost', {}).get('value')}"
            lines.append(f"{a['result']}: {what}; {images}; {lost}; {checks['other_labels_logits_identical']['detail']}")
    return lines


def run(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
    bundle = load_model(args.model)
    dataset = load_data(args)
    policy = policy_with_cap(args.policy, args.max_channels)
    reports = reports_from_args(args.image, args.label, dataset, bundle.labels, args.reporter, args.note)
    out_dir: Path = args.out
    audit_path: Path = args.audit or out_dir.resolve().parent / "audit.db"
    header = (f"Correction of {len(reports)} reported false positive(s) of {escape(args.label)} by "
              f"[bold]{escape(args.model.name)}[/] on {len(dataset)} images of {escape(str(args.data))} "
              f"(split {dataset.split}) under policy {escape(policy.name)}")
    say = print_line if plain_output() else console.print
    say(header)
    with AuditStore(audit_path) as audit:
        outcome = run_triage(bundle, dataset, policy, seed=args.seed, audit=audit, out_dir=out_dir,
                             skip_bad=args.skip_bad, model_path=args.model, reports=reports, policy_monitors=False)
    if not outcome.decision["facts"]:
        say(f"nothing to correct: no reported image is predicted {escape(args.label)} by this model")
    for line in _summary(outcome):
        say(escape(line))
    render(outcome, out_dir=out_dir, audit_path=audit_path)
    return outcome.exit_code
