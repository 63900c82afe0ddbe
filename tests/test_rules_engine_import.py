"""Where durable-rules cannot load (Python 3.13 removed a C API it calls), every command says how to rebuild it."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import RulesEngineUnavailable
from rules.durable_import import REBUILD_COMMAND, durable_modules

ROOT = Path(__file__).resolve().parents[1]


def test_the_undefined_symbol_of_python_313_gets_the_rebuild_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("durable"):
            raise ImportError("durable_rules_engine.cpython-313-x86_64-linux-gnu.so: undefined symbol: PyEval_CallObject")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(RulesEngineUnavailable) as err:
        durable_modules()
    assert "PyEval_CallObject" in str(err.value) and REBUILD_COMMAND in str(err.value)
    assert "CPPFLAGS=-DPyEval_CallObject=PyObject_CallObject" in REBUILD_COMMAND  # setup.py overwrites CFLAGS


def test_a_command_exits_with_the_message_not_a_traceback() -> None:
    code = ("import sys, runpy; [sys.modules.__setitem__(n, None) for n in ('durable', 'durable.lang', "
            "'durable.engine')]; sys.argv = ['cli.py', 'policy', 'validate', 'policies/default.yaml']; "
            "runpy.run_path('cli.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "the rules engine (durable-rules) cannot load" in done.stderr
    assert "pip install durable-rules==2.0.28" in done.stderr
