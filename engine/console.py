"""Shared rich console and progress bars for the CLI (library code never prints)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["console", "err_console", "plain_output", "print_line", "progress_task"]

#: Width from ``COLUMNS`` when set (rich reads it), else the terminal's, else 80.
console = Console()
err_console = Console(stderr=True)


def plain_output() -> bool:
    """Whether stdout is not a terminal (a cron log, a pipe, a file).

    Wide tables are then printed as plain lines instead: rich would wrap them at 80 columns into
    fragments nobody can grep. rich's own switches force terminal mode (``TTY_COMPATIBLE=1``,
    ``FORCE_COLOR``); ``COLUMNS`` sets the width of the tables in terminal mode.
    """
    return not console.is_terminal


def print_line(text: str, *, markup: bool = True) -> None:
    """One logical line on stdout, never wrapped or cropped whatever the console's width."""
    console.print(text, soft_wrap=True, highlight=False, markup=markup)


@contextmanager
def progress_task(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields a ``progress(done, total)`` callback for library code.

    Disabled when stderr is not a terminal and ``CXR_TRIAGE_PROGRESS`` is not set, so logs and CI
    output stay clean.
    """
    enabled = sys.stderr.isatty() or bool(os.environ.get("CXR_TRIAGE_PROGRESS"))
    if not enabled:
        yield lambda done, total=None: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, total_: int | None = None) -> None:
            progress.update(task, completed=done, total=total_ if total_ is not None else total)

        yield update
