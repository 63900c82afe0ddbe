"""The clinical report's figures: the located regions and one Grad-CAM overlay per explained label.

Composed with numpy and saved with PIL (matplotlib figures cost ~0.3 s each here; the legends
live in the HTML instead), from what :func:`model.explain.evidence.explain_image` kept.
"""

from __future__ import annotations

import numpy as np

from engine.reports.html import rgb_png_uri
from model.explain.evidence import ImageEvidence
from model.explain.gradcam import OUTSIDE, REGION_NAMES, RegionMap

__all__ = ["REGION_COLOURS", "clinical_figures"]

#: One colour per region (RGB 0..255), in REGION_NAMES order; the last (outside) is not drawn.
REGION_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 0, 0),
)


def _grey_rgb(display: np.ndarray) -> np.ndarray:
    return np.repeat((np.clip(display, 0, 1) * 255.0)[..., None], 3, axis=2)


def _outlines(rgb: np.ndarray, regions: RegionMap) -> np.ndarray:
    from scipy import ndimage

    out = rgb.copy()
    for i, name in enumerate(REGION_NAMES[:-1]):
        m = regions.masks[name]
        edge = m & ~ndimage.binary_erosion(m)
        out[edge] = REGION_COLOURS[i]
    return out


def _jet(x: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colours for values in [0, 1] (RGB 0..255)."""
    from matplotlib import colormaps

    return colormaps["jet"](np.clip(x, 0, 1))[..., :3] * 255.0


def _regions_figure(display: np.ndarray, regions: RegionMap) -> str:
    rgb = _grey_rgb(display)
    lab = regions.label_image()
    colours = np.asarray(REGION_COLOURS, dtype=np.float64)[lab]
    inside = lab != REGION_NAMES.index(OUTSIDE)
    rgb[inside] = 0.6 * rgb[inside] + 0.4 * colours[inside]
    return rgb_png_uri(_outlines(rgb, regions))


def _overlay_figure(display: np.ndarray, heat: np.ndarray, regions: RegionMap) -> str:
    """Image and heat overlay side by side, region outlines on the overlay."""
    grey = _grey_rgb(display)
    peak = heat.max()
    norm = heat / peak if peak > 0 else np.zeros_like(heat)
    alpha = (0.15 + 0.5 * norm)[..., None] * (norm[..., None] > 0.02)
    over = (1 - alpha) * grey + alpha * _jet(norm)
    over = _outlines(over, regions)
    gap = np.full((grey.shape[0], 6, 3), 255.0)
    return rgb_png_uri(np.concatenate([grey, gap, over], axis=1))


def clinical_figures(evidence: ImageEvidence) -> dict[str, str]:
    """``{"regions": ..., "gradcam:<label>": ...}`` as PNG data URIs, in report order."""
    figures = {"regions": _regions_figure(evidence.display, evidence.regions)}
    for name, heat in evidence.heat_maps.items():
        figures[f"gradcam:{name}"] = _overlay_figure(evidence.display, heat, evidence.regions)
    return figures
