"""Safe lookup and Markdown formatting shared by the sections of bench/RESULTS.md.

A benchmark JSON may be old, partial or hand-edited: every helper takes any value and prints a dash
for what is missing or not a number, so one odd field never stops the whole page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["DASH", "arrow", "fmt", "fmt_params", "fmt_pct", "fmt_s", "get", "median", "table"]

DASH = "–"


# --------------------------------------------------------------------------------------------
# Small helpers: safe lookup and formatting


def get(obj: Any, *path: Any, default: Any = None) -> Any:
    """``obj[p0][p1]...`` or ``default`` when any step is missing or of the wrong type."""
    for key in path:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return default
    return default if obj is None else obj


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def fmt(v: Any, spec: str = ".3f", suffix: str = "") -> str:
    x = _num(v)
    return DASH if x is None else format(x, spec) + suffix


def fmt_pct(v: Any, spec: str = ".1f", sign: str = "") -> str:
    x = _num(v)
    return DASH if x is None else f"{sign}{x * 100:{spec}} %"


def fmt_s(v: Any) -> str:
    """A duration in seconds, in the unit a person reads it in."""
    x = _num(v)
    if x is None:
        return DASH
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    if x < 100:
        return f"{x:.2f} s"
    if x < 3600:
        return f"{x:.0f} s ({x / 60:.1f} min)"
    return f"{x / 3600:.1f} h"


def fmt_params(v: Any) -> str:
    x = _num(v)
    if x is None:
        return DASH
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


def arrow(a: str, b: str) -> str:
    return DASH if a == DASH and b == DASH else f"{a} → {b}"


def median(values: Any) -> float | None:
    xs = sorted(x for x in (_num(v) for v in (values if isinstance(values, list) else [])) if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one letter per column (l/r), default left then right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


