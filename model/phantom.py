"""Procedural chest radiograph phantoms in the NIH ChestX-ray14 on-disk layout.

The project may not ship real X-rays, so its embedded default data set is rendered here: PA chest
radiograph phantoms whose labels follow the real NIH joint label distribution (shipped as figures in
``model/resources/nih_label_combinations.json``) and whose 14 findings are each drawn as their own
image pattern at an anatomically plausible place. The files are written exactly as the NIH release
lays them out (``Data_Entry_2017_v2020.csv``, ``images/``, ``train_val_list.txt``,
``test_list.txt``), so the one NIH reader serves both phantoms and real data.

Geometry is computed in a *canonical frame*: normalised NIH image coordinates ``(u, v)`` in 0..1,
``u`` to the image right (the patient's left), ``v`` down. NIH radiologist boxes (the optional
``nih_bbox_positions.json``) live in the same frame, so lesion positions are sampled from them
directly. Each image maps its pixel grid into that frame through a per-patient size and a per-image
pose (shift, zoom, rotation of a few degrees), so every shape is a closed-form function of two
coordinate arrays: vectorised numpy, no per-pixel loops.

Randomness: only ``np.random.default_rng``. A rendered image draws independent child streams for
anatomy, acquisition, noise and each finding, so adding or removing one label leaves everything
else in the image unchanged (which is what the tests and any attribution check rely on).

Difficulty knobs are the module constants :data:`LESION_CONTRAST`, :data:`SUBTLE_SHARE`,
:data:`NOISE_LEVEL` and :data:`ANATOMY_VARIATION`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from model.labels import CHEXNET_LABELS, NO_FINDING, NUM_LABELS

__all__ = [
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "LESION_CONTRAST",
    "SUBTLE_SHARE",
    "NOISE_LEVEL",
    "ANATOMY_VARIATION",
    "MAX_FOLLOWUPS",
    "NIH_HEADER",
    "FIELD_OF_VIEW_MM",
    "generate_phantoms",
    "render_phantom",
    "sample_label_vectors",
    "label_table",
    "nih_label_marginals",
]

GENERATOR_NAME = "cxr-triage-phantom"
#: Bump whenever the pixels or the CSV for a given (n, size, seed) change.
GENERATOR_VERSION = "1.0.0"

#: Global multiplier on every finding's strength (opacity, size change, air change). 1.3 is the
#: calibrated default (see ``bench/phantom_difficulty.py``); lower is fainter (harder), higher easier.
LESION_CONTRAST: float = 1.3
#: Share of finding instances drawn in the subtle range (a strength of 0.08..0.35 of the full one
#: instead of 0.35..1.0). Subtle instances are what keeps the task from being trivial.
SUBTLE_SHARE: float = 0.3
#: Standard deviation of the per-pixel Gaussian noise on the 0..1 output scale, before the
#: per-image factor (0.6..1.6; AP views a third more). Noise hides nodules and faint textures.
NOISE_LEVEL: float = 0.012
#: Scale of the between-patient anatomy variation (heart size, lung shape, diaphragm height).
#: Natural variation overlapping the finding changes (e.g. heart size vs. Cardiomegaly) is the other
#: source of difficulty.
ANATOMY_VARIATION: float = 1.0
#: Most images one phantom patient gets (NIH has up to 184); see :func:`_max_followups`.
MAX_FOLLOWUPS: int = 10

#: The NIH v2020 header verbatim: 9 names, 11 fields (the last two names each span two values).
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
#: Field of view of a phantom in mm, for the ``OriginalImagePixelSpacing`` columns.
FIELD_OF_VIEW_MM = 430.0

# Package data lives in model/resources/ (no __init__: addressed through the ``model`` package).
_RESOURCES = ("model", "resources")
_LABEL_TABLE = "nih_label_combinations.json"
_BBOX_TABLE = "nih_bbox_positions.json"
# Child streams of one rendered image, in draw order (never reorder: it changes every phantom).
_STREAM_ANATOMY, _STREAM_SHOT, _STREAM_NOISE, _STREAM_LESION, _STREAM_JITTER = range(5)
# Attenuation scale of aerated lung, vessels and bone on the 0..1 "density" scale.
_AIR = 0.38
_VESSEL = 0.10
_RIB = 0.065
_CLAVICLE = 0.11


# --------------------------------------------------------------------------------------------
# Shipped statistics


@functools.lru_cache(maxsize=None)
def label_table() -> dict:
    """The shipped NIH label statistics (see ``bench/make_label_table.py``); cached, read-only."""
    text = resources.files(_RESOURCES[0]).joinpath(_RESOURCES[1], _LABEL_TABLE).read_text(encoding="utf-8")
    table = json.loads(text)
    if tuple(table["labels"]) != CHEXNET_LABELS:
        raise ValueError(f"{_LABEL_TABLE} is not in CheXNet label order; regenerate it")
    return table


@functools.lru_cache(maxsize=None)
def _combinations() -> tuple[np.ndarray, np.ndarray]:
    """(k x 14 uint8 label matrix, k cumulative probabilities) of the NIH label combinations."""
    combos = label_table()["combinations"]
    mat = np.zeros((len(combos), NUM_LABELS), dtype=np.uint8)
    counts = np.array([c for c, _ in combos], dtype=np.float64)
    for row, (_, idx) in enumerate(combos):
        mat[row, idx] = 1
    mat.setflags(write=False)
    cdf = np.cumsum(counts / counts.sum())
    cdf[-1] = 1.0
    return mat, cdf


def nih_label_marginals() -> np.ndarray:
    """Per-label prevalence of the real NIH table (14 floats, CheXNet order)."""
    mat, cdf = _combinations()
    p = np.diff(np.concatenate([[0.0], cdf]))
    return p @ mat


@functools.lru_cache(maxsize=None)
def _bbox_table() -> dict[str, np.ndarray]:
    """NIH radiologist boxes per finding, ``[cx, cy, w, h]`` in the canonical frame; may be empty."""
    path = resources.files(_RESOURCES[0]).joinpath(_RESOURCES[1], _BBOX_TABLE)
    if not path.is_file():
        return {}
    boxes = json.loads(path.read_text(encoding="utf-8"))["boxes"]
    return {k: np.asarray(v, dtype=np.float64) for k, v in boxes.items()}


def sample_label_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent label vectors (n x 14 uint8) from the real NIH joint distribution.

    Sampling whole combinations, not labels one by one, keeps NIH's co-occurrence structure
    (Effusion with Atelectasis, Mass with Nodule, ...) as well as its marginals.
    """
    n = _check_int("n", n, minimum=0)
    mat, cdf = _combinations()
    return mat[np.searchsorted(cdf, rng.random(n), side="right")].copy()


# --------------------------------------------------------------------------------------------
# Anatomy and acquisition parameters


