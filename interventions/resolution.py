"""Resolution jitter for augmentation's ``resolution`` mode: blur and down-and-up-sampling matched to the audit.

A recall collapse from lost resolution (a softer detector, a resampling step on the way to the archive,
the ``blur`` fault) leaves the fine detail a finding is read from below what the backbone learned: a
thin pleural line or a small nodule fades while the anatomy stays. Fine-tuning the top of the network on
images degraded across the range from as sharp as the audited images are to at least as blurred as
they measure teaches it to read findings at the audited resolution instead of the one it was trained at.

The range comes from the fit split itself (:func:`model.data.sharpness.measure_sharpness`, an equivalent
Gaussian sigma in the blur fault's 64-px units): ``sigma_max`` is ``blur_scale`` times the 90th
percentile of the per-image sigmas, at least one pixel (the measurement does not resolve less). Per
training image, with equal odds, either

* a Gaussian blur with sigma drawn uniformly in ``[0, sigma_max]``: :func:`model.data.faults.apply_blur`,
  the fault injector's own blur (linear, so it commutes with the per-channel normalisation), or
* a down-and-up-sampling (bilinear, antialiased down) by a factor drawn uniformly in ``[1, factor_max]``,
  where ``factor_max`` is the factor whose step-edge response reads ``sigma_max`` through the same
  estimator (:func:`matched_factor`), so both halves reach the same measured blur.

Drawn from the training loop's seeded generator: deterministic for a seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from model.data.faults import apply_blur
from model.data.sharpness import edge_peak_ratio, reblur_sigma64, sigma_from_ratio
from model.train import augment_batch

__all__ = ["BLUR_SHARE", "MAX_FACTOR", "down_up", "jitter_range", "matched_factor", "resolution_jitter"]

#: Share of the jittered images that get a Gaussian blur (the others are down-and-up-sampled).
BLUR_SHARE = 0.5
#: The largest down-and-up-sampling factor :func:`matched_factor` considers (a 224-px image at 1/32 is 7 px).
MAX_FACTOR = 32.0
#: The factors tried, about 1.2 % apart.
_FACTORS = np.unique(np.round(np.geomspace(1.0, MAX_FACTOR, 300), 3))


def down_up(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``(N, C, H, W)`` downsampled by ``factor`` (bilinear, antialiased) and back to ``H x W`` (bilinear)."""
    if factor <= 1.0:
        return x
    h, w = x.shape[-2:]
    small = (max(2, round(h / factor)), max(2, round(w / factor)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


@functools.cache
def _factor_sigmas(width: int) -> np.ndarray:
    """Measured blur (64-px units) of a step edge down-and-up-sampled by each of ``_FACTORS`` (non-decreasing);
    the ratio is averaged over four edge positions, since the result depends on where the edge falls."""
    edges = np.zeros((4, 9, width), dtype=np.float64)
    for p in range(4):
        edges[p, :, width // 2 + p:] = 1.0
    tensor = torch.from_numpy(edges).unsqueeze(1)
    sigmas = []
    for f in _FACTORS:
        out = down_up(tensor, float(f)).squeeze(1).numpy()
        ratio = float(np.mean([edge_peak_ratio(e) for e in out]))
        sigmas.append(float(sigma_from_ratio(ratio, width)))
    return np.maximum.accumulate(np.asarray(sigmas))


def matched_factor(sigma64: float, width: int) -> float:
    """The smallest down-and-up-sampling factor whose step-edge blur at ``width`` reads at least ``sigma64``
    (:data:`MAX_FACTOR` when none does)."""
    sigmas = _factor_sigmas(int(width))
    reached = np.nonzero(sigmas >= sigma64)[0]
    return float(_FACTORS[reached[0]] if len(reached) else _FACTORS[-1])


def jitter_range(q90_sigma64: float, width: int, blur_scale: float) -> tuple[float, float]:
    """``(sigma_max, factor_max)`` for a measured 90th-percentile sigma: ``blur_scale`` times it, at least
    one pixel of ``width`` (the measurement's resolution), and the factor that matches it."""
    sigma_max = max(blur_scale * q90_sigma64, reblur_sigma64(width))
    return float(sigma_max), matched_factor(sigma_max, width)


def resolution_jitter(sigma_max64: float, factor_max: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Batch augmentation (normalised in, normalised out): the standard shift/intensity augmentation, then per
    image a blur in ``[0, sigma_max64]`` or a down-and-up-sampling in ``[1, factor_max]`` (equal odds)."""

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = augment_batch(x, generator)
        n = x.shape[0]
        use_blur = torch.rand(n, generator=generator) < BLUR_SHARE
        strength = torch.rand(n, generator=generator)
        out = x.clone()
        for i in range(n):
            t = float(strength[i])
            if bool(use_blur[i]) and t * sigma_max64 > 0:
                channels = [apply_blur(c, t * sigma_max64) for c in x[i].numpy()]
                out[i] = torch.from_numpy(np.stack(channels).astype(np.float32))
            elif not bool(use_blur[i]):
                out[i] = down_up(x[i : i + 1], 1.0 + t * (factor_max - 1.0))[0]
        return out

    return augment
