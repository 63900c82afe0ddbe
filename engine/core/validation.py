"""One validation system: pydantic models, with pre-commit style messages that name the key path.

Every file a user writes (policy YAML, monitor settings, intervention parameters) is validated by a
pydantic model, and every failure is reported the same way, naming the file and the path to the
fault instead of dumping pydantic's own wording::

    policies/x.yaml: ==> At key: costs ==> At key: zeroing: must be a number >= 0, got -1

YAML is read with a SafeLoader subclass that also refuses duplicate keys (PyYAML silently keeps the
last one), so a typo can never fall back to a default unnoticed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from engine.core.errors import PolicyError, TriageError

__all__ = [
    "LocatedError",
    "deep_merge",
    "validate_into",
    "collect_problems",
    "format_validation_error",
    "show_value",
    "parse_yaml",
]


class LocatedError(ValueError):
    """Validation problems found after the fields were parsed, each with the key path it belongs to.

    Raise it from a pydantic validator; :func:`collect_problems` unpacks it into located messages."""

    def __init__(self, problems: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = list(problems)


def deep_merge(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` laid over it, mappings merged key by key (per-label overrides)."""
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def validate_into(model: type[BaseModel], data: Any, prefix: tuple[str | int, ...]) -> list[tuple[tuple, str]]:
    """Validate ``data`` as ``model``; return its problems with key paths prefixed (empty when valid)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return [(prefix + loc, msg) for loc, msg in collect_problems(exc, model)]
    return []


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _num(value: Any) -> str:
    return show_value(float(value)) if isinstance(value, (int, float)) else str(value)


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional so the model or dict type underneath can be walked."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _allowed_keys(root: type[BaseModel], loc: Sequence[str | int]) -> list[str] | None:
    """The keys the mapping at ``loc`` accepts (for 'unknown key' messages), when it is a model."""
    node: Any = root
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return None
            node = node.model_fields[part].annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) is list:
            node = get_args(node)[0]
        else:
            return None
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return None


def _message(err: Mapping[str, Any], root: type[BaseModel], loc: tuple) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        what = "an integer" if isinstance(ctx[key], int) and not isinstance(ctx[key], bool) else "a number"
        return f"must be {what} {op} {_num(ctx[key])}, got {show_value(got)}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number, got {show_value(got)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {show_value(got)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {show_value(got)}"
    if kind == "string_type":
        return f"must be a string, got {show_value(got)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping, got {show_value(got)}"
    if kind == "list_type":
        return f"must be a list, got {show_value(got)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {show_value(got)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}, got {show_value(got)}"


def collect_problems(exc: ValidationError, root: type[BaseModel]) -> list[tuple[tuple, str]]:
    out: list[tuple[tuple, str]] = []
    for err in exc.errors():
        loc = tuple(part for part in err["loc"] if part != "[key]")
        # Union branches add the branch type to the path ('float', 'int' ...); drop those.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p in ("float", "int", "str", "bool", "none")))
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, LocatedError):
            out += [(loc + sub, msg) for sub, msg in error.problems]
        else:
            out.append((loc, _message(err, root, loc)))
    return out


def _format_loc(loc: Sequence[str | int]) -> str:
    return " ".join(f"==> At index {p}" if isinstance(p, int) else f"==> At key: {p}" for p in loc)


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pre-commit style lines: ``FILE: ==> At key: a ==> At key: b: what was expected, got what``."""
    lines = []
    for loc, msg in collect_problems(exc, root):
        where = _format_loc(loc)
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(dict.fromkeys(lines))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "unhashable key", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str, error: type[TriageError] = PolicyError) -> Any:
    """YAML text as data (safe types only, duplicate keys refused); a syntax error names the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "malformed YAML"
        raise error(f"{source}: invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source}: invalid YAML: {exc}") from None
