"""The two soft ramps every phantom edge is made of (float32 in, float32 out)."""

from __future__ import annotations

import numpy as np


def sig(x: np.ndarray) -> np.ndarray:
    """Logistic ramp used for every soft edge (float32 in, float32 out)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """0 below ``a``, 1 above ``b``, smooth in between."""
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
