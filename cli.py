#!/usr/bin/env python3
"""cxr-triage: a rule-driven treatment decision engine for a deployed chest X-ray classifier.

Run ``python cli.py --help`` for the commands. This file only parses arguments, dispatches to
``engine.commands.<command>`` and maps errors to exit codes (see ``engine.core.errors``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.commands import COMMAND_MODULES  # noqa: E402
from engine.core.errors import EXIT_ERROR, EXIT_USAGE, TriageError  # noqa: E402

EPILOG = """\
exit status: 0 healthy, or treated and verified; 1 error; 2 usage error;
             3 issues remain that need a human's --approve (triage);
             4 issues remain untreated: every candidate failed verification or the budget ran out.
See README.md for a walkthrough."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description="Keep a deployed CheXNet-style chest X-ray classifier healthy: monitor it on labelled "
        "data, choose the cheapest verified treatment under a YAML policy, and keep an audit trail.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except TriageError as exc:
        from rich.markup import escape

        from engine.console import err_console

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
