"""How sharp a set of radiographs is: an equivalent Gaussian blur sigma, in the blur fault's units.

Method (re-blur gradient ratio, as in Zhuo & Sim, "Defocus map estimation from a single image", 2011):
blurring an image again with a known Gaussian ``sigma_a`` lowers the gradient at an edge by a factor
that depends only on how blurred the edge already was: for a step edge blurred with ``sigma`` the peak
gradient ratio is ``sqrt(sigma**2 + sigma_a**2) / sigma``, large for a sharp edge and close to 1 for a
blurred one. Per image:

1. gradient magnitude (central differences) of the image and of its re-blurred copy
   (:func:`model.data.faults.apply_blur`, the blur the fault injects, with :data:`REBLUR_SIGMA64` or one
   pixel, whichever is larger: a re-blur under a pixel barely moves the gradient);
2. edge points: local maxima (3x3) of the re-blurred gradient above its :data:`EDGE_QUANTILE` quantile
   (selecting on the re-blurred gradient keeps pixel noise out of the edge set);
3. the median gradient ratio over those points, turned into a sigma through a table measured on a
   synthetic step edge with the same operators at the same image width (so the finite differences and
   the pixel grid are accounted for exactly instead of by the continuous formula).

Sigmas are in pixels of a 64-px-wide image (scaled with width), like ``blur[:sigma=..]``, so a
measurement reads directly against the fault that would explain it. A sharp rendering is not 0
(edges span a pixel or so: phantoms at 64 px read about 0.4-0.7) and blur adds roughly in quadrature
(``blur:sigma=1.5`` on them reads about 1.6-1.75). Below about one pixel of the measured image the ratio
barely moves, so on 32-px images sharp ones scatter between 0 and 1 (a blur of 1.5 still reads 1.3-1.8);
a known blur of 0.75-3 on step edges reads within 10 %. An image without edges
gives no estimate (NaN), and a set in which no image has one says so (``sigma64_median`` None).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from model.data.faults import apply_blur

__all__ = ["EDGE_QUANTILE", "REBLUR_SIGMA64", "SharpnessMeasurement", "edge_peak_ratio", "image_blur_sigma",
           "measure_sharpness", "reblur_sigma64", "sigma_from_ratio", "step_edge"]

#: The known re-blur (64-px units); at least one pixel (:func:`reblur_sigma64`).
REBLUR_SIGMA64 = 1.0
#: Edge points are local maxima of the re-blurred gradient above this quantile of it.
EDGE_QUANTILE = 0.9
#: The sigmas (64-px units) the step-edge table covers; a larger blur reads as the largest.
_TABLE_SIGMAS = np.linspace(0.0, 8.0, 161)
_METHOD = (f"re-blur gradient ratio: median over edge points (3x3 maxima of the re-blurred gradient above its "
           f"{EDGE_QUANTILE:g} quantile) of |grad I| / |grad blur(I, s)| with s = max({REBLUR_SIGMA64:g}, 64/width), inverted through a "
           "step-edge table at the image width; sigma in 64-px units")


def reblur_sigma64(width: int) -> float:
    """The re-blur at ``width`` (64-px units): :data:`REBLUR_SIGMA64`, or one pixel on narrower images."""
    return max(REBLUR_SIGMA64, 64.0 / width)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(image)
    return np.hypot(gx, gy)


def step_edge(width: int, height: int = 9) -> np.ndarray:
    """A vertical black-to-white step at the middle column of a ``(height, width)`` image."""
    edge = np.zeros((height, width), dtype=np.float64)
    edge[:, width // 2:] = 1.0
    return edge


def edge_peak_ratio(edge: np.ndarray) -> float:
    """Gradient ratio (image / re-blurred image) at the gradient peak of the middle row of a vertical edge."""
    row = edge.shape[0] // 2
    g = _gradient_magnitude(edge)[row]
    g_a = _gradient_magnitude(apply_blur(edge, reblur_sigma64(edge.shape[1])))[row]
    k = int(np.argmax(g))
    return float(g[k] / g_a[k])


@functools.cache
def _ratio_table(width: int) -> np.ndarray:
    """Peak gradient ratio of a step edge blurred by each of :data:`_TABLE_SIGMAS` at ``width`` (non-increasing)."""
    ratios = [edge_peak_ratio(apply_blur(step_edge(width), s) if s > 0 else step_edge(width)) for s in _TABLE_SIGMAS]
    return np.minimum.accumulate(np.asarray(ratios))


def sigma_from_ratio(ratio: float | np.ndarray, width: int) -> float | np.ndarray:
    """The step-edge blur (64-px units) whose peak gradient ratio at ``width`` is ``ratio``
    (clipped to the table: a ratio above a sharp step's reads 0, one near 1 reads the table's largest)."""
    table = _ratio_table(int(width))
    return np.interp(-np.asarray(ratio, dtype=np.float64), -table, _TABLE_SIGMAS)


def image_blur_sigma(image: np.ndarray) -> float:
    """Equivalent Gaussian blur of one grey ``(H, W)`` image, 64-px units; NaN when it has no edge."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < 3:
        raise ValueError(f"expected a grey (H, W) image of at least 3x3 pixels, got shape {image.shape}")
    g = _gradient_magnitude(image)
    g_a = _gradient_magnitude(apply_blur(image, reblur_sigma64(image.shape[1])))
    if not np.any(g_a > 1e-9):
        return math.nan
    peaks = (g_a == ndimage.maximum_filter(g_a, size=3)) & (g_a >= np.quantile(g_a, EDGE_QUANTILE)) & (g_a > 1e-9)
    ratio = float(np.median(g[peaks] / g_a[peaks]))
    return float(sigma_from_ratio(ratio, image.shape[1]))


@dataclass(frozen=True)
class SharpnessMeasurement:
    """Per-image equivalent blur of a set of images and its summary (None where no image had an edge)."""

    sigmas64: tuple[float, ...]
    width: int

    @property
    def measured(self) -> np.ndarray:
        values = np.asarray(self.sigmas64, dtype=np.float64)
        return values[np.isfinite(values)]

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the per-image sigmas, or None when none could be measured."""
        values = self.measured
        return float(np.quantile(values, q)) if len(values) else None

    def record(self) -> dict[str, Any]:
        """What the audit keeps: the method, the counts and the median / 10 % / 90 % quantiles."""
        return {"method": _METHOD, "width_px": self.width, "n_images": len(self.sigmas64),
                "n_without_edges": len(self.sigmas64) - len(self.measured),
                "sigma64_median": self.quantile(0.5), "sigma64_q10": self.quantile(0.1),
                "sigma64_q90": self.quantile(0.9)}


def measure_sharpness(images: np.ndarray) -> SharpnessMeasurement:
    """Equivalent blur of each image of an ``(N, H, W)`` stack (in [0, 1] grey or any affine scale)."""
    images = np.asarray(images)
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty (N, H, W) stack of grey images, got shape {images.shape}")
    return SharpnessMeasurement(tuple(image_blur_sigma(im) for im in images), int(images.shape[2]))
