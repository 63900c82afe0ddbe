"""Focal opacities: Mass and Nodule (round, from one factory) and Atelectasis (a band with volume loss)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext, soft_ellipse
from model.data.phantom.findings.common import Draw, FindingPlan, finding_strength, jitter_strength, lung_point


def plan_round(name: str, n_range: tuple[int, int], r_range: tuple[float, float], r_from_box: float) -> FindingPlan:
    """Factory for Mass (one large lobulated opacity) and Nodule (one to three small ones)."""

    def plan(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
        s = jitter_strength(finding_strength(rng), jit)
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        items = []
        for _ in range(n):
            cu, cv, w, h = lung_point(anat, rng, name, margin=0.03)
            rad = float(np.clip(r_from_box * (w + h) / 2 * rng.uniform(0.8, 1.2), *r_range))
            lobes = tuple(rng.uniform(0.0, 0.12, 2)) + tuple(rng.uniform(0.0, 2 * np.pi, 2)) if name == "Mass" else ()
            items.append((cu + jit.normal(0, 0.004), cv + jit.normal(0, 0.004), rad * jit.uniform(0.9, 1.1), float(rng.uniform(0.85, 1.15)), float(rng.uniform(0, np.pi)), lobes))

        def draw(ctx: RenderContext) -> None:
            for cu, cv, rad, asp, ang, lob in items:
                blob = soft_ellipse(ctx, cu, cv, rad * asp, rad / asp, 0.15 * rad, ang, lob)
                core = 0.1 + 0.8 * min(s, 1.0)
                ctx.air *= 1.0 - core * blob
                ctx.density += 0.05 * s * blob
                ctx.add_mask(name, blob)

        return anat, draw

    return plan


def plan_atelectasis(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Plate-like or wedge band opacity in the lower zones with volume loss on its side."""
    s = jitter_strength(finding_strength(rng), jit)
    cu, cv, w, h = lung_point(anat, rng, "Atelectasis", margin=0.02)
    side = 0 if cu < 0.5 else 1
    length = float(np.clip(0.6 * w, 0.06, 0.2))
    thick = float(rng.uniform(0.012, 0.03)) * (1.0 + 0.5 * s)
    angle = float(rng.normal(0.0, 0.25))
    wedge = rng.random() < 0.35
    lift = 0.035 * s
    dome = list(anat.dome_v)
    dome[side] -= lift
    anat = replace(anat, dome_v=tuple(dome), mediastinal_shift=anat.mediastinal_shift + (0.008 * s if side else -0.008 * s))

    def draw(ctx: RenderContext) -> None:
        band = soft_ellipse(ctx, cu, cv, length, thick * (2.2 if wedge else 1.0), 0.4 * thick, angle)
        band *= ctx.lungs()
        ctx.air *= 1.0 - (0.1 + 0.8 * min(s, 1.0)) * band
        ctx.add_mask("Atelectasis", band)

    return anat, draw
