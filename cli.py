#!/usr/bin/env python3
"""cxr-triage: a rule-driven treatment decision engine for a deployed chest X-ray classifier.

Run ``python cli.py --help`` for the commands. This file only makes the repository importable and
hands the command line to :func:`engine.commands.main.main`, which parses it, dispatches to
``engine.commands.<command>`` and maps errors to exit codes (see ``engine.core.errors``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.core.errors import RulesEngineUnavailable  # noqa: E402

try:
    from engine.commands.main import build_parser, main  # noqa: E402
except RulesEngineUnavailable as exc:  # durable-rules cannot load here: say how to rebuild it, no traceback
    if __name__ != "__main__":
        raise
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
