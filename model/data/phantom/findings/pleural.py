"""Findings of the pleura: Effusion (fluid at a base), Pneumothorax (an air rim), Pleural_Thickening."""

from __future__ import annotations

import numpy as np

from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext, diaphragm_v
from model.data.phantom.findings.common import Draw, finding_strength, jitter_strength
from model.data.phantom.ramps import sig, smoothstep


def plan_effusion(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Pleural fluid at a base: blunted costophrenic angle, meniscus rising toward the wall."""
    s = jitter_strength(finding_strength(rng), jit)
    r = rng.random()
    sides = (0,) if r < 0.45 else (1,) if r < 0.8 else (0, 1)
    depths = {sd: (0.005 + 0.14 * s) * float(rng.uniform(0.7, 1.3)) for sd in sides}

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        for sd, depth in depths.items():
            t = ctx.side_t(sd)
            t_max = a.thorax_t[sd]
            cp = diaphragm_v(a, sd, np.float32(t_max), ctx.shot.inspiration)
            rel = np.clip((t - a.medial_t) / (t_max - a.medial_t), 0.0, 1.2)
            level = cp - depth + 0.02 - depth * 0.6 * rel**2  # meniscus climbs laterally
            fluid = sig((ctx.v - level) / max(0.012, 2 * ctx.eps)) * ctx.lung[sd]
            ctx.air *= 1.0 - 0.95 * fluid
            ctx.vessels *= 1.0 - fluid
            ctx.add_mask("Effusion", fluid)

    return anat, draw


def plan_pneumothorax(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Apical/lateral air rim: darker, no vessel markings, bounded by a thin pleural line."""
    s = jitter_strength(finding_strength(rng), jit)
    side = int(rng.random() < 0.45)
    depth = 0.005 + 0.07 * s
    reach = float(rng.uniform(0.45, 0.8))  # how far down the lateral wall it extends (0..1)

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        top, base = a.lung_top[side], a.dome_v[side]
        zone_v = 1.0 - smoothstep(ctx.v, top + reach * (base - top) - 0.08, top + reach * (base - top) + 0.04)
        d_edge = depth * zone_v
        gap = ctx.wall[side] - d_edge
        rim = sig(-gap / ctx.eps) * ctx.lung[side] * (zone_v > 0.05)
        line = np.exp(-((gap / max(0.004, 0.7 * ctx.eps)) ** 2)) * ctx.lung[side] * (zone_v > 0.2)
        # Pleural air is as deep as mid-lung air (no rounded lung edge) and then some.
        ctx.air *= 1.0 + rim * ((1.0 + 0.15 * min(s, 1.0)) / ctx.depth - 1.0)
        ctx.air *= 1.0 - min(0.5, s) * line
        ctx.vessels *= 1.0 - rim
        ctx.add_mask("Pneumothorax", np.maximum(rim, line))

    return anat, draw


def plan_pleural_thickening(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """A thickened bright pleural rim along the lateral wall or an apical cap."""
    s = jitter_strength(finding_strength(rng), jit)
    sides = (int(rng.integers(2)),) if rng.random() < 0.7 else (0, 1)
    thick = 0.012 + 0.04 * s
    v0 = float(rng.uniform(0.0, 0.6))  # segment of the wall, 0 apex .. 1 base
    v1 = min(1.0, v0 + float(rng.uniform(0.3, 0.7)))

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        for sd in sides:
            top, base = a.lung_top[sd], a.dome_v[sd] + 0.08
            seg = smoothstep(ctx.v, top + v0 * (base - top) - 0.04, top + v0 * (base - top)) * (1.0 - smoothstep(ctx.v, top + v1 * (base - top), top + v1 * (base - top) + 0.04))
            rim = sig((thick - ctx.wall[sd]) / ctx.eps) * ctx.lung[sd] * seg
            ctx.air *= 1.0 - (0.5 + 0.4 * min(s, 1.0)) * rim
            ctx.add_mask("Pleural_Thickening", rim)

    return anat, draw