@dataclass(frozen=True)
class _Anatomy:
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
class _Shot:
    """One acquisition: pose, inspiration, exposure. Varies between a patient's images."""

    zoom: float = 1.0
    shift_u: float = 0.0
    shift_v: float = 0.0
    rotation: float = 0.0
    inspiration: float = 0.0
    black: float = 0.08
    white: float = 0.78
    gamma: float = 1.0
    noise: float = NOISE_LEVEL
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


def _sample_anatomy(rng: np.random.Generator, female: bool | None = None) -> _Anatomy:
    """Between-patient variation of size and shape (scaled by :data:`ANATOMY_VARIATION`)."""
    k = ANATOMY_VARIATION

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
    return _Anatomy(
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
        vessel_tex=int(rng.integers(0, _VESSEL_BANK_SIZE)),
        vessel_gain=float(rng.uniform(0.75, 1.25)),
        air_scale=1.0 + jit(0.05),
    )


def _sample_shot(rng: np.random.Generator, ap: bool = False) -> _Shot:
    """Per-image pose and exposure; AP (bedside) views are noisier and less well positioned."""
    rot_sd = 0.045 if ap else 0.03
    return _Shot(
        zoom=float(rng.uniform(0.94, 1.08)),
        shift_u=float(rng.normal(0.0, 0.02)),
        shift_v=float(rng.normal(0.0, 0.025)),
        rotation=float(rng.normal(0.0, rot_sd)),
        inspiration=float(rng.normal(0.0, 0.015) + (0.015 if ap else 0.0)),
        black=float(rng.uniform(-0.08, 0.06)),
        white=float(rng.uniform(0.8, 0.95)),
        gamma=float(np.exp(rng.normal(0.0, 0.15))),
        noise=NOISE_LEVEL * float(rng.uniform(0.6, 1.6)) * (1.33 if ap else 1.0),
        heel=float(rng.normal(0.0, 0.03)),
        vessel_du=float(rng.normal(0.0, 0.01)),
        vessel_dv=float(rng.normal(0.0, 0.01)),
        ap=ap,
        wires=tuple(_sample_wire(rng) for _ in range(int(rng.integers(1, 4)) if rng.random() < (0.6 if ap else 0.2) else 0)),
        buttons=tuple((float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.08, 0.8)), float(rng.uniform(0.008, 0.016))) for _ in range(int(rng.integers(1, 4)) if rng.random() < (0.5 if ap else 0.15) else 0)),
        mottle=(int(rng.integers(_NOISE_BANK_SIZE)), float(rng.random()), float(rng.random()), float(rng.uniform(0.01, 0.035))),
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


# --------------------------------------------------------------------------------------------
# Texture banks (fixed seeds: part of the generator, identical on every run)

_VESSEL_BANK_SIZE = 6
_NOISE_BANK_SIZE = 6
_BANK_RES = 256


