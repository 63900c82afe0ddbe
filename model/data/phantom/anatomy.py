"""A patient's anatomy and one acquisition's pose and exposure: the parameters of a base radiograph.

Both are frozen dataclasses in the canonical frame; their samplers draw every random number of a
patient (anatomy) or of one image (shot). Never reorder a draw: it changes every phantom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import model.data.phantom.knobs as knobs
from model.data.phantom.textures import NOISE_BANK_SIZE, VESSEL_BANK_SIZE


@dataclass(frozen=True)
class Anatomy:
    """A patient's body: fixed across their follow-up images. Canonical-frame units."""

    body_half_width: float = 0.47
    lung_top: tuple[float, float] = (0.13, 0.12)  # (right lung = image left, left lung)
    apex_t: tuple[float, float] = (0.17, 0.17)  # distance of the apex from the midline
    thorax_t: tuple[float, float] = (0.38, 0.38)  # lateral lung border (inner rib margin)
    medial_t: float = 0.045
    dome_v: tuple[float, float] = (0.62, 0.645)  # hemidiaphragm dome heights
    dome_t: float = 0.16
    dome_curv: float = 2.6
    ctr: float = 0.44  # cardiothoracic ratio
    heart_v: float = 0.56
    heart_half_h: float = 0.14
    heart_tilt: float = 0.4  # radians, apex down toward the image right
    rib_phase: float = 0.0
    rib_gain: float = 1.0
    rib_count: float = 9.5
    clavicle_v: float = 0.0
    female: bool = False
    stomach_bubble: float = 0.6
    vessel_tex: int = 0
    vessel_gain: float = 1.0
    air_scale: float = 1.0
    mediastinal_shift: float = 0.0


@dataclass(frozen=True)
class Shot:
    """One acquisition: pose, inspiration, exposure. Varies between a patient's images."""

    zoom: float = 1.0
    shift_u: float = 0.0
    shift_v: float = 0.0
    rotation: float = 0.0
    inspiration: float = 0.0
    black: float = 0.08
    white: float = 0.78
    gamma: float = 1.0
    noise: float = knobs.NOISE_LEVEL
    heel: float = 0.0
    vessel_du: float = 0.0
    vessel_dv: float = 0.0
    ap: bool = False
    # ECG leads and lines: (u, v, angle, curvature, half length, width, brightness) each.
    wires: tuple[tuple[float, ...], ...] = ()
    # ECG electrodes / buttons: (u, v, radius) each.
    buttons: tuple[tuple[float, float, float], ...] = ()
    # Low-frequency soft-tissue mottle: (noise tile, offset u, offset v, amplitude).
    mottle: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0)


def sample_anatomy(rng: np.random.Generator, female: bool | None = None) -> Anatomy:
    """Between-patient variation of size and shape (scaled by :data:`ANATOMY_VARIATION`)."""
    k = knobs.ANATOMY_VARIATION

    def jit(sd: float) -> float:
        return float(rng.normal(0.0, sd * k))

    if female is None:
        female = bool(rng.random() < 0.44)
    thorax = 0.38 + jit(0.018) - (0.012 if female else 0.0)
    lat_asym = jit(0.006)
    top = 0.13 + jit(0.015)
    dome_r = 0.62 + jit(0.025)
    # Healthy CTR ~ N(0.44, 0.035) up to 0.52 while Cardiomegaly starts at 0.49: a borderline band
    # (as radiologists have) so the label is not a threshold any model gets for free.
    ctr = float(np.clip(0.44 + rng.normal(0.0, 0.035 * k), 0.35, 0.52))
    return Anatomy(
        body_half_width=0.47 + jit(0.025),
        lung_top=(top + abs(jit(0.006)), top),
        apex_t=(0.17 + jit(0.012), 0.17 + jit(0.012)),
        thorax_t=(thorax + lat_asym, thorax - lat_asym),
        medial_t=0.045 + jit(0.005),
        dome_v=(dome_r, dome_r + 0.022 + jit(0.01)),
        dome_t=0.16 + jit(0.015),
        dome_curv=2.6 + jit(0.35),
        ctr=ctr,
        heart_v=0.56 + jit(0.015),
        heart_half_h=0.14 + jit(0.01),
        heart_tilt=0.4 + jit(0.06),
        rib_phase=float(rng.uniform(-0.25, 0.25)),
        rib_gain=float(rng.uniform(0.6, 1.2)),
        rib_count=9.5 + jit(0.4),
        clavicle_v=jit(0.012),
        female=female,
        stomach_bubble=float(rng.uniform(0.0, 1.0)),
        vessel_tex=int(rng.integers(0, VESSEL_BANK_SIZE)),
        vessel_gain=float(rng.uniform(0.75, 1.25)),
        air_scale=1.0 + jit(0.05),
    )


def sample_shot(rng: np.random.Generator, ap: bool = False) -> Shot:
    """Per-image pose and exposure; AP (bedside) views are noisier and less well positioned."""
    rot_sd = 0.045 if ap else 0.03
    return Shot(
        zoom=float(rng.uniform(0.94, 1.08)),
        shift_u=float(rng.normal(0.0, 0.02)),
        shift_v=float(rng.normal(0.0, 0.025)),
        rotation=float(rng.normal(0.0, rot_sd)),
        inspiration=float(rng.normal(0.0, 0.015) + (0.015 if ap else 0.0)),
        black=float(rng.uniform(-0.08, 0.06)),
        white=float(rng.uniform(0.8, 0.95)),
        gamma=float(np.exp(rng.normal(0.0, 0.15))),
        noise=knobs.NOISE_LEVEL * float(rng.uniform(0.6, 1.6)) * (1.33 if ap else 1.0),
        heel=float(rng.normal(0.0, 0.03)),
        vessel_du=float(rng.normal(0.0, 0.01)),
        vessel_dv=float(rng.normal(0.0, 0.01)),
        ap=ap,
        wires=tuple(_sample_wire(rng) for _ in range(int(rng.integers(1, 4)) if rng.random() < (0.6 if ap else 0.2) else 0)),
        buttons=tuple((float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.08, 0.8)), float(rng.uniform(0.008, 0.016))) for _ in range(int(rng.integers(1, 4)) if rng.random() < (0.5 if ap else 0.15) else 0)),
        mottle=(int(rng.integers(NOISE_BANK_SIZE)), float(rng.random()), float(rng.random()), float(rng.uniform(0.01, 0.035))),
    )


def _sample_wire(rng: np.random.Generator) -> tuple[float, ...]:
    """One lead or line crossing the chest: a bright thin curve (a distractor, as in NIH AP films)."""
    return (
        float(rng.uniform(0.2, 0.8)),
        float(rng.uniform(0.1, 0.7)),
        float(rng.uniform(0.0, np.pi)),
        float(rng.normal(0.0, 2.0)),
        float(rng.uniform(0.15, 0.45)),
        float(rng.uniform(0.003, 0.007)),
        float(rng.uniform(0.06, 0.18)),
    )
