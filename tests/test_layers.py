"""The one-way house, asserted from the source: each floor imports only the floors below it.

Read from every module's AST (imports at any depth, lazy ones inside functions included, and
``importlib.import_module("...")`` calls with a literal name), so a rule cannot be dodged by moving
an import into a function. The floors, bottom to top (docs: README "Layout"):

    engine.core < model < interventions < rules < engine (monitors, triage, audit, reports)
    < engine.commands < cli
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "rules", "interventions", "model")
MAX_MODULE_LINES = 600
#: Longest function, in lines, before it must become named steps (the design notes' "~80").
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    target: str  # the module imported, fully qualified
    line: int
    lazy: bool  # inside a function


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [ROOT / "cli.py", *(p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))]
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not level:
        return name or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _project_module(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the project (``a.b.func`` -> ``a.b``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in SOURCES:
            return candidate
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path) -> None:
        self.module, self.path, self.depth = module, path, 0
        self.found: list[Import] = []
        self.guarded: list[tuple[int, str]] = []  # (line, module) imports inside try/except ImportError

    def _add(self, dotted: str, line: int) -> None:
        target = _project_module(dotted)
        if target is not None and target != self.module:
            self.found.append(Import(target, line, self.depth > 0))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.path, node.level, node.module)
        for alias in node.names:
            # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module.
            self._add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            self._add(str(node.args[0].value), node.lineno)
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        catches = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            catches |= {getattr(t, "id", getattr(t, "attr", "")) for t in types if t is not None}
        if catches & {"ImportError", "ModuleNotFoundError"}:
            before = len(self.found)
            for stmt in node.body:
                self.visit(stmt)
            self.guarded += [(imp.line, imp.target) for imp in self.found[before:]]
            for part in (*node.handlers, *node.orelse, *node.finalbody):
                self.visit(part)
        else:
            self.generic_visit(node)


def _imports() -> dict[str, tuple[list[Import], list[tuple[int, str]]]]:
    out = {}
    for module, path in SOURCES.items():
        collector = _Collector(module, path)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out[module] = (collector.found, collector.guarded)
    return out


IMPORTS = _imports()


def _floor(module: str) -> str:
    """Which floor a module lives on."""
    if module == "cli":
        return "cli"
    if module == "engine.core" or module.startswith("engine.core."):
        return "core"
    if module == "engine.commands" or module.startswith("engine.commands."):
        return "commands"
    return module.split(".")[0]  # engine (orchestration), rules, interventions, model


#: What each floor may import (besides itself).
ALLOWED = {
    "core": set(),
    "model": {"core"},
    "interventions": {"core", "model"},
    "rules": {"core", "model", "interventions"},
    "engine": {"core", "model", "interventions", "rules"},
    "commands": {"core", "model", "interventions", "rules", "engine"},
    "cli": {"core", "commands"},
}


def _violations() -> Iterator[str]:
    for module, (found, _) in IMPORTS.items():
        floor = _floor(module)
        for imp in found:
            other = _floor(imp.target)
            if other != floor and other not in ALLOWED[floor]:
                where = f"{SOURCES[module].relative_to(ROOT)}:{imp.line}"
                yield f"{where}: {module} ({floor}) imports {imp.target} ({other}){' lazily' if imp.lazy else ''}"


def test_floors_import_only_downwards() -> None:
    assert list(_violations()) == []


def test_nothing_imports_cli() -> None:
    users = [m for m, (found, _) in IMPORTS.items() for imp in found if imp.target == "cli"]
    assert users == []


def test_core_imports_nothing_of_the_project_above_it() -> None:
    for module, (found, _) in IMPORTS.items():
        if _floor(module) == "core":
            assert {_floor(i.target) for i in found} <= {"core"}, module


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), lazy imports included."""
    graph = {m: sorted({i.target for i in found}) for m, (found, _) in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_submodules_do_not_import_their_own_package_init() -> None:
    """A package's ``__init__`` re-exports its submodules; a submodule importing that ``__init__``
    would import itself half-initialised (the cycle a refactor re-creates most easily)."""
    bad = []
    for module, (found, _) in IMPORTS.items():
        for imp in found:
            if module.startswith(imp.target + ".") and SOURCES[imp.target].name == "__init__.py":
                bad.append(f"{module} imports its package {imp.target}")
    assert bad == []


def test_no_import_error_fallbacks_around_project_modules() -> None:
    guarded = [f"{SOURCES[m].relative_to(ROOT)}:{line}: {target}" for m, (_, g) in IMPORTS.items()
               for line, target in g]
    assert guarded == []


def test_no_module_over_the_size_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in SOURCES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _long_functions() -> Iterator[str]:
    for path in SOURCES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_over_the_length_limit() -> None:
    assert list(_long_functions()) == []


# -- the checker itself must be able to fail ------------------------------------------------------

@pytest.mark.parametrize(("source", "module", "expected"), [
    ("from engine.triage import run_triage\n", "model.x", "engine"),
    ("def f():\n    import rules.policy\n", "interventions.x", "rules"),
    ("import importlib\nimportlib.import_module('engine.audit')\n", "rules.x", "engine"),
])
def test_checker_sees_upward_imports_even_lazy_ones(source: str, module: str, expected: str) -> None:
    fake = ROOT / (module.replace(".", "/") + ".py")
    collector = _Collector(module, fake)
    collector.visit(ast.parse(source))
    assert expected in {_floor(i.target) for i in collector.found}


def test_checker_sees_an_import_error_fallback() -> None:
    collector = _Collector("model.x", ROOT / "model/x.py")
    collector.visit(ast.parse("try:\n    import model.bundle\nexcept ImportError:\n    pass\n"))
    assert collector.guarded == [(2, "model.bundle")]
