"""Cardiomegaly (an enlarged cardiac silhouette) and Hiatal hernia (a gas-holding retrocardiac opacity)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext, soft_ellipse
from model.data.phantom.findings.common import Draw, finding_strength, jitter_strength
from model.data.phantom.ramps import sig


def plan_cardiomegaly(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Enlarged cardiac silhouette: CTR 0.49..0.63 (overlapping the healthy tail), widening mostly toward the image right."""
    s = jitter_strength(finding_strength(rng), jit)
    ctr = 0.49 + 0.12 * min(s, 1.2) + float(jit.normal(0, 0.005))
    anat = replace(anat, ctr=max(anat.ctr, ctr), heart_half_h=anat.heart_half_h * (1.0 + 0.25 * s), heart_v=anat.heart_v + 0.01 * s)

    def draw(ctx: RenderContext) -> None:
        ctx.add_mask("Cardiomegaly", ctx.heart)

    return anat, draw


def plan_hernia(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Hiatal hernia: rounded retrocardiac opacity at the diaphragm holding gas (bubbles or a level)."""
    s = jitter_strength(finding_strength(rng), jit)
    r = float(rng.uniform(0.055, 0.09))
    du, dv = float(rng.normal(0.03, 0.015)), float(rng.uniform(-0.06, -0.01))
    level = float(rng.uniform(-0.5, 0.0)) if rng.random() < 0.5 else None  # air-fluid level
    bubbles = [(float(rng.normal(0, 0.4)), float(rng.uniform(-0.6, 0.3)), float(rng.uniform(0.18, 0.35))) for _ in range(int(rng.integers(1, 4)))]

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        cu, cv = 0.5 + du, min(a.dome_v) + dv
        sac = soft_ellipse(ctx, cu, cv, r * 1.15, r, 0.15 * r)
        if level is not None:
            gas = sac * sig((cv + level * r - ctx.v) / ctx.eps)
        else:
            gas = np.zeros_like(ctx.u)
            for bu, bv, br in bubbles:
                gas = np.maximum(gas, soft_ellipse(ctx, cu + bu * r, cv + bv * r, br * r, br * r, 0.25 * br * r))
            gas *= sac
        ctx.density += (0.03 + 0.1 * s) * sac * (1.0 - ctx.lungs()) - (0.08 + 0.25 * min(s, 1.0)) * gas
        ctx.air *= 1.0 - 0.8 * sac
        ctx.add_mask("Hernia", sac)

    return anat, draw
