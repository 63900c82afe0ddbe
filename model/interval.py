"""The result shape of every statistic that may not be estimable: a value, or None with the reason.

It lives below :mod:`model.metrics` and :mod:`model.paired` so that both return the same shape
(``paired`` re-exports it). A statistic that cannot be estimated says why instead of printing a
number: ``estimate`` None and ``reason`` set; an estimate without an interval (a zero-width
bootstrap of a constant) keeps ``estimate`` and sets ``low``/``high`` None with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Interval", "unestimable"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval at ``level``; ``estimate`` None means "cannot be estimated"."""

    estimate: float | None
    low: float | None
    high: float | None
    level: float
    n: int
    method: str
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.estimate is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        """``0.123 [0.050, 0.201]``, ``0.500 (no interval: reason)`` or ``cannot be estimated (reason)``."""
        if self.estimate is None:
            return f"cannot be estimated ({self.reason})"
        if self.low is None or self.high is None:
            extra = f" (no interval: {self.reason})" if self.reason else ""
            return f"{self.estimate:.{digits}f}{extra}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def unestimable(level: float, n: int, method: str, reason: str) -> Interval:
    """The interval of a statistic that cannot be estimated here, with the reason."""
    return Interval(None, None, None, level, n, method, reason)
