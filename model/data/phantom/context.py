"""The rendering context a finding reads and paints into, and the shapes findings are drawn with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model.data.phantom.anatomy import Anatomy, Shot
from model.data.phantom.ramps import sig


@dataclass
class RenderContext:
    """Everything a finding may read or modify while one image is rendered."""

    u: np.ndarray
    v: np.ndarray
    eps: float  # one render pixel in canonical units
    anat: Anatomy
    shot: Shot
    lung: tuple[np.ndarray, np.ndarray] = field(default=None)  # type: ignore[assignment]
    wall: tuple[np.ndarray, np.ndarray] = field(default=None)  # type: ignore[assignment]
    depth: np.ndarray = field(default=None)  # type: ignore[assignment]  # 0 at a lung edge .. 1 inside
    heart: np.ndarray = field(default=None)  # type: ignore[assignment]
    air: np.ndarray = field(default=None)  # type: ignore[assignment]  # aeration, 1 = normal
    vessels: np.ndarray = field(default=None)  # type: ignore[assignment]  # vessel weight
    density: np.ndarray = field(default=None)  # type: ignore[assignment]  # extra attenuation
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    def side_t(self, side: int) -> np.ndarray:
        """Distance from the midline toward side ``side`` (0 = image left/patient right, 1)."""
        mid = 0.5 + self.anat.mediastinal_shift
        return (mid - self.u) if side == 0 else (self.u - mid)

    def lungs(self) -> np.ndarray:
        """Both lung fields (soft mask)."""
        return self.lung[0] + self.lung[1]

    def add_mask(self, name: str, mask: np.ndarray) -> None:
        """Record where a finding changed the image (for ``return_masks``)."""
        self.masks[name] = np.maximum(self.masks.get(name, 0.0), mask).astype(np.float32)


def diaphragm_v(a: Anatomy, side: int, t: np.ndarray, insp: float) -> np.ndarray:
    """Height of the hemidiaphragm at lateral distance ``t``: a parabolic dome."""
    return a.dome_v[side] + insp + a.dome_curv * (t - a.dome_t) ** 2


def soft_ellipse(ctx: RenderContext, cu: float, cv: float, rx: float, ry: float, soft: float, angle: float = 0.0, lobes: tuple[float, ...] = ()) -> np.ndarray:
    """Soft-edged, rotated ellipse; ``soft`` = edge width in units.

    ``lobes = (a2, a3, phase2, phase3)`` adds 2- and 3-fold radial bumps (a lobulated mass).
    """
    du, dv = ctx.u - cu, ctx.v - cv
    c, s = math.cos(angle), math.sin(angle)
    x, y = (du * c + dv * s) / rx, (-du * s + dv * c) / ry
    r = np.sqrt(x * x + y * y)
    if lobes:
        th = np.arctan2(y, x)
        half = len(lobes) // 2
        r = r / (1.0 + sum(lobes[k] * np.cos((k + 2) * th + lobes[half + k]) for k in range(half)))
    return sig((1.0 - r) * min(rx, ry) / max(soft, ctx.eps))
