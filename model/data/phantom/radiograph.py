"""The base radiograph: lung fields, heart, soft tissue, bones and clutter, composed and exposed.

Everything here is a closed-form function of the render context's coordinate arrays (vectorised
numpy, no per-pixel loops) and of the patient's anatomy and the shot; the only random draws are
the exposure noise in :func:`expose`. Findings paint into the context between
:func:`base_context` and :func:`density`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from model.data.phantom.anatomy import Anatomy, Shot
from model.data.phantom.context import RenderContext, diaphragm_v, soft_ellipse
from model.data.phantom.ramps import sig, smoothstep
from model.data.phantom.textures import BANK_RES, noise_bank, sample_tile, vessel_bank

# Attenuation scale of aerated lung, vessels and bone on the 0..1 "density" scale.
_AIR = 0.38
_VESSEL = 0.10
_RIB = 0.065
_CLAVICLE = 0.11


def lung_fields(ctx: RenderContext) -> None:
    """Both lung masks and their distance to the chest wall (for rim-shaped findings).

    A lung is bounded medially and laterally by curves that converge in a rounded apex, below by
    its hemidiaphragm dome; where the vertical lateral border meets the dome it forms the sharp
    costophrenic angle.
    """
    a, eps = ctx.anat, ctx.eps
    lungs, walls, depth = [], [], None
    for side in (0, 1):
        t = ctx.side_t(side)
        top, t_a, t_max = a.lung_top[side], a.apex_t[side], a.thorax_t[side]
        bot = a.dome_v[side] + a.dome_curv * (t_max - a.dome_t) ** 2 + 0.06
        q = np.clip((ctx.v - top) / (bot - top), 0.0, 1.0)
        t_lat = t_a + (t_max - t_a) * np.sqrt(1.0 - (1.0 - q) ** 2.4)
        t_med = t_a - (t_a - a.medial_t) * np.sqrt(1.0 - (1.0 - q) ** 3.5)
        wall = np.minimum(t_lat - t, (ctx.v - top) * 1.6)
        d = np.minimum(np.minimum(t - t_med, wall), diaphragm_v(a, side, t, ctx.shot.inspiration) - ctx.v)
        if side == 1:  # aortic knob indents the left lung's upper medial border
            knob = np.hypot(t - 0.03, (ctx.v - 0.31) * 1.1) - 0.04
            d = np.minimum(d, knob)
        lungs.append(sig(d / eps))
        walls.append(wall)
        depth = d if depth is None else np.maximum(depth, d)
    ctx.lung, ctx.wall = tuple(lungs), tuple(walls)  # type: ignore[assignment]
    # Lungs are round: less air to cross near their edges, so the periphery is a little brighter.
    ctx.depth = 0.55 + 0.45 * np.sqrt(np.clip(depth / 0.09, 0.0, 1.0))


def heart_silhouette(ctx: RenderContext) -> np.ndarray:
    """Cardiac silhouette: a tilted ellipse whose width is CTR x the thoracic width."""
    a = ctx.anat
    width = a.ctr * (a.thorax_t[0] + a.thorax_t[1]) * (1.06 if ctx.shot.ap else 1.0)
    cu = 0.5 + a.mediastinal_shift + 0.16 * width
    cv = a.heart_v + ctx.shot.inspiration * 0.6
    # A tilted ellipse's horizontal extent: choose semi-axes so that it equals ``width``.
    ct, st = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    ry = a.heart_half_h
    rx = math.sqrt(max((width / 2) ** 2 - (ry * st) ** 2, 1e-4)) / ct
    du, dv = ctx.u - cu, ctx.v - cv
    x = (du * ct + dv * st) / rx
    y = (-du * st + dv * ct) / ry
    r = np.sqrt(x * x + y * y)
    return sig((1.0 - r) * min(rx, ry) / ctx.eps)


def soft_tissue(ctx: RenderContext) -> np.ndarray:
    """Soft-tissue density: torso with neck and shoulders, thicker centrally, dark air outside."""
    a, u, v = ctx.anat, ctx.u, ctx.v
    half = a.body_half_width * (0.32 + 0.68 * smoothstep(v, -0.06, 0.12)) + 0.03 * smoothstep(v, 0.6, 1.0)
    x = np.abs(u - 0.5) / half
    inside = sig((1.0 - x) * half / (1.5 * ctx.eps))
    thick = np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
    # Mediastinum: the densest column of the chest (great vessels, spine, oesophagus).
    medi = np.exp(-(((u - 0.5 - a.mediastinal_shift) / 0.1) ** 2)) * smoothstep(v, 0.0, 0.15)
    return inside * (0.30 + 0.32 * thick + 0.07 * medi)


def bones(ctx: RenderContext) -> tuple[np.ndarray, np.ndarray]:
    """(ribs + spine, clavicles) as bright bands; clavicles are not dimmed over soft tissue."""
    a, u, v = ctx.anat, ctx.u, ctx.v
    t = np.abs(u - 0.5 - a.mediastinal_shift)
    top, bot = min(a.lung_top) - 0.04, max(a.dome_v) + 0.14
    t_max = 0.5 * (a.thorax_t[0] + a.thorax_t[1])
    gate = smoothstep(t, 0.02, 0.05) * (1.0 - smoothstep(t, t_max + 0.02, t_max + 0.07))
    gate = gate * smoothstep(v, top - 0.02, top + 0.02) * (1.0 - smoothstep(v, bot - 0.05, bot))
    # Posterior ribs rise a little lateral to the spine, then arch down along the lateral wall;
    # their spacing widens caudally (power warp of the phase).
    vp = np.clip((v + 0.25 * t - 1.4 * t * t - top) / (bot - top), 0.0, 1.0)
    phase = a.rib_count * vp**0.85 + a.rib_phase
    post = np.exp(-(((phase % 1.0) - 0.5) / 0.22) ** 2)
    # Anterior ribs: fainter, running down from the lateral wall toward the midline.
    va = np.clip((v + 0.55 * t - 0.5 * t * t - top) / (bot - top), 0.0, 1.0)
    ant = np.exp(-((((a.rib_count * 0.75 * va + a.rib_phase) % 1.0) - 0.5) / 0.16) ** 2) * smoothstep(t, 0.1, 0.2)
    ribs = gate * (post + 0.35 * ant)
    # Clavicles.
    cv = 0.155 + a.clavicle_v - 0.40 * t + 0.62 * t * t - (0.025 if ctx.shot.ap else 0.0)
    clav = np.exp(-(((v - cv) / 0.016) ** 2)) * smoothstep(t, 0.03, 0.06) * (1.0 - smoothstep(t, 0.30, 0.36))
    # Spine: vertebral bodies through the mediastinum.
    sx = np.exp(-(((u - 0.5) / 0.034) ** 4))
    spine = sx * (0.6 + 0.4 * np.cos(v * 2 * np.pi / 0.045) ** 2) * smoothstep(v, 0.0, 0.1)
    return _RIB * a.rib_gain * ribs + 0.06 * spine, _CLAVICLE * clav


def pixel_grid(res: int, anat: Anatomy, shot: Shot) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of every render pixel under the patient's pose."""
    g = ((np.arange(res, dtype=np.float32) + 0.5) / res - 0.5).astype(np.float32)
    x, y = np.meshgrid(g, g)
    x, y = x - shot.shift_u, y - shot.shift_v
    c, s = math.cos(shot.rotation), math.sin(shot.rotation)
    z = shot.zoom
    u = (c * x + s * y) / z + 0.5
    v = (-s * x + c * y) / z + 0.5
    return u.astype(np.float32), v.astype(np.float32)