def _smooth_noise(rng: np.random.Generator, res: int, cutoff: float, cutoff_y: float | None = None) -> np.ndarray:
    """Periodic, zero-mean, unit-std Gaussian random field; cutoffs in cycles per tile (x, y)."""
    white = rng.standard_normal((res, res))
    f = np.fft.fftfreq(res) * res
    cy = cutoff if cutoff_y is None else cutoff_y
    spec = np.exp(-(f[None, :] ** 2) / (2.0 * cutoff**2) - (f[:, None] ** 2) / (2.0 * cy**2))
    field_ = np.fft.ifft2(np.fft.fft2(white) * spec).real
    return ((field_ - field_.mean()) / field_.std()).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Smooth periodic noise tiles sampled by the textured findings (patchy, fluffy, reticular)."""
    rng = np.random.default_rng(20170101)
    return np.stack([_smooth_noise(rng, _BANK_RES, 10.0) for _ in range(_NOISE_BANK_SIZE)])


@functools.lru_cache(maxsize=1)
def _vessel_bank() -> np.ndarray:
    """Canonical-frame lung vessel textures: tapering lines radiating from the two hila.

    Zero crossings of a smooth random field in polar coordinates around each hilum (fast-varying
    in angle, slow in radius) form radial, occasionally merging lines; a width that shrinks with
    the radius and an amplitude that fades make them taper toward the periphery like vessels.
    """
    rng = np.random.default_rng(20170102)
    res = _BANK_RES
    g = (np.arange(res) + 0.5) / res
    u, v = np.meshgrid(g, g)
    out = []
    for _ in range(_VESSEL_BANK_SIZE):
        tex = np.zeros((res, res), np.float32)
        for side in (-1.0, 1.0):
            hu, hv = 0.5 + side * 0.09, 0.44
            r = np.hypot(u - hu, v - hv)
            theta = np.arctan2(v - hv, (u - hu) * side)
            cu = (theta / (2 * np.pi)) * 128 % 128  # one turn = one tile: no seam
            cv = np.log(r + 0.03) * 40.0 % 128
            half = _smoothstep(side * (u - 0.5), -0.01, 0.04)
            for n_lines, w0, amp, r0 in ((10.0, 0.010, 1.0, 0.0), (22.0, 0.006, 0.8, 0.07), (45.0, 0.004, 0.6, 0.15)):
                nf = _smooth_noise(rng, 128, n_lines, 2.5)
                gy, gx = np.gradient(nf)
                val = ndimage.map_coordinates(nf, [cv, cu], order=1, mode="grid-wrap")
                grad = ndimage.map_coordinates(np.hypot(gx, gy), [cv, cu], order=1, mode="grid-wrap")
                # Distance to the zero line in canonical units (one tile pixel = 2 pi r / 128).
                dist = np.abs(val) / (grad + 1e-3) * (2 * np.pi * (r + 0.01) / 128)
                width = w0 * (0.1 / (r + 0.1)) ** 1.2
                fade = np.exp(-r / 0.3) * _smoothstep(r, r0, r0 + 0.06) * _smoothstep(r, 0.01, 0.04)
                tex += (amp * np.exp(-((dist / width) ** 2)) * fade * half).astype(np.float32)
        out.append(np.clip(tex, 0.0, 1.5))
    return np.stack(out)


def _sample_tile(tile: np.ndarray, u: np.ndarray, v: np.ndarray, scale: float, off: tuple[float, float]) -> np.ndarray:
    """Bilinear, wrapping lookup of a periodic tile at canonical coordinates (scale = tiles/unit)."""
    res = tile.shape[0]
    cu = (u * scale + off[0]) * res
    cv = (v * scale + off[1]) * res
    return ndimage.map_coordinates(tile, [cv, cu], order=1, mode="grid-wrap")


# --------------------------------------------------------------------------------------------
# Rendering context


def _sig(x: np.ndarray) -> np.ndarray:
    """Logistic ramp used for every soft edge (float32 in, float32 out)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smoothstep(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """0 below ``a``, 1 above ``b``, smooth in between."""
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _Ctx:
    """Everything a finding may read or modify while one image is rendered."""

    u: np.ndarray
    v: np.ndarray
    eps: float  # one render pixel in canonical units
    anat: _Anatomy
    shot: _Shot
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


def _diaphragm_v(a: _Anatomy, side: int, t: np.ndarray, insp: float) -> np.ndarray:
    """Height of the hemidiaphragm at lateral distance ``t``: a parabolic dome."""
    return a.dome_v[side] + insp + a.dome_curv * (t - a.dome_t) ** 2


def _lung_fields(ctx: _Ctx) -> None:
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
        d = np.minimum(np.minimum(t - t_med, wall), _diaphragm_v(a, side, t, ctx.shot.inspiration) - ctx.v)
        if side == 1:  # aortic knob indents the left lung's upper medial border
            knob = np.hypot(t - 0.03, (ctx.v - 0.31) * 1.1) - 0.04
            d = np.minimum(d, knob)
        lungs.append(_sig(d / eps))
        walls.append(wall)
        depth = d if depth is None else np.maximum(depth, d)
    ctx.lung, ctx.wall = tuple(lungs), tuple(walls)  # type: ignore[assignment]
    # Lungs are round: less air to cross near their edges, so the periphery is a little brighter.
    ctx.depth = 0.55 + 0.45 * np.sqrt(np.clip(depth / 0.09, 0.0, 1.0))


def _heart(ctx: _Ctx) -> np.ndarray:
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
    return _sig((1.0 - r) * min(rx, ry) / ctx.eps)


def _body(ctx: _Ctx) -> np.ndarray:
    """Soft-tissue density: torso with neck and shoulders, thicker centrally, dark air outside."""
    a, u, v = ctx.anat, ctx.u, ctx.v
    half = a.body_half_width * (0.32 + 0.68 * _smoothstep(v, -0.06, 0.12)) + 0.03 * _smoothstep(v, 0.6, 1.0)
    x = np.abs(u - 0.5) / half
    inside = _sig((1.0 - x) * half / (1.5 * ctx.eps))
    thick = np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
    # Mediastinum: the densest column of the chest (great vessels, spine, oesophagus).
    medi = np.exp(-(((u - 0.5 - a.mediastinal_shift) / 0.1) ** 2)) * _smoothstep(v, 0.0, 0.15)
    return inside * (0.30 + 0.32 * thick + 0.07 * medi)


def _bones(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    """(ribs + spine, clavicles) as bright bands; clavicles are not dimmed over soft tissue."""
    a, u, v = ctx.anat, ctx.u, ctx.v
    t = np.abs(u - 0.5 - a.mediastinal_shift)
    top, bot = min(a.lung_top) - 0.04, max(a.dome_v) + 0.14
    t_max = 0.5 * (a.thorax_t[0] + a.thorax_t[1])
    gate = _smoothstep(t, 0.02, 0.05) * (1.0 - _smoothstep(t, t_max + 0.02, t_max + 0.07))
    gate = gate * _smoothstep(v, top - 0.02, top + 0.02) * (1.0 - _smoothstep(v, bot - 0.05, bot))
    # Posterior ribs rise a little lateral to the spine, then arch down along the lateral wall;
    # their spacing widens caudally (power warp of the phase).
    vp = np.clip((v + 0.25 * t - 1.4 * t * t - top) / (bot - top), 0.0, 1.0)
    phase = a.rib_count * vp**0.85 + a.rib_phase
    post = np.exp(-(((phase % 1.0) - 0.5) / 0.22) ** 2)
    # Anterior ribs: fainter, running down from the lateral wall toward the midline.
    va = np.clip((v + 0.55 * t - 0.5 * t * t - top) / (bot - top), 0.0, 1.0)
    ant = np.exp(-((((a.rib_count * 0.75 * va + a.rib_phase) % 1.0) - 0.5) / 0.16) ** 2) * _smoothstep(t, 0.1, 0.2)
    ribs = gate * (post + 0.35 * ant)
    # Clavicles.
    cv = 0.155 + a.clavicle_v - 0.40 * t + 0.62 * t * t - (0.025 if ctx.shot.ap else 0.0)
    clav = np.exp(-(((v - cv) / 0.016) ** 2)) * _smoothstep(t, 0.03, 0.06) * (1.0 - _smoothstep(t, 0.30, 0.36))
    # Spine: vertebral bodies through the mediastinum.
    sx = np.exp(-(((u - 0.5) / 0.034) ** 4))
    spine = sx * (0.6 + 0.4 * np.cos(v * 2 * np.pi / 0.045) ** 2) * _smoothstep(v, 0.0, 0.1)
    return _RIB * a.rib_gain * ribs + 0.06 * spine, _CLAVICLE * clav


def _pixel_grid(res: int, anat: _Anatomy, shot: _Shot) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of every render pixel under the patient's pose."""
    g = ((np.arange(res, dtype=np.float32) + 0.5) / res - 0.5).astype(np.float32)
    x, y = np.meshgrid(g, g)
    x, y = x - shot.shift_u, y - shot.shift_v
    c, s = math.cos(shot.rotation), math.sin(shot.rotation)
    z = shot.zoom
    u = (c * x + s * y) / z + 0.5
    v = (-s * x + c * y) / z + 0.5
    return u.astype(np.float32), v.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Findings. Each ``_plan_*`` draws every random number of one finding instance (geometry from the
# patient-level stream, jitter from the image-level stream), may change the anatomy, and returns
# a ``draw(ctx)`` closure that paints it.

_Draw = Callable[[_Ctx], None]
_Plan = Callable[[np.random.Generator, np.random.Generator, "_Anatomy"], tuple["_Anatomy", _Draw]]


def _strength(rng: np.random.Generator) -> float:
    """How conspicuous one finding instance is: a subtle share, the rest clearly visible."""
    if rng.random() < SUBTLE_SHARE:
        s = rng.uniform(0.08, 0.35)
    else:
        s = rng.uniform(0.35, 1.0)
    return float(s * LESION_CONTRAST)


def _jitter_strength(s: float, jit: np.random.Generator) -> float:
    """A follow-up image shows the same finding a little better or worse."""
    return float(s * jit.uniform(0.8, 1.2))


def _in_lung(anat: _Anatomy, u: float, v: float, margin: float = 0.02) -> bool:
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


def _lung_point(anat: _Anatomy, rng: np.random.Generator, finding: str | None, *, zone: tuple[float, float] = (0.0, 1.0), margin: float = 0.02) -> tuple[float, float, float, float]:
    """A lesion centre inside a lung plus a box size ``(w, h)``.

    Where NIH boxes exist for the finding, the centre and size come from a random real box (the
    canonical frame is NIH's image frame), pulled into the patient's lung if it falls outside;
    otherwise the centre is uniform in the lung within the vertical ``zone`` (0 apex .. 1 base).
    """
    boxes = _bbox_table().get(finding or "")
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


def _blob(ctx: _Ctx, cu: float, cv: float, rx: float, ry: float, soft: float, angle: float = 0.0, lobes: tuple[float, ...] = ()) -> np.ndarray:
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
    return _sig((1.0 - r) * min(rx, ry) / max(soft, ctx.eps))


def _plan_cardiomegaly(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Enlarged cardiac silhouette: CTR 0.49..0.63 (overlapping the healthy tail), widening mostly toward the image right."""
    s = _jitter_strength(_strength(rng), jit)
    ctr = 0.49 + 0.12 * min(s, 1.2) + float(jit.normal(0, 0.005))
    anat = replace(anat, ctr=max(anat.ctr, ctr), heart_half_h=anat.heart_half_h * (1.0 + 0.25 * s), heart_v=anat.heart_v + 0.01 * s)

    def draw(ctx: _Ctx) -> None:
        ctx.add_mask("Cardiomegaly", ctx.heart)

    return anat, draw


def _plan_effusion(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Pleural fluid at a base: blunted costophrenic angle, meniscus rising toward the wall."""
    s = _jitter_strength(_strength(rng), jit)
    r = rng.random()
    sides = (0,) if r < 0.45 else (1,) if r < 0.8 else (0, 1)
    depths = {sd: (0.005 + 0.14 * s) * float(rng.uniform(0.7, 1.3)) for sd in sides}

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        for sd, depth in depths.items():
            t = ctx.side_t(sd)
            t_max = a.thorax_t[sd]
            cp = _diaphragm_v(a, sd, np.float32(t_max), ctx.shot.inspiration)
            rel = np.clip((t - a.medial_t) / (t_max - a.medial_t), 0.0, 1.2)
            level = cp - depth + 0.02 - depth * 0.6 * rel**2  # meniscus climbs laterally
            fluid = _sig((ctx.v - level) / max(0.012, 2 * ctx.eps)) * ctx.lung[sd]
            ctx.air *= 1.0 - 0.95 * fluid
            ctx.vessels *= 1.0 - fluid
            ctx.add_mask("Effusion", fluid)

    return anat, draw


def _plan_pneumothorax(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Apical/lateral air rim: darker, no vessel markings, bounded by a thin pleural line."""
    s = _jitter_strength(_strength(rng), jit)
    side = int(rng.random() < 0.45)
    depth = 0.005 + 0.07 * s
    reach = float(rng.uniform(0.45, 0.8))  # how far down the lateral wall it extends (0..1)

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        top, base = a.lung_top[side], a.dome_v[side]
        zone_v = 1.0 - _smoothstep(ctx.v, top + reach * (base - top) - 0.08, top + reach * (base - top) + 0.04)
        d_edge = depth * zone_v
        gap = ctx.wall[side] - d_edge
        rim = _sig(-gap / ctx.eps) * ctx.lung[side] * (zone_v > 0.05)
        line = np.exp(-((gap / max(0.004, 0.7 * ctx.eps)) ** 2)) * ctx.lung[side] * (zone_v > 0.2)
        # Pleural air is as deep as mid-lung air (no rounded lung edge) and then some.
        ctx.air *= 1.0 + rim * ((1.0 + 0.15 * min(s, 1.0)) / ctx.depth - 1.0)
        ctx.air *= 1.0 - min(0.5, s) * line
        ctx.vessels *= 1.0 - rim
        ctx.add_mask("Pneumothorax", np.maximum(rim, line))

    return anat, draw


def _plan_round(name: str, n_range: tuple[int, int], r_range: tuple[float, float], r_from_box: float) -> _Plan:
    """Factory for Mass (one large lobulated opacity) and Nodule (one to three small ones)."""

    def plan(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
        s = _jitter_strength(_strength(rng), jit)
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        items = []
        for _ in range(n):
            cu, cv, w, h = _lung_point(anat, rng, name, margin=0.03)
            rad = float(np.clip(r_from_box * (w + h) / 2 * rng.uniform(0.8, 1.2), *r_range))
            lobes = tuple(rng.uniform(0.0, 0.12, 2)) + tuple(rng.uniform(0.0, 2 * np.pi, 2)) if name == "Mass" else ()
            items.append((cu + jit.normal(0, 0.004), cv + jit.normal(0, 0.004), rad * jit.uniform(0.9, 1.1), float(rng.uniform(0.85, 1.15)), float(rng.uniform(0, np.pi)), lobes))

        def draw(ctx: _Ctx) -> None:
            for cu, cv, rad, asp, ang, lob in items:
                blob = _blob(ctx, cu, cv, rad * asp, rad / asp, 0.15 * rad, ang, lob)
                core = 0.1 + 0.8 * min(s, 1.0)
                ctx.air *= 1.0 - core * blob
                ctx.density += 0.05 * s * blob
                ctx.add_mask(name, blob)

        return anat, draw

    return plan


def _plan_atelectasis(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Plate-like or wedge band opacity in the lower zones with volume loss on its side."""
    s = _jitter_strength(_strength(rng), jit)
    cu, cv, w, h = _lung_point(anat, rng, "Atelectasis", margin=0.02)
    side = 0 if cu < 0.5 else 1
    length = float(np.clip(0.6 * w, 0.06, 0.2))
    thick = float(rng.uniform(0.012, 0.03)) * (1.0 + 0.5 * s)
    angle = float(rng.normal(0.0, 0.25))
    wedge = rng.random() < 0.35
    lift = 0.035 * s
    dome = list(anat.dome_v)
    dome[side] -= lift
    anat = replace(anat, dome_v=tuple(dome), mediastinal_shift=anat.mediastinal_shift + (0.008 * s if side else -0.008 * s))

    def draw(ctx: _Ctx) -> None:
        band = _blob(ctx, cu, cv, length, thick * (2.2 if wedge else 1.0), 0.4 * thick, angle)
        band *= ctx.lungs()
        ctx.air *= 1.0 - (0.1 + 0.8 * min(s, 1.0)) * band
        ctx.add_mask("Atelectasis", band)

    return anat, draw


def _tex_offset(rng: np.random.Generator) -> tuple[int, tuple[float, float]]:
    """Which noise tile and where in it a textured finding samples."""
    return int(rng.integers(_NOISE_BANK_SIZE)), (float(rng.random()), float(rng.random()))


def _plan_infiltration(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Patchy, ill-defined opacities over a region of one or both lungs."""
    s = _jitter_strength(_strength(rng), jit)
    regions = []
    for _ in range(int(rng.integers(1, 3))):
        cu, cv, w, h = _lung_point(anat, rng, "Infiltration", margin=0.0)
        regions.append((cu, cv, float(np.clip(w * 0.6, 0.06, 0.2)), float(np.clip(h * 0.6, 0.06, 0.22))))
    tile, off = _tex_offset(rng)

    def draw(ctx: _Ctx) -> None:
        env = np.zeros_like(ctx.u)
        for cu, cv, rx, ry in regions:
            env = np.maximum(env, _blob(ctx, cu, cv, rx, ry, 0.5 * min(rx, ry)))
        n = _sample_tile(_noise_bank()[tile], ctx.u, ctx.v, 3.5, off)
        patch = env * _sig((n - 0.2) * 2.5) * ctx.lungs()
        ctx.air *= 1.0 - (0.08 + 0.7 * min(s, 1.0)) * patch
        ctx.add_mask("Infiltration", patch)

    return anat, draw


def _plan_pneumonia(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Lobar/segmental fluffy consolidation of one region, sharp along a fissure."""
    s = _jitter_strength(_strength(rng), jit)
    cu, cv, w, h = _lung_point(anat, rng, "Pneumonia", margin=0.0)
    rx, ry = float(np.clip(0.55 * w, 0.07, 0.17)), float(np.clip(0.5 * h, 0.07, 0.18))
    fissure = cv - ry * float(rng.uniform(0.4, 0.9)) if rng.random() < 0.6 else None
    tile, off = _tex_offset(rng)

    def draw(ctx: _Ctx) -> None:
        env = _blob(ctx, cu, cv, rx, ry, 0.35 * min(rx, ry))
        if fissure is not None:
            env *= _sig((ctx.v - fissure) / ctx.eps)
        n = _sample_tile(_noise_bank()[tile], ctx.u, ctx.v, 6.0, off)
        region = env * ctx.lungs()
        ctx.air *= 1.0 - (0.05 + 0.7 * min(s, 1.0)) * region * (0.7 + 0.3 * np.tanh(n))
        ctx.add_mask("Pneumonia", region)

    return anat, draw


def _plan_consolidation(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Dense homogeneous opacity crossed by dark branching air bronchograms."""
    s = _jitter_strength(_strength(rng), jit)
    cu, cv, _, _ = _lung_point(anat, rng, None, zone=(0.35, 0.95), margin=0.04)
    rx, ry = float(rng.uniform(0.06, 0.13)), float(rng.uniform(0.06, 0.12))
    tex = int(rng.integers(_VESSEL_BANK_SIZE))
    off = (float(rng.normal(0, 0.03)), float(rng.normal(0, 0.03)))
    angle = float(jit.normal(0, 0.2))

    def draw(ctx: _Ctx) -> None:
        region = _blob(ctx, cu, cv, rx, ry, 0.25 * min(rx, ry), angle) * ctx.lungs()
        bronch = ndimage.map_coordinates(_vessel_bank()[tex], [(ctx.v + off[1]) * _BANK_RES - 0.5, (ctx.u + off[0]) * _BANK_RES - 0.5], order=1, mode="nearest")
        dense = 0.15 + 0.8 * min(s, 1.0)
        ctx.air *= 1.0 - region * dense * (1.0 - 0.55 * np.clip(bronch * 1.5, 0.0, 1.0))
        ctx.vessels *= 1.0 - region
        ctx.add_mask("Consolidation", region)

    return anat, draw


def _plan_edema(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Bilateral perihilar bat-wing haze with Kerley-like septal lines at the lateral bases."""
    s = _jitter_strength(_strength(rng), jit)
    spread = float(rng.uniform(0.8, 1.2))
    tile, off = _tex_offset(rng)
    kerley_phase = float(rng.random())

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        lungs = ctx.lungs()
        haze = np.zeros_like(ctx.u)
        for sd in (0, 1):
            t = ctx.side_t(sd)
            haze += np.exp(-(((t - 0.11) / (0.11 * spread)) ** 2) - (((ctx.v - 0.47) / (0.14 * spread)) ** 2))
        n = _sample_tile(_noise_bank()[tile], ctx.u, ctx.v, 4.0, off)
        haze = haze * lungs * (0.75 + 0.25 * np.tanh(n))
        kerley = np.zeros_like(ctx.u)
        for sd in (0, 1):
            band = _smoothstep(ctx.v, a.dome_v[sd] - 0.2, a.dome_v[sd] - 0.1) * _smoothstep(ctx.side_t(sd), a.thorax_t[sd] - 0.07, a.thorax_t[sd] - 0.03)
            kerley += band * ctx.lung[sd]
        lines = np.exp(-((((ctx.v * 55.0 + kerley_phase) % 1.0) - 0.5) / 0.12) ** 2) * kerley
        ctx.air *= 1.0 - (0.03 + 0.4 * min(s, 1.0)) * haze - 0.3 * min(s, 1.0) * lines
        ctx.add_mask("Edema", np.maximum(haze, lines))

    return anat, draw


def _plan_emphysema(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Hyperlucent, over-expanded lungs: low flat diaphragm, sparse vessels, narrow heart, bullae."""
    s = _jitter_strength(_strength(rng), jit)
    drop = 0.005 + 0.045 * s
    anat = replace(
        anat,
        dome_v=(anat.dome_v[0] + drop, anat.dome_v[1] + drop),
        dome_curv=anat.dome_curv * (1.0 - 0.45 * min(s, 1.0)),
        lung_top=(anat.lung_top[0] - 0.01 * s, anat.lung_top[1] - 0.01 * s),
        ctr=anat.ctr * (1.0 - 0.08 * s),
        heart_half_h=anat.heart_half_h * (1.0 - 0.1 * s),
    )
    bullae = [_lung_point(anat, rng, None, zone=(0.0, 0.4), margin=0.04) for _ in range(int(rng.integers(0, 3)))]
    bull_r = [float(rng.uniform(0.025, 0.05)) for _ in bullae]

    def draw(ctx: _Ctx) -> None:
        lungs = ctx.lungs()
        ctx.air *= 1.0 + 0.2 * min(s, 1.0) * lungs
        ctx.vessels *= 1.0 - 0.4 * min(s, 1.0) * lungs
        for (cu, cv, _, _), r in zip(bullae, bull_r):
            b = _blob(ctx, cu, cv, r, r, 0.2 * r) * lungs
            ctx.air *= 1.0 + 0.3 * s * b
            ctx.vessels *= 1.0 - b
        ctx.add_mask("Emphysema", lungs)

    return anat, draw


def _plan_fibrosis(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Reticular (net-like) opacities, basal and peripheral, with mild volume loss."""
    s = _jitter_strength(_strength(rng), jit)
    tile, off = _tex_offset(rng)
    anat = replace(anat, dome_v=(anat.dome_v[0] - 0.012 * s, anat.dome_v[1] - 0.012 * s))
    scale = float(rng.uniform(1.6, 2.4))  # tiles per unit: a net of 3-5 px cells at 64 px

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        env = np.zeros_like(ctx.u)
        for sd in (0, 1):
            basal = _smoothstep(ctx.v, a.lung_top[sd] + 0.2, a.dome_v[sd] - 0.02)
            periph = _smoothstep(ctx.side_t(sd), a.thorax_t[sd] * 0.35, a.thorax_t[sd] * 0.8)
            env += ctx.lung[sd] * np.maximum(basal * (0.5 + 0.5 * periph), 0.5 * periph)
        n = _sample_tile(_noise_bank()[tile], ctx.u, ctx.v, scale, off)
        net = np.exp(-((n / 0.3) ** 2))
        ctx.air *= 1.0 - (0.1 + 0.8 * min(s, 1.0)) * net * env
        ctx.add_mask("Fibrosis", env)

    return anat, draw


def _plan_pleural_thickening(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """A thickened bright pleural rim along the lateral wall or an apical cap."""
    s = _jitter_strength(_strength(rng), jit)
    sides = (int(rng.integers(2)),) if rng.random() < 0.7 else (0, 1)
    thick = 0.012 + 0.04 * s
    v0 = float(rng.uniform(0.0, 0.6))  # segment of the wall, 0 apex .. 1 base
    v1 = min(1.0, v0 + float(rng.uniform(0.3, 0.7)))

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        for sd in sides:
            top, base = a.lung_top[sd], a.dome_v[sd] + 0.08
            seg = _smoothstep(ctx.v, top + v0 * (base - top) - 0.04, top + v0 * (base - top)) * (1.0 - _smoothstep(ctx.v, top + v1 * (base - top), top + v1 * (base - top) + 0.04))
            rim = _sig((thick - ctx.wall[sd]) / ctx.eps) * ctx.lung[sd] * seg
            ctx.air *= 1.0 - (0.5 + 0.4 * min(s, 1.0)) * rim
            ctx.add_mask("Pleural_Thickening", rim)

    return anat, draw


def _plan_hernia(rng: np.random.Generator, jit: np.random.Generator, anat: _Anatomy) -> tuple[_Anatomy, _Draw]:
    """Hiatal hernia: rounded retrocardiac opacity at the diaphragm holding gas (bubbles or a level)."""
    s = _jitter_strength(_strength(rng), jit)
    r = float(rng.uniform(0.055, 0.09))
    du, dv = float(rng.normal(0.03, 0.015)), float(rng.uniform(-0.06, -0.01))
    level = float(rng.uniform(-0.5, 0.0)) if rng.random() < 0.5 else None  # air-fluid level
    bubbles = [(float(rng.normal(0, 0.4)), float(rng.uniform(-0.6, 0.3)), float(rng.uniform(0.18, 0.35))) for _ in range(int(rng.integers(1, 4)))]

    def draw(ctx: _Ctx) -> None:
        a = ctx.anat
        cu, cv = 0.5 + du, min(a.dome_v) + dv
        sac = _blob(ctx, cu, cv, r * 1.15, r, 0.15 * r)
        if level is not None:
            gas = sac * _sig((cv + level * r - ctx.v) / ctx.eps)
        else:
            gas = np.zeros_like(ctx.u)
            for bu, bv, br in bubbles:
                gas = np.maximum(gas, _blob(ctx, cu + bu * r, cv + bv * r, br * r, br * r, 0.25 * br * r))
            gas *= sac
        ctx.density += (0.03 + 0.1 * s) * sac * (1.0 - ctx.lungs()) - (0.08 + 0.25 * min(s, 1.0)) * gas
        ctx.air *= 1.0 - 0.8 * sac
        ctx.add_mask("Hernia", sac)

    return anat, draw


_PLANS: dict[str, _Plan] = {
    "Atelectasis": _plan_atelectasis,
    "Cardiomegaly": _plan_cardiomegaly,
    "Effusion": _plan_effusion,
    "Infiltration": _plan_infiltration,
    "Mass": _plan_round("Mass", (1, 1), (0.045, 0.11), 0.45),
    "Nodule": _plan_round("Nodule", (1, 3), (0.015, 0.035), 0.3),
    "Pneumonia": _plan_pneumonia,
    "Pneumothorax": _plan_pneumothorax,
    "Consolidation": _plan_consolidation,
    "Edema": _plan_edema,
    "Emphysema": _plan_emphysema,
    "Fibrosis": _plan_fibrosis,
    "Pleural_Thickening": _plan_pleural_thickening,
    "Hernia": _plan_hernia,
}
assert tuple(_PLANS) == CHEXNET_LABELS


# --------------------------------------------------------------------------------------------
# The renderer


def _render_factor(size: int) -> int:
    """Supersampling factor: render at >= 128 px (and at least 2x) and box-downsample."""
    return max(2, -(-128 // size))


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Box filter by an integer factor (anti-aliased and exact-size)."""
    n = img.shape[0] // f
    return img.reshape(n, f, n, f).mean(axis=(1, 3))


def _render(labels: np.ndarray, size: int, anat: _Anatomy, shot: _Shot, lesion_seeds: Sequence[int], jitter_seed: int, noise_rng: np.random.Generator, return_masks: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Paint one radiograph (uint8 size x size) for fixed anatomy, shot and finding streams."""
    draws: list[_Draw] = []
    for i in np.flatnonzero(labels):
        rng = np.random.default_rng(lesion_seeds[i])
        jit = np.random.default_rng([jitter_seed, int(i)])
        anat, draw = _PLANS[CHEXNET_LABELS[i]](rng, jit, anat)
        draws.append(draw)

    f = _render_factor(size)
    res = size * f
    u, v = _pixel_grid(res, anat, shot)
    ctx = _Ctx(u=u, v=v, eps=1.0 / (res * shot.zoom), anat=anat, shot=shot)
    _lung_fields(ctx)
    ctx.heart = _heart(ctx)
    ctx.air = np.full_like(u, anat.air_scale)
    ctx.vessels = np.ones_like(u)
    ctx.density = np.zeros_like(u)
    for draw in draws:
        draw(ctx)

    lungs = ctx.lungs() * (1.0 - ctx.heart)
    vt = _vessel_bank()[anat.vessel_tex]
    tex = ndimage.map_coordinates(vt, [(v + shot.vessel_dv) * _BANK_RES - 0.5, (u + shot.vessel_du) * _BANK_RES - 0.5], order=1, mode="nearest")
    aer = np.clip(ctx.air, 0.0, 1.6)
    # Bone contrast is lower over thick soft tissue (scatter, film shoulder), higher over lung.
    ribs, clavicles = _bones(ctx)
    dens = _body(ctx) + ribs * (0.45 + 0.55 * lungs) + clavicles + ctx.density
    dens += 0.03 * ctx.heart * ctx.lungs()
    dens -= _AIR * lungs * aer * ctx.depth
    dens += _VESSEL * anat.vessel_gain * tex * lungs * ctx.vessels * np.clip(aer, 0.0, 1.0)
    dens -= 0.1 * np.exp(-(((u - 0.5 - anat.mediastinal_shift) / 0.014) ** 2)) * (1.0 - _smoothstep(v, 0.28, 0.36)) * _smoothstep(v, 0.02, 0.1)  # trachea
    dens += _extras(ctx)
    # Focal spot and detector blur: no razor-sharp edges at any size.
    dens = ndimage.gaussian_filter(dens, sigma=0.35 * f, mode="nearest", truncate=3.0)

    img = _downsample(dens, f) if f > 1 else dens
    img = _expose(img, shot, noise_rng)
    masks: dict[str, np.ndarray] = {}
    if return_masks:
        masks["lungs"] = _downsample(ctx.lungs(), f).astype(np.float32)
        masks["heart"] = _downsample(ctx.heart, f).astype(np.float32)
        for name, m in ctx.masks.items():
            masks[name] = _downsample(np.broadcast_to(m, u.shape).astype(np.float32), f)
    return img, masks


def _extras(ctx: _Ctx) -> np.ndarray:
    """Gastric bubble, breast shadows in women, soft-tissue mottle, leads and electrodes.

    The clutter is what real films have and a model must learn to ignore; none of it depends on
    the labels.
    """
    a, sh = ctx.anat, ctx.shot
    tile, ou, ov, amp = sh.mottle
    out = amp * _sample_tile(_noise_bank()[tile], ctx.u, ctx.v, 0.8, (ou, ov))
    for cu, cv, ang, curv, half, width, bright in sh.wires:
        c, s = math.cos(ang), math.sin(ang)
        x = (ctx.u - cu) * c + (ctx.v - cv) * s
        y = -(ctx.u - cu) * s + (ctx.v - cv) * c
        dist = np.abs(y - curv * x * x) / np.sqrt(1.0 + (2.0 * curv * x) ** 2)
        along = _sig((half - np.abs(x)) / ctx.eps)
        out += bright * along * _sig((width - dist) / (0.5 * ctx.eps))
    for cu, cv, r in sh.buttons:
        out += 0.2 * _blob(ctx, cu, cv, r, r, 0.5 * ctx.eps)
    if a.stomach_bubble > 0.35:
        cv = a.dome_v[1] + ctx.shot.inspiration + 0.055
        bub = _blob(ctx, 0.5 + a.thorax_t[1] * 0.55, cv, 0.06, 0.035, 0.012)
        out -= 0.12 * a.stomach_bubble * bub * _sig((ctx.v - cv + 0.015) / ctx.eps)
    if a.female:
        for sd in (0, 1):
            t = ctx.side_t(sd)
            out += 0.07 * np.exp(-(((t - a.thorax_t[sd] * 0.7) / 0.16) ** 2) - (((ctx.v - a.dome_v[sd] - 0.02) / 0.09) ** 2))
    return out


def _expose(dens: np.ndarray, shot: _Shot, rng: np.random.Generator) -> np.ndarray:
    """Window, gamma, heel-effect gradient and noise, then quantise to 8 bits."""
    n = dens.shape[0]
    ramp = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    y = (dens - shot.black) / (shot.white - shot.black) + shot.heel * ramp[None, :]
    # Film-like shoulder: bright (dense) regions are compressed rather than clipped.
    y = (1.0 - np.exp(-1.5 * np.clip(y, 0.0, 1.3))) / (1.0 - math.exp(-1.5))
    y = np.clip(y, 0.0, 1.0) ** shot.gamma
    y = y + rng.standard_normal(y.shape).astype(np.float32) * shot.noise
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def _child_seeds(rng: np.random.Generator, k: int) -> list[int]:
    """``k`` independent seeds drawn in one fixed-size call (so later draws never shift)."""
    return [int(x) for x in rng.integers(0, 2**63 - 1, size=k, dtype=np.int64)]


def render_phantom(labels: Sequence[int] | np.ndarray, size: int, rng: np.random.Generator, *, return_masks: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one PA chest radiograph phantom with the given findings.

    ``labels`` is a 14-vector of 0/1 in :data:`~model.labels.CHEXNET_LABELS` order. The image is a
    ``size x size`` uint8 array. ``rng`` is consumed by a fixed amount regardless of ``labels``:
    two calls with equally seeded generators and different labels show the same patient, pose,
    exposure and noise, and differ only by the findings. With ``return_masks`` the result also
    holds a dict of float32 ``size x size`` masks in 0..1: ``"lungs"``, ``"heart"`` and one per
    present finding (named as in ``CHEXNET_LABELS``) marking where that finding was drawn.
    """
    vec = _check_labels(labels)
    size = _check_int("size", size, minimum=16)
    seeds = _child_seeds(rng, 5)
    lesion_rng = np.random.default_rng(seeds[_STREAM_LESION])
    anat = _sample_anatomy(np.random.default_rng(seeds[_STREAM_ANATOMY]))
    shot = _sample_shot(np.random.default_rng(seeds[_STREAM_SHOT]))
    img, masks = _render(vec, size, anat, shot, _child_seeds(lesion_rng, NUM_LABELS), seeds[_STREAM_JITTER], np.random.default_rng(seeds[_STREAM_NOISE]), return_masks)
    return (img, masks) if return_masks else img


# --------------------------------------------------------------------------------------------
# Data set writer


@dataclass(frozen=True)
class _ImageSpec:
    """One CSV row and what is needed to render its pixels."""

    name: str
    patient: int
    followup: int
    labels: np.ndarray
    age: int
    gender: str
    view: str
    shot_seed: int
    noise_seed: int


def _max_followups(n: int) -> int:
    """Cap on images per patient, so that a small ``n`` still spreads over many patients."""
    return int(max(1, min(MAX_FOLLOWUPS, n // 25)))


def _sample_followup_counts(n: int, rng: np.random.Generator) -> list[int]:
    """Images per patient from NIH's distribution truncated at the cap, summing to exactly ``n``."""
    cap = _max_followups(n)
    table = np.array([(k, c) for k, c in label_table()["images_per_patient"] if k <= cap], dtype=np.float64)
    p = table[:, 1] / table[:, 1].sum()
    counts: list[int] = []
    total = 0
    while total < n:
        k = int(table[rng.choice(len(p), p=p), 0])
        k = min(k, n - total)
        counts.append(k)
        total += k
    return counts


def _plan_dataset(n: int, rng: np.random.Generator) -> tuple[list[_ImageSpec], dict[int, tuple[_Anatomy, list[int]]]]:
    """Patients, their follow-up label sequences and acquisition seeds (no pixels yet).

    A follow-up keeps the previous image's whole label set with probability ``followup.keep``
    from the shipped table (NIH's persistence in excess of chance), otherwise draws a fresh one:
    each image's label distribution stays exactly NIH's. A finding that recurs in a patient
    reuses the patient's per-finding geometry stream, so it reappears in the same place.
    """
    tab = label_table()
    keep = float(tab["followup"]["keep"])
    views = tab["view_position"]
    p_ap = views.get("AP", 0) / max(1, sum(views.values()))
    genders = tab["patient_gender"]
    p_female = genders.get("F", 0) / max(1, sum(genders.values()))
    ages = np.array(tab["patient_age"], dtype=np.float64)
    age_p = ages[:, 1] / ages[:, 1].sum()
    mat, cdf = _combinations()

    specs: list[_ImageSpec] = []
    patients: dict[int, tuple[_Anatomy, list[int]]] = {}
    for pid, count in enumerate(_sample_followup_counts(n, rng), start=1):
        female = bool(rng.random() < p_female)
        anat = _sample_anatomy(np.random.default_rng(_child_seeds(rng, 1)[0]), female=female)
        patients[pid] = (anat, _child_seeds(rng, NUM_LABELS))
        age = int(ages[rng.choice(len(age_p), p=age_p), 0])
        combo = None
        for fu in range(count):
            if combo is None or rng.random() >= keep:
                combo = int(np.searchsorted(cdf, rng.random(), side="right"))
            seeds = _child_seeds(rng, 2)
            specs.append(
                _ImageSpec(
                    name=f"{pid:08d}_{fu:03d}.png",
                    patient=pid,
                    followup=fu,
                    labels=mat[combo],
                    age=min(age + fu // 3, 100),
                    gender="F" if female else "M",
                    view="AP" if rng.random() < p_ap else "PA",
                    shot_seed=seeds[0],
                    noise_seed=seeds[1],
                )
            )
    return specs, patients


def _split_patients(patient_ids: Sequence[int], test_fraction: float, rng: np.random.Generator) -> set[int]:
    """Patient ids of the test split (a shuffled ``test_fraction`` of patients, at least one)."""
    ids = np.array(sorted(patient_ids))
    if test_fraction <= 0.0 or len(ids) < 2:
        return set()
    k = int(np.clip(round(test_fraction * len(ids)), 1, len(ids) - 1))
    return {int(x) for x in rng.permutation(ids)[:k]}


def _finding_labels(vec: np.ndarray) -> str:
    """NIH ``Finding Labels`` field: alphabetical names joined by ``|`` or ``No Finding``."""
    names = sorted(CHEXNET_LABELS[i] for i in np.flatnonzero(vec))
    return "|".join(names) if names else NO_FINDING


def _png_bytes(img: np.ndarray) -> bytes:
    """Deterministic 8-bit greyscale PNG (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generate_phantoms(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, *, test_fraction: float = 0.2, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``n`` phantom radiographs and their labels to ``out_dir`` in the NIH layout.

    Creates ``out_dir`` (which must be absent or empty) with ``Data_Entry_2017_v2020.csv``,
    ``images/*.png`` (``size x size``, mode L), patient-disjoint ``train_val_list.txt`` /
    ``test_list.txt`` (about ``test_fraction`` of the patients in test) and ``phantom.json``
    (provenance). The same ``(n, size, seed, test_fraction)`` gives byte-identical files.
    ``progress(done, total)`` is called after each image is written. Returns ``out_dir``.
    """
    n = _check_int("n", n, minimum=1)
    size = _check_int("size", size, minimum=16)
    seed = _check_int("seed", seed, minimum=0)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"The 'test_fraction' parameter of generate_phantoms must be a float in [0, 1). Got {test_fraction!r} instead.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"The 'out_dir' parameter of generate_phantoms must be a new or empty directory. Got {str(out)!r}, which {'is not a directory' if not out.is_dir() else 'is not empty'}.")

    rng = np.random.default_rng(seed)
    specs, patients = _plan_dataset(n, rng)
    test_ids = _split_patients(list(patients), float(test_fraction), rng)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for done, spec in enumerate(specs, start=1):
        anat, lesion_seeds = patients[spec.patient]
        shot_rng = np.random.default_rng(spec.shot_seed)
        shot = _sample_shot(shot_rng, ap=spec.view == "AP")
        img, _ = _render(spec.labels, size, anat, shot, lesion_seeds, spec.shot_seed, np.random.default_rng(spec.noise_seed), False)
        (images / spec.name).write_bytes(_png_bytes(img))
        if progress is not None:
            progress(done, len(specs))
    _write_csv(out / "Data_Entry_2017_v2020.csv", specs, size)
    _write_lines(out / "train_val_list.txt", [s.name for s in specs if s.patient not in test_ids])
    _write_lines(out / "test_list.txt", [s.name for s in specs if s.patient in test_ids])
    meta = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "test_fraction": float(test_fraction),
        "patients": len(patients),
        "test_patients": len(test_ids),
        "label_source": label_table()["source"],
        "knobs": {"lesion_contrast": LESION_CONTRAST, "subtle_share": SUBTLE_SHARE, "noise_level": NOISE_LEVEL, "anatomy_variation": ANATOMY_VARIATION},
    }
    (out / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def _write_csv(path: Path, specs: Sequence[_ImageSpec], size: int) -> None:
    """The NIH label file: verbatim header, 11 fields a row, ``\\n`` line ends."""
    spacing = f"{FIELD_OF_VIEW_MM / size:.3f}"
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(NIH_HEADER + "\n")
        w = csv.writer(fh, lineterminator="\n")
        for s in specs:
            w.writerow([s.name, _finding_labels(s.labels), s.followup, s.patient, s.age, s.gender, s.view, size, size, spacing, spacing])


def _write_lines(path: Path, names: Sequence[str]) -> None:
    """One image name a line, as the NIH split lists."""
    path.write_text("".join(f"{x}\n" for x in names), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Validation


def _check_int(name: str, value: object, *, minimum: int) -> int:
    """An int >= ``minimum`` (bools refused), or a ValueError naming the parameter."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"The {name!r} parameter must be an int >= {minimum}. Got {value!r} instead.")
    return int(value)


def _check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """A 14-vector of 0/1 as uint8, or a ValueError saying what came."""
    vec = np.asarray(labels)
    if vec.shape != (NUM_LABELS,) or not np.isin(vec, (0, 1)).all():
        raise ValueError(f"The 'labels' parameter must be a 0/1 vector of length {NUM_LABELS} in CHEXNET_LABELS order. Got shape {vec.shape} instead.")
    return vec.astype(np.uint8)
