"""One phantom image: plan its findings, paint them over the base radiograph, expose.

Randomness: only ``np.random.default_rng``. A rendered image draws independent child streams for
anatomy, acquisition, noise and each finding, so adding or removing one label leaves everything
else in the image unchanged (which is what the tests and any attribution check rely on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.data.phantom.anatomy import Anatomy, Shot, sample_anatomy, sample_shot
from model.data.phantom.checks import check_int, check_labels
from model.data.phantom.context import RenderContext
from model.data.phantom.findings.common import Draw
from model.data.phantom.findings.table import PLANS
from model.data.phantom.radiograph import base_context, density, downsample, expose, render_factor
from model.labels import CHEXNET_LABELS, NUM_LABELS

# Child streams of one rendered image, in draw order (never reorder: it changes every phantom).
_STREAM_ANATOMY, _STREAM_SHOT, _STREAM_NOISE, _STREAM_LESION, _STREAM_JITTER = range(5)


def child_seeds(rng: np.random.Generator, k: int) -> list[int]:
    """``k`` independent seeds drawn in one fixed-size call (so later draws never shift)."""
    return [int(x) for x in rng.integers(0, 2**63 - 1, size=k, dtype=np.int64)]


def _plan_findings(labels: np.ndarray, anat: Anatomy, lesion_seeds: Sequence[int], jitter_seed: int) -> tuple[Anatomy, list[Draw]]:
    """Each present finding's plan, in CheXNet order: the anatomy they leave and their painters."""
    draws: list[Draw] = []
    for i in np.flatnonzero(labels):
        rng = np.random.default_rng(lesion_seeds[i])
        jit = np.random.default_rng([jitter_seed, int(i)])
        anat, draw = PLANS[CHEXNET_LABELS[i]](rng, jit, anat)
        draws.append(draw)
    return anat, draws


def _masks(ctx: RenderContext, f: int) -> dict[str, np.ndarray]:
    """Lungs, heart and every painted finding's mask, downsampled to the output size (float32)."""
    masks = {"lungs": downsample(ctx.lungs(), f).astype(np.float32), "heart": downsample(ctx.heart, f).astype(np.float32)}
    for name, m in ctx.masks.items():
        masks[name] = downsample(np.broadcast_to(m, ctx.u.shape).astype(np.float32), f)
    return masks


def render_radiograph(labels: np.ndarray, size: int, anat: Anatomy, shot: Shot, lesion_seeds: Sequence[int], jitter_seed: int, noise_rng: np.random.Generator, return_masks: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Paint one radiograph (uint8 size x size) for fixed anatomy, shot and finding streams."""
    anat, draws = _plan_findings(labels, anat, lesion_seeds, jitter_seed)
    f = render_factor(size)
    ctx = base_context(size * f, anat, shot)
    for draw in draws:
        draw(ctx)
    dens = density(ctx, f)
    img = downsample(dens, f) if f > 1 else dens
    img = expose(img, shot, noise_rng)
    return img, (_masks(ctx, f) if return_masks else {})


def render_phantom(labels: Sequence[int] | np.ndarray, size: int, rng: np.random.Generator, *, return_masks: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one PA chest radiograph phantom with the given findings.

    ``labels`` is a 14-vector of 0/1 in :data:`~model.labels.CHEXNET_LABELS` order. The image is a
    ``size x size`` uint8 array. ``rng`` is consumed by a fixed amount regardless of ``labels``:
    two calls with equally seeded generators and different labels show the same patient, pose,
    exposure and noise, and differ only by the findings. With ``return_masks`` the result also
    holds a dict of float32 ``size x size`` masks in 0..1: ``"lungs"``, ``"heart"`` and one per
    present finding (named as in ``CHEXNET_LABELS``) marking where that finding was drawn. Bad
    ``labels`` or ``size`` raise :class:`~engine.core.errors.DataError`.
    """
    vec = check_labels(labels)
    size = check_int("size", size, minimum=16)
    seeds = child_seeds(rng, 5)
    lesion_rng = np.random.default_rng(seeds[_STREAM_LESION])
    anat = sample_anatomy(np.random.default_rng(seeds[_STREAM_ANATOMY]))
    shot = sample_shot(np.random.default_rng(seeds[_STREAM_SHOT]))
    img, masks = render_radiograph(vec, size, anat, shot, child_seeds(lesion_rng, NUM_LABELS), seeds[_STREAM_JITTER], np.random.default_rng(seeds[_STREAM_NOISE]), return_masks)
    return (img, masks) if return_masks else img