def render_factor(size: int) -> int:
    """Supersampling factor: render at >= 128 px (and at least 2x) and box-downsample."""
    return max(2, -(-128 // size))


def downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Box filter by an integer factor (anti-aliased and exact-size)."""
    n = img.shape[0] // f
    return img.reshape(n, f, n, f).mean(axis=(1, 3))


def base_context(res: int, anat: Anatomy, shot: Shot) -> RenderContext:
    """The unpainted context of a ``res`` x ``res`` render: pixel grid, lung fields, heart, normal air."""
    u, v = pixel_grid(res, anat, shot)
    ctx = RenderContext(u=u, v=v, eps=1.0 / (res * shot.zoom), anat=anat, shot=shot)
    lung_fields(ctx)
    ctx.heart = heart_silhouette(ctx)
    ctx.air = np.full_like(u, anat.air_scale)
    ctx.vessels = np.ones_like(u)
    ctx.density = np.zeros_like(u)
    return ctx


def density(ctx: RenderContext, f: int) -> np.ndarray:
    """Attenuation of the painted context: body, bones, aerated lung, vessels, trachea and clutter.

    ``f`` is the supersampling factor (the focal-spot blur is ``0.35 f`` render pixels).
    """
    anat, shot, u, v = ctx.anat, ctx.shot, ctx.u, ctx.v
    lungs = ctx.lungs() * (1.0 - ctx.heart)
    vt = vessel_bank()[anat.vessel_tex]
    tex = ndimage.map_coordinates(vt, [(v + shot.vessel_dv) * BANK_RES - 0.5, (u + shot.vessel_du) * BANK_RES - 0.5], order=1, mode="nearest")
    aer = np.clip(ctx.air, 0.0, 1.6)
    # Bone contrast is lower over thick soft tissue (scatter, film shoulder), higher over lung.
    ribs, clavicles = bones(ctx)
    dens = soft_tissue(ctx) + ribs * (0.45 + 0.55 * lungs) + clavicles + ctx.density
    dens += 0.03 * ctx.heart * ctx.lungs()
    dens -= _AIR * lungs * aer * ctx.depth
    dens += _VESSEL * anat.vessel_gain * tex * lungs * ctx.vessels * np.clip(aer, 0.0, 1.0)
    dens -= 0.1 * np.exp(-(((u - 0.5 - anat.mediastinal_shift) / 0.014) ** 2)) * (1.0 - smoothstep(v, 0.28, 0.36)) * smoothstep(v, 0.02, 0.1)  # trachea
    dens += extras(ctx)
    # Focal spot and detector blur: no razor-sharp edges at any size.
    return ndimage.gaussian_filter(dens, sigma=0.35 * f, mode="nearest", truncate=3.0)


def extras(ctx: RenderContext) -> np.ndarray:
    """Gastric bubble, breast shadows in women, soft-tissue mottle, leads and electrodes.

    The clutter is what real films have and a model must learn to ignore; none of it depends on
    the labels.
    """
    a, sh = ctx.anat, ctx.shot
    tile, ou, ov, amp = sh.mottle
    out = amp * sample_tile(noise_bank()[tile], ctx.u, ctx.v, 0.8, (ou, ov))
    for cu, cv, ang, curv, half, width, bright in sh.wires:
        c, s = math.cos(ang), math.sin(ang)
        x = (ctx.u - cu) * c + (ctx.v - cv) * s
        y = -(ctx.u - cu) * s + (ctx.v - cv) * c
        dist = np.abs(y - curv * x * x) / np.sqrt(1.0 + (2.0 * curv * x) ** 2)
        along = sig((half - np.abs(x)) / ctx.eps)
        out += bright * along * sig((width - dist) / (0.5 * ctx.eps))
    for cu, cv, r in sh.buttons:
        out += 0.2 * soft_ellipse(ctx, cu, cv, r, r, 0.5 * ctx.eps)
    if a.stomach_bubble > 0.35:
        cv = a.dome_v[1] + ctx.shot.inspiration + 0.055
        bub = soft_ellipse(ctx, 0.5 + a.thorax_t[1] * 0.55, cv, 0.06, 0.035, 0.012)
        out -= 0.12 * a.stomach_bubble * bub * sig((ctx.v - cv + 0.015) / ctx.eps)
    if a.female:
        for sd in (0, 1):
            t = ctx.side_t(sd)
            out += 0.07 * np.exp(-(((t - a.thorax_t[sd] * 0.7) / 0.16) ** 2) - (((ctx.v - a.dome_v[sd] - 0.02) / 0.09) ** 2))
    return out


def expose(dens: np.ndarray, shot: Shot, rng: np.random.Generator) -> np.ndarray:
    """Window, gamma, heel-effect gradient and noise, then quantise to 8 bits."""
    n = dens.shape[0]
    ramp = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    y = (dens - shot.black) / (shot.white - shot.black) + shot.heel * ramp[None, :]
    # Film-like shoulder: bright (dense) regions are compressed rather than clipped.
    y = (1.0 - np.exp(-1.5 * np.clip(y, 0.0, 1.3))) / (1.0 - math.exp(-1.5))
    y = np.clip(y, 0.0, 1.0) ** shot.gamma
    y = y + rng.standard_normal(y.shape).astype(np.float32) * shot.noise
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
