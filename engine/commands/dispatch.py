"""Build the ``cli.py`` parser from a list of command modules, run one command line, map errors to exit codes.

Every command module defines ``register(subparsers)``, which adds its subparser with
``func=run``; ``run(args) -> int`` returns the exit status. :class:`engine.core.errors.TriageError`
becomes exit status 1 with its message on stderr (:class:`~engine.core.errors.UsageError`: exit
status 2, as argparse's usage errors), and Ctrl-C exit status 130.

Used by :mod:`engine.commands.main` (every command, what ``cli.py`` runs) and by
:mod:`engine.commands.demo` (the commands the demo types), so that the demo runs its steps
exactly as the command line would without importing the table that imports it.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from types import ModuleType

from rich.markup import escape

from engine.console import err_console
from engine.core.errors import EXIT_ERROR, EXIT_TERMINATED, EXIT_USAGE, Terminated, TriageError, UsageError

__all__ = ["EPILOG", "build_parser", "run_command_line"]

DESCRIPTION = ("Keep a deployed CheXNet-style chest X-ray classifier healthy: monitor it on labelled "
               "data, choose the cheapest verified treatment under a YAML policy, and keep an audit trail.")

EPILOG = """\
exit status: 0 healthy, or treated and verified; 1 error; 2 usage error;
             3 issues remain that need a human's --approve (triage);
             4 issues remain untreated: every candidate failed verification or the budget ran out;
             130 interrupted (Ctrl-C); 143 stopped by SIGTERM (the run is recorded as interrupted).
See README.md for a walkthrough."""


def build_parser(commands: Sequence[ModuleType]) -> argparse.ArgumentParser:
    """The ``cli.py`` parser with the subcommands of ``commands``, in that order."""
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in commands:
        module.register(sub)
    return parser


def run_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) with ``parser`` and run the command; its exit status.

    Usage errors exit through argparse (``SystemExit(2)``), as on the command line.
    """
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    previous = _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except TriageError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    except Terminated:
        err_console.print("[bold red]stopped:[/] SIGTERM received; the run is recorded as interrupted",
                          highlight=False)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def _terminate_as_interrupt() -> object | None:
    """SIGTERM (a systemd stop, ``kill``) raises :class:`Terminated` in the main thread, so a run unwinds
    like Ctrl-C: its audit records close as interrupted and atomic writes leave no partial file.
    Returns the previous handler (None where signals cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)
