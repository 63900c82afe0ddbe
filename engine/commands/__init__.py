"""CLI subcommands, one module each. Every module defines ``register(subparsers)``.

``register`` adds its subparser and sets ``func=run`` on it; ``run(args) -> int`` returns the exit
status. :mod:`engine.commands.main` lists the modules and runs a command line through
:mod:`engine.commands.dispatch`, which builds the parser and maps
:class:`engine.core.errors.TriageError` to exit status 1; ``cli.py`` only calls ``main``.
"""
