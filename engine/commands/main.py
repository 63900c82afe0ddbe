"""The whole command line: every command module, in ``--help`` order, and ``main(argv)``.

``cli.py`` calls :func:`main`; nothing else should (commands that run other commands, like
``demo``, use :mod:`engine.commands.dispatch` with the modules they need).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import engine.commands.analyze as analyze
import engine.commands.audit as audit
import engine.commands.backtest as backtest
import engine.commands.compress as compress
import engine.commands.correct as correct
import engine.commands.demo as demo
import engine.commands.evaluate as evaluate
import engine.commands.import_checkpoint as import_checkpoint
import engine.commands.inject as inject
import engine.commands.monitor as monitor
import engine.commands.phantom as phantom
import engine.commands.policy as policy
import engine.commands.report as report
import engine.commands.train as train
import engine.commands.triage as triage
from engine.commands.dispatch import build_parser as build_parser_for
from engine.commands.dispatch import run_command_line

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: Every command; the order here is the order in ``--help``.
COMMAND_MODULES = (demo, phantom, inject, train, import_checkpoint, evaluate, compress, monitor, triage, correct,
                   backtest, audit, policy, analyze, report)


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(COMMAND_MODULES)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: ``sys.argv[1:]``); returns the exit status."""
    return run_command_line(build_parser(), argv)
