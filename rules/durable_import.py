"""The one import of durable-rules, with a message a site can act on where it cannot load.

durable-rules 2.0.28 (unmaintained since 2020) ships only a source package whose C extension
calls ``PyEval_CallObject``, which Python 3.13 removed: on 3.13 it installs, then every import
fails with ``undefined symbol: PyEval_CallObject``. Built with that name mapped onto its
replacement it works (its ``setup.py`` overwrites ``CFLAGS`` but not ``CPPFLAGS``). Rather than an
``ImportError`` traceback, every command then stops with :class:`RulesEngineUnavailable` giving
the rebuild command. ``.ci/check_rules_engine`` builds and runs it on every Python the machine has.
"""

from __future__ import annotations

import sys
from types import ModuleType

from engine.core.errors import RulesEngineUnavailable

__all__ = ["REBUILD_COMMAND", "durable_modules"]

#: Rebuilds durable-rules from source with the removed C API name mapped onto its replacement.
REBUILD_COMMAND = ("CPPFLAGS=-DPyEval_CallObject=PyObject_CallObject pip install --force-reinstall --no-deps "
                   "--no-cache-dir --no-binary durable-rules durable-rules==2.0.28")


def durable_modules() -> tuple[ModuleType, ModuleType]:
    """``(durable.lang, durable.engine)``, or :class:`RulesEngineUnavailable` saying how to rebuild it."""
    try:
        from durable import engine, lang
    except ImportError as exc:  # a third-party C extension: not one of the project's modules
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        hint = (f"rebuild it for this interpreter: {REBUILD_COMMAND}" if "PyEval_CallObject" in str(exc)
                else f"install it: pip install durable-rules==2.0.28 (a C compiler is needed); on Python 3.13 "
                     f"and later: {REBUILD_COMMAND}")
        raise RulesEngineUnavailable(f"the rules engine (durable-rules) cannot load on Python {version}: {exc}; "
                                     f"{hint}") from None
    return lang, engine
