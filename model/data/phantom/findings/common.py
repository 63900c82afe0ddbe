"""What every finding shares: the plan/draw types, how conspicuous an instance is, where a lesion goes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

import model.data.phantom.knobs as knobs
from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext
from model.data.phantom.nih_stats import bbox_table
from model.data.phantom.textures import NOISE_BANK_SIZE

#: Paints one finding instance into the context.
Draw = Callable[[RenderContext], None]
#: ``plan(geometry rng, jitter rng, anatomy) -> (anatomy, draw)``: draws every random number of one
#: finding instance and may change the anatomy.
FindingPlan = Callable[[np.random.Generator, np.random.Generator, Anatomy], tuple[Anatomy, Draw]]


def finding_strength(rng: np.random.Generator) -> float:
    """How conspicuous one finding instance is: a subtle share, the rest clearly visible."""
    if rng.random() < knobs.SUBTLE_SHARE:
        s = rng.uniform(0.08, 0.35)
    else:
        s = rng.uniform(0.35, 1.0)
    return float(s * knobs.LESION_CONTRAST)


def jitter_strength(s: float, jit: np.random.Generator) -> float:
    """A follow-up image shows the same finding a little better or worse."""
    return float(s * jit.uniform(0.8, 1.2))


def _in_lung(anat: Anatomy, u: float, v: float, margin: float = 0.02) -> bool:
    """Scalar test whether canonical point (u, v) lies inside a lung, ``margin`` from its edge."""
    for side in (0, 1):
        t = (0.5 - u) if side == 0 else (u - 0.5)
        top, t_a, t_max = anat.lung_top[side], anat.apex_t[side], anat.thorax_t[side]
        bot = anat.dome_v[side] + anat.dome_curv * (t_max - anat.dome_t) ** 2 + 0.06
        q = min(max((v - top) / (bot - top), 0.0), 1.0)
        t_lat = t_a + (t_max - t_a) * math.sqrt(1.0 - (1.0 - q) ** 2.4)
        t_med = t_a - (t_a - anat.medial_t) * math.sqrt(1.0 - (1.0 - q) ** 3.5)
        dia = anat.dome_v[side] + anat.dome_curv * (t - anat.dome_t) ** 2
        if min(t - t_med, t_lat - t, v - top, dia - v) > margin:
            return True
    return False


def lung_point(anat: Anatomy, rng: np.random.Generator, finding: str | None, *, zone: tuple[float, float] = (0.0, 1.0), margin: float = 0.02) -> tuple[float, float, float, float]:
    """A lesion centre inside a lung plus a box size ``(w, h)``.

    Where NIH boxes exist for the finding, the centre and size come from a random real box (the
    canonical frame is NIH's image frame), pulled into the patient's lung if it falls outside;
    otherwise the centre is uniform in the lung within the vertical ``zone`` (0 apex .. 1 base).
    """
    boxes = bbox_table().get(finding or "")
    if boxes is not None and len(boxes):
        cx, cy, w, h = boxes[rng.integers(len(boxes))]
        side = 0 if cx < 0.5 else 1
        hu = 0.5 + (anat.thorax_t[side] * 0.55 + 0.02) * (-1 if side == 0 else 1)
        hv = 0.5 * (anat.lung_top[side] + anat.dome_v[side]) + 0.04
        for k in range(12):  # pull toward the lung's centre until inside
            f = k / 11.0
            pu, pv = cx + (hu - cx) * f, cy + (hv - cy) * f
            if _in_lung(anat, pu, pv, margin):
                return float(pu), float(pv), float(w), float(h)
        return float(hu), float(hv), float(w), float(h)
    for _ in range(200):
        side = int(rng.integers(2))
        t = rng.uniform(anat.medial_t, anat.thorax_t[side])
        top, base = anat.lung_top[side], anat.dome_v[side] + 0.05
        v = top + (base - top) * rng.uniform(*zone)
        u = 0.5 - t if side == 0 else 0.5 + t
        if _in_lung(anat, u, v, margin):
            return float(u), float(v), 0.1, 0.1
    return 0.35, 0.5, 0.1, 0.1


def tex_offset(rng: np.random.Generator) -> tuple[int, tuple[float, float]]:
    """Which noise tile and where in it a textured finding samples."""
    return int(rng.integers(NOISE_BANK_SIZE)), (float(rng.random()), float(rng.random()))
