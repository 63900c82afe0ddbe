"""CLI subcommands, one module each. Every module defines ``register(subparsers)``.

``register`` adds its subparser and sets ``func=run`` on it; ``run(args) -> int`` returns the exit
status. ``cli.py`` stays thin: it builds the parser from :data:`COMMAND_MODULES`, dispatches, and
maps :class:`engine.core.errors.TriageError` to exit status 1.
"""

from __future__ import annotations

#: Order here is the order in ``--help``; a module that is not there yet is skipped.
COMMAND_MODULES = (
    "engine.commands.demo",
    "engine.commands.phantom",
    "engine.commands.inject",
    "engine.commands.train",
    "engine.commands.evaluate",
    "engine.commands.compress",
    "engine.commands.monitor",
    "engine.commands.triage",
    "engine.commands.audit",
    "engine.commands.policy",
    "engine.commands.analyze",
    "engine.commands.report",
)
