"""Airspace opacities: Infiltration (patchy), Pneumonia (lobar), Consolidation (dense, air bronchograms), Edema."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from model.data.phantom.anatomy import Anatomy
from model.data.phantom.context import RenderContext, soft_ellipse
from model.data.phantom.findings.common import Draw, finding_strength, jitter_strength, lung_point, tex_offset
from model.data.phantom.ramps import sig, smoothstep
from model.data.phantom.textures import BANK_RES, VESSEL_BANK_SIZE, noise_bank, sample_tile, vessel_bank


def plan_infiltration(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Patchy, ill-defined opacities over a region of one or both lungs."""
    s = jitter_strength(finding_strength(rng), jit)
    regions = []
    for _ in range(int(rng.integers(1, 3))):
        cu, cv, w, h = lung_point(anat, rng, "Infiltration", margin=0.0)
        regions.append((cu, cv, float(np.clip(w * 0.6, 0.06, 0.2)), float(np.clip(h * 0.6, 0.06, 0.22))))
    tile, off = tex_offset(rng)

    def draw(ctx: RenderContext) -> None:
        env = np.zeros_like(ctx.u)
        for cu, cv, rx, ry in regions:
            env = np.maximum(env, soft_ellipse(ctx, cu, cv, rx, ry, 0.5 * min(rx, ry)))
        n = sample_tile(noise_bank()[tile], ctx.u, ctx.v, 3.5, off)
        patch = env * sig((n - 0.2) * 2.5) * ctx.lungs()
        ctx.air *= 1.0 - (0.08 + 0.7 * min(s, 1.0)) * patch
        ctx.add_mask("Infiltration", patch)

    return anat, draw


def plan_pneumonia(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Lobar/segmental fluffy consolidation of one region, sharp along a fissure."""
    s = jitter_strength(finding_strength(rng), jit)
    cu, cv, w, h = lung_point(anat, rng, "Pneumonia", margin=0.0)
    rx, ry = float(np.clip(0.55 * w, 0.07, 0.17)), float(np.clip(0.5 * h, 0.07, 0.18))
    fissure = cv - ry * float(rng.uniform(0.4, 0.9)) if rng.random() < 0.6 else None
    tile, off = tex_offset(rng)

    def draw(ctx: RenderContext) -> None:
        env = soft_ellipse(ctx, cu, cv, rx, ry, 0.35 * min(rx, ry))
        if fissure is not None:
            env *= sig((ctx.v - fissure) / ctx.eps)
        n = sample_tile(noise_bank()[tile], ctx.u, ctx.v, 6.0, off)
        region = env * ctx.lungs()
        ctx.air *= 1.0 - (0.05 + 0.7 * min(s, 1.0)) * region * (0.7 + 0.3 * np.tanh(n))
        ctx.add_mask("Pneumonia", region)

    return anat, draw


def plan_consolidation(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Dense homogeneous opacity crossed by dark branching air bronchograms."""
    s = jitter_strength(finding_strength(rng), jit)
    cu, cv, _, _ = lung_point(anat, rng, None, zone=(0.35, 0.95), margin=0.04)
    rx, ry = float(rng.uniform(0.06, 0.13)), float(rng.uniform(0.06, 0.12))
    tex = int(rng.integers(VESSEL_BANK_SIZE))
    off = (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03)))
    angle = float(jit.normal(0, 0.2))

    def draw(ctx: RenderContext) -> None:
        region = soft_ellipse(ctx, cu, cv, rx, ry, 0.25 * min(rx, ry), angle) * ctx.lungs()
        bronch = ndimage.map_coordinates(vessel_bank()[tex], [(ctx.v + off[1]) * BANK_RES - 0.5, (ctx.u + off[0]) * BANK_RES - 0.5], order=1, mode="nearest")
        dense = 0.15 + 0.8 * min(s, 1.0)
        ctx.air *= 1.0 - region * dense * (1.0 - 0.55 * np.clip(bronch * 1.5, 0.0, 1.0))
        ctx.vessels *= 1.0 - region
        ctx.add_mask("Consolidation", region)

    return anat, draw


def plan_edema(rng: np.random.Generator, jit: np.random.Generator, anat: Anatomy) -> tuple[Anatomy, Draw]:
    """Bilateral perihilar bat-wing haze with Kerley-like septal lines at the lateral bases."""
    s = jitter_strength(finding_strength(rng), jit)
    spread = float(rng.uniform(0.8, 1.2))
    tile, off = tex_offset(rng)
    kerley_phase = float(rng.random())

    def draw(ctx: RenderContext) -> None:
        a = ctx.anat
        lungs = ctx.lungs()
        haze = np.zeros_like(ctx.u)
        for sd in (0, 1):
            t = ctx.side_t(sd)
            haze += np.exp(-(((t - 0.11) / (0.11 * spread)) ** 2) - (((ctx.v - 0.47) / (0.14 * spread)) ** 2))
        n = sample_tile(noise_bank()[tile], ctx.u, ctx.v, 4.0, off)
        haze = haze * lungs * (0.75 + 0.25 * np.tanh(n))
        kerley = np.zeros_like(ctx.u)
        for sd in (0, 1):
            band = smoothstep(ctx.v, a.dome_v[sd] - 0.2, a.dome_v[sd] - 0.1) * smoothstep(ctx.side_t(sd), a.thorax_t[sd] - 0.07, a.thorax_t[sd] - 0.03)
            kerley += band * ctx.lung[sd]
        lines = np.exp(-((((ctx.v * 55.0 + kerley_phase) % 1.0) - 0.5) / 0.12) ** 2) * kerley
        ctx.air *= 1.0 - (0.03 + 0.4 * min(s, 1.0)) * haze - 0.3 * min(s, 1.0) * lines
        ctx.add_mask("Edema", np.maximum(haze, lines))

    return anat, draw
