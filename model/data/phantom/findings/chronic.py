"""Chronic lung disease: Emphysema (hyperlucent, over-expanded lungs) and Fibrosis (basal reticular net)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext, soft_ellipse
from model.data.phantom.findings.common import Draw, finding_strength, jitter_strength, lung_point, tex_offset
from model.data.phantom.ramps import smoothstep
from model.data.phantom.textures import noise_bank, sample_tile


def plan_emphysema(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Hyperlucent, over-expanded lungs: low flat diaphragm, sparse vessels, narrow heart, bullae."""
    s = jitter_strength(finding_strength(rng), jit)
    drop = 0.005 + 0.045 * s
    anat = replace(
        anat,
        dome_v=(anat.dome_v[0] + drop, anat.dome_v[1] + drop),
        dome_curv=anat.dome_curv * (1.0 - 0.45 * min(s, 1.0)),
        lung_top=(anat.lung_top[0] - 0.01 * s, anat.lung_top[1] - 0.01 * s),
        ctr=anat.ctr * (1.0 - 0.08 * s),
        heart_half_h=anat.heart_half_h * (1.0 - 0.1 * s),
    )
    bullae = [lung_point(anat, rng, None, zone=(0.0, 0.4), margin=0.04) for _ in range(int(rng.integers(0, 3)))]
    bull_r = [float(rng.uniform(0.025, 0.05)) for _ in bullae]

    def draw(ctx: RenderContext) -> None:
        lungs = ctx.lungs()
        ctx.air *= 1.0 + 0.2 * min(s, 1.0) * lungs
        ctx.vessels *= 1.0 - 0.4 * min(s, 1.0) * lungs
        for (cu, cv, _, _), r in zip(bullae, bull_r):
            b = soft_ellipse(ctx, cu, cv, r, r, 0.2 * r) * lungs
            ctx.air *= 1.0 + 0.3 * s * b
            ctx.vessels *= 1.0 - b
        ctx.add_mask("Emphysema", lungs)

    return anat, draw


def plan_fibrosis(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Reticular (net-like) opacities, basal and peripheral, with mild volume loss."""
    s = jitter_strength(finding_strength(rng), jit)
    tile, off = tex_offset(rng)
    anat = replace(anat, dome_v=(anat.dome_v[0] - 0.012 * s, anat.dome_v[1] - 0.012 * s))
    scale = float(rng.uniform(1.6, 2.4))  # tiles per unit: a net of 3-5 px cells at 64 px

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        env = np.zeros_like(ctx.u)
        for sd in (0, 1):
            basal = smoothstep(ctx.v, a.lung_top[sd] + 0.2, a.dome_v[sd] - 0.02)
            periph = smoothstep(ctx.side_t(sd), a.thorax_t[sd] * 0.35, a.thorax_t[sd] * 0.8)
            env += ctx.lung[sd] * np.maximum(basal * (0.5 + 0.5 * periph), 0.5 * periph)
        n = sample_tile(noise_bank()[tile], ctx.u, ctx.v, scale, off)
        net = np.exp(-((n / 0.3) ** 2))
        ctx.air *= 1.0 - (0.1 + 0.8 * min(s, 1.0)) * net * env
        ctx.add_mask("Fibrosis", env)

    return anat, draw
