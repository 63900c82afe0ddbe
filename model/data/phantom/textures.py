"""Texture banks: smooth noise tiles and lung vessel textures (fixed seeds: part of the generator).

They are identical on every run and cached; findings and the base radiograph sample them at
canonical coordinates.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from model.data.phantom.ramps import smoothstep

VESSEL_BANK_SIZE = 6
NOISE_BANK_SIZE = 6
BANK_RES = 256


def _smooth_noise(rng: np.random.Generator, res: int, cutoff: float, cutoff_y: float | None = None) -> np.ndarray:
    """Periodic, zero-mean, unit-std Gaussian random field; cutoffs in cycles per tile (x, y)."""
    white = rng.standard_normal((res, res))
    f = np.fft.fftfreq(res) * res
    cy = cutoff if cutoff_y is None else cutoff_y
    spec = np.exp(-(f[None, :] ** 2) / (2.0 * cutoff**2) - (f[:, None] ** 2) / (2.0 * cy**2))
    field_ = np.fft.ifft2(np.fft.fft2(white) * spec).real
    return ((field_ - field_.mean()) / field_.std()).astype(np.float32)


@functools.lru_cache(maxsize=1)
def noise_bank() -> np.ndarray:
    """Smooth periodic noise tiles sampled by the textured findings (patchy, fluffy, reticular)."""
    rng = np.random.default_rng(20170101)
    return np.stack([_smooth_noise(rng, BANK_RES, 10.0) for _ in range(NOISE_BANK_SIZE)])


@functools.lru_cache(maxsize=1)
def vessel_bank() -> np.ndarray:
    """Canonical-frame lung vessel textures: tapering lines radiating from the two hila.

    Zero crossings of a smooth random field in polar coordinates around each hilum (fast-varying
    in angle, slow in radius) form radial, occasionally merging lines; a width that shrinks with
    the radius and an amplitude that fades make them taper toward the periphery like vessels.
    """
    rng = np.random.default_rng(20170102)
    res = BANK_RES
    g = (np.arange(res) + 0.5) / res
    u, v = np.meshgrid(g, g)
    out = []
    for _ in range(VESSEL_BANK_SIZE):
        tex = np.zeros((res, res), np.float32)
        for side in (-1.0, 1.0):
            hu, hv = 0.5 + side * 0.09, 0.44
            r = np.hypot(u - hu, v - hv)
            theta = np.arctan2(v - hv, (u - hu) * side)
            cu = (theta / (2 * np.pi)) * 128 % 128  # one turn = one tile: no seam
            cv = np.log(r + 0.03) * 40.0 % 128
            half = smoothstep(side * (u - 0.5), -0.01, 0.04)
            for n_lines, w0, amp, r0 in ((10.0, 0.010, 1.0, 0.0), (22.0, 0.006, 0.8, 0.07), (45.0, 0.004, 0.6, 0.15)):
                nf = _smooth_noise(rng, 128, n_lines, 2.5)
                gy, gx = np.gradient(nf)
                val = ndimage.map_coordinates(nf, [cv, cu], order=1, mode="grid-wrap")
                grad = ndimage.map_coordinates(np.hypot(gx, gy), [cv, cu], order=1, mode="grid-wrap")
                # Distance to the zero line in canonical units (one tile pixel = 2 pi r / 128).
                dist = np.abs(val) / (grad + 1e-3) * (2 * np.pi * (r + 0.01) / 128)
                width = w0 * (0.1 / (r + 0.1)) ** 1.2
                fade = np.exp(-r / 0.3) * smoothstep(r, r0, r0 + 0.06) * smoothstep(r, 0.01, 0.04)
                tex += (amp * np.exp(-((dist / width) ** 2)) * fade * half).astype(np.float32)
        out.append(np.clip(tex, 0.0, 1.5))
    return np.stack(out)


def sample_tile(tile: np.ndarray, u: np.ndarray, v: np.ndarray, scale: float, off: tuple[float, float]) -> np.ndarray:
    """Bilinear, wrapping lookup of a periodic tile at canonical coordinates (scale = tiles/unit)."""
    res = tile.shape[0]
    cu = (u * scale + off[0]) * res
    cv = (v * scale + off[1]) * res
    return ndimage.map_coordinates(tile, [cv, cu], order=1, mode="grid-wrap")
