"""Grad-CAM on the classifier's feature map, and where the heat falls anatomically.

Grad-CAM (Selvaraju et al. 2017) weights each channel of a feature map ``A`` by the spatial mean
of ``d logit_k / d A`` and keeps the positive part of the weighted sum. Our target map is
``relu(model.features(x))`` -- exactly what the classifier pools -- so only the head's gradient
is needed: the backbone runs once without autograd and the map is differentiated through
``pool -> classifier`` alone. No hooks are registered, so none can leak or alias.

Why not pytorch-grad-cam (PyPI ``grad-cam``): checked here (1.5.7, installed into a scratch
folder). With ``target_layers=[model.features[-1]]`` on torchvision's DenseNet it hooks ``norm5``,
whose output ``DenseNet.forward`` then ReLUs *in place*; on CPU the stored activation aliases that
tensor (``.cpu().detach()`` is a view) so it is silently post-ReLU, on CUDA it is a pre-ReLU copy
-- the map depends on the device. It also min-max rescales every map (subtracting the minimum
shifts region shares), and it pulls opencv-python-headless (61 MB) + ttach + tqdm from an sdist.
For a GAP + linear head, Grad-CAM on ``relu(features)`` equals CAM (Zhou et al. 2016) up to the
factor ``1/HW``; :func:`grad_cam` computes it with autograd so any linear-on-pooled head works.

Regions: lung fields are located from the image (:func:`locate_regions`): dark regions inside
the body, the two largest, one per side; each lung's vertical extent is split into thirds
(upper/middle/lower zone), its lateral-basal corner is the costophrenic angle, the gap between
the lungs' lower halves is the cardiac silhouette. When the lungs cannot be found plausibly a
fixed grid is used and the result says so. Sides follow the radiological convention of NIH
images: the patient's right is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = [
    "REGION_NAMES",
    "OUTSIDE",
    "RegionMap",
    "grad_cam",
    "upsample_map",
    "locate_regions",
    "fixed_grid_regions",
    "region_shares",
]

_ZONES = ("upper zone", "middle zone", "lower zone")
#: Every region, in display order; their masks are disjoint and cover the whole image.
REGION_NAMES: tuple[str, ...] = (
    *(f"right {z}" for z in _ZONES),
    *(f"left {z}" for z in _ZONES),
    "right costophrenic angle",
    "left costophrenic angle",
    "cardiac silhouette",
    "outside lungs and heart",
)
OUTSIDE = "outside lungs and heart"


# --------------------------------------------------------------------------------------------
# Grad-CAM


@torch.no_grad()
def _feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(model.features(x))


def grad_cam(model: nn.Module, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Logits, pooled features and a Grad-CAM map per target label for ONE image.

    ``x`` is a normalised ``(1, C, H, W)`` input. Returns ``(logits (K,), pooled (F,),
    {target: (h, w) map >= 0 at feature-map resolution})``. The model's train/eval mode and its
    parameters' ``requires_grad`` are left as they were.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"The 'x' parameter must be one normalised image of shape (1, C, H, W). Got {tuple(x.shape)} instead.")
    was_training = model.training
    model.eval()
    try:
        fmap = _feature_map(model, x)
        with torch.enable_grad():
            a = fmap.detach().requires_grad_(True)
            pooled = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)
            logits = model.classifier(pooled)
            n_out = logits.shape[1]
            cams: dict[int, np.ndarray] = {}
            for k, t in enumerate(targets):
                if not 0 <= t < n_out:
                    raise ValueError(f"Grad-CAM target {t} is outside the model's {n_out} outputs")
                (grad,) = torch.autograd.grad(logits[0, t], a, retain_graph=k < len(targets) - 1)
                alpha = grad.mean(dim=(2, 3), keepdim=True)
                cams[t] = F.relu((alpha * a).sum(dim=1))[0].detach().cpu().double().numpy()
    finally:
        model.train(was_training)
    return logits[0].detach().cpu().numpy(), pooled[0].detach().cpu().numpy(), cams


def upsample_map(cam: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a low-resolution map to ``(size, size)`` (non-negative stays non-negative)."""
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float64))[None, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return np.clip(up[0, 0].numpy(), 0.0, None)


# --------------------------------------------------------------------------------------------
# Anatomical regions


@dataclass(frozen=True)
class RegionMap:
    """Disjoint boolean masks (one per name in :data:`REGION_NAMES`) covering the image."""

    masks: dict[str, np.ndarray]
    method: str  # "segmented lung fields" or "fixed grid"
    note: str | None
    #: Per lung (image-left = patient's right first): (row0, row1, col0, col1), inclusive-exclusive.
    lung_boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.masks.values())).shape

    def label_image(self) -> np.ndarray:
        """``(H, W)`` int array: index into :data:`REGION_NAMES` for every pixel."""
        out = np.zeros(self.shape, dtype=np.int16)
        for i, name in enumerate(REGION_NAMES):
            out[self.masks[name]] = i
        return out


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centers)
    mt = m[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mt * w0 - m) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1
    return float(centers[int(np.argmax(between))])


def _row_hull(mask: np.ndarray) -> np.ndarray:
    """Fill every row between the mask's leftmost and rightmost pixel (lungs are row-convex)."""
    out = np.zeros_like(mask)
    for r in np.flatnonzero(mask.any(axis=1)):
        cols = np.flatnonzero(mask[r])
        out[r, cols[0] : cols[-1] + 1] = True
    return out


#: Segmentation attempts in order: darkness thresholds (fractions of the Otsu threshold) x
#: openings that cut bridges to the border (radius as a share of the image height; None: only
#: blank a thin border ring).
_STRATEGIES: tuple[tuple[float, float | None], ...] = tuple(
    (t, o) for t in (1.0, 0.9, 0.8, 0.7) for o in (1 / 32, 1 / 20, 1 / 14, None)
)


def _lung_candidates(img: np.ndarray, threshold: float, opening: float | None) -> list[np.ndarray]:
    """Dark, body-enclosed blobs, largest first (each a boolean mask).

    Dark = below the Otsu threshold of the central image. With ``opening`` (a radius as a share
    of the image height), dark areas connected to the image border (air outside the body, or
    soft tissue above the shoulders that lung apices run into) are discarded after an opening
    wide enough to cut the bridges between them and the lungs; the survivors then grow back
    inside the dark mask. Without it only a thin border ring is blanked.
    """
    h, w = img.shape
    g = ndimage.gaussian_filter(img, sigma=max(1.0, h / 128))
    lo, hi = np.percentile(g, [1, 99])
    g = (g - lo) / max(hi - lo, 1e-6)
    r0, r1, c0, c1 = int(0.1 * h), int(0.9 * h), int(0.1 * w), int(0.9 * w)
    dark = g < threshold * _otsu(g[r0:r1, c0:c1])
    small = max(1, h // 64)
    dark = ndimage.binary_opening(dark, structure=np.ones((2 * small + 1,) * 2, bool))
    if opening is not None:
        disk = _disk(max(2, int(round(opening * h))))
        core = ndimage.binary_opening(dark, structure=disk)
        lab, n = ndimage.label(core)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        core &= ~np.isin(lab, border[border > 0])
        dark = ndimage.binary_dilation(core, structure=disk) & dark
    else:
        ring = max(2, int(0.03 * h))
        dark[:ring], dark[-ring:], dark[:, :ring], dark[:, -ring:] = False, False, False, False
    dark = ndimage.binary_fill_holes(dark)
    lab, n = ndimage.label(dark)
    if n == 0:
        return []
    sizes = ndimage.sum(dark, lab, index=np.arange(1, n + 1))
    order = np.argsort(-sizes)
    return [lab == (i + 1) for i in order[:6] if sizes[i] >= 0.01 * h * w]


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius**2


def _pick_lungs(cands: list[np.ndarray], w: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest candidate on each side of the image; a blob spanning the midline is split."""
    left = right = None
    for m in cands:
        cols = np.flatnonzero(m.any(axis=0))
        if cols[0] < w / 2 < cols[-1] and (w / 2 - cols[0]) > 0.1 * w and (cols[-1] - w / 2) > 0.1 * w:
            # Lungs joined across the mediastinum (low threshold): cut at the column of least mass
            # in the central third.
            colsum = m.sum(axis=0).astype(float)
            a, b = int(w / 3), int(2 * w / 3)
            cut = a + int(np.argmin(colsum[a:b]))
            lm, rm = m.copy(), m.copy()
            lm[:, cut:] = False
            rm[:, :cut] = False
            left = left if left is not None else lm
            right = right if right is not None else rm
            continue
        cx = cols.mean()
        if cx < w / 2 and left is None:
            left = m
        elif cx >= w / 2 and right is None:
            right = m
    if left is None or right is None:
        return None
    return left, right


def _plausible(left: np.ndarray, right: np.ndarray) -> str | None:
    """None if the pair looks like two lungs; otherwise why not."""
    h, w = left.shape
    for name, m in (("image-left", left), ("image-right", right)):
        area = m.mean()
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        if not 0.03 <= area <= 0.35:
            return f"{name} lung field covers {area:.0%} of the image (expected 3-35%)"
        if rows[-1] - rows[0] < 0.25 * h:
            return f"{name} lung field is only {(rows[-1] - rows[0]) / h:.0%} of the image high"
        if cols[-1] - cols[0] < 0.1 * w:
            return f"{name} lung field is only {(cols[-1] - cols[0]) / w:.0%} of the image wide"
        margin = max(2, int(0.03 * h)) + 1
        if rows[0] <= margin or cols[0] <= margin or cols[-1] >= w - 1 - margin:
            return f"{name} lung field runs into the image border (dark air or soft tissue joined it)"
    lr = np.flatnonzero(left.any(axis=1))
    rr = np.flatnonzero(right.any(axis=1))
    overlap = min(lr[-1], rr[-1]) - max(lr[0], rr[0])
    if overlap < 0.5 * min(lr[-1] - lr[0], rr[-1] - rr[0]):
        return "the two lung fields barely overlap vertically"
    ratio = left.sum() / max(right.sum(), 1)
    if not 0.33 <= ratio <= 3.0:
        return f"the lung fields differ in area by a factor {max(ratio, 1 / ratio):.1f}"
    return None


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _regions_from_lungs(lungs: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Zones, costophrenic angles and cardiac silhouette from two lung masks (image-left first).

    Precedence where regions would overlap: costophrenic angle, then lung zones, then heart.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    masks = {name: np.zeros(shape, bool) for name in REGION_NAMES}
    taken = np.zeros(shape, bool)
    boxes = [_box(m) for m in lungs]
    # Fill and widen the dark field so opacities inside or at the lung's edge count as lung.
    fields = [ndimage.binary_dilation(_row_hull(m), iterations=max(1, h // 50)) for m in lungs]
    sides = ("right", "left")  # patient's side of the image-left / image-right lung
    # Costophrenic angle: lateral-basal corner of each lung (lowest fifth, lateral 40 % of its
    # width), reaching a little below and outside the lung where blunting opacities sit.
    for side, (m, (r0, r1, c0, c1)) in enumerate(zip(lungs, boxes)):
        lh, lw = r1 - r0, c1 - c0
        near = ndimage.binary_dilation(_row_hull(m), iterations=max(1, int(0.08 * lh)))
        rows = yy >= r1 - 0.2 * lh
        cols = (xx < c0 + 0.4 * lw) if side == 0 else (xx >= c1 - 0.4 * lw)
        region = near & rows & cols & ~taken
        masks[f"{sides[side]} costophrenic angle"] = region
        taken |= region
    for side, (field_, (r0, r1, c0, c1)) in enumerate(zip(fields, boxes)):
        lh = r1 - r0
        for z, zone in enumerate(_ZONES):
            lo, hi = r0 + z * lh / 3, r0 + (z + 1) * lh / 3
            region = field_ & (yy >= lo) & (yy < hi) & ~taken
            masks[f"{sides[side]} {zone}"] = region
            taken |= region
    # Cardiac silhouette: the gap between the lung fields from mid-lung height down to the
    # medial lung bases (the cardiophrenic angles), a little below them.
    top = int(min(b[0] + 0.45 * (b[1] - b[0]) for b in boxes))
    bases = []
    for m, (r0, r1, c0, c1) in zip(lungs, boxes):
        medial = m[:, c0 + (c1 - c0) // 2 :] if m is lungs[0] else m[:, : c0 + (c1 - c0) // 2]
        rows = np.flatnonzero(medial.any(axis=1))
        bases.append((rows[-1] if len(rows) else r1) + 0.06 * (r1 - r0))
    bottom = int(min(h, max(bases)))
    heart = np.zeros(shape, bool)
    for r in range(top, bottom):
        lcols = np.flatnonzero(fields[0][r])
        rcols = np.flatnonzero(fields[1][r])
        left_edge = lcols[-1] + 1 if len(lcols) else boxes[0][2] + (boxes[0][3] - boxes[0][2]) // 2
        right_edge = rcols[0] if len(rcols) else boxes[1][2] + (boxes[1][3] - boxes[1][2]) // 2
        heart[r, left_edge:right_edge] = True
    heart &= ~taken
    masks["cardiac silhouette"] = heart
    taken |= heart
    masks[OUTSIDE] = ~taken
    return masks


_SEG_SIZE = 128


def _resize(a: np.ndarray, h: int, w: int, order: int) -> np.ndarray:
    if a.shape == (h, w):
        return a
    return ndimage.zoom(a, (h / a.shape[0], w / a.shape[1]), order=order, grid_mode=True, mode="nearest")


def fixed_grid_regions(shape: tuple[int, int], note: str | None = None) -> RegionMap:
    """Regions from fixed fractions of the image: a typical PA frame (fallback only)."""
    h, w = shape
    lungs = []
    for c0, c1 in ((0.1, 0.42), (0.58, 0.9)):
        m = np.zeros(shape, bool)
        m[int(0.15 * h) : int(0.8 * h), int(c0 * w) : int(c1 * w)] = True
        lungs.append(m)
    masks = _regions_from_lungs((lungs[0], lungs[1]), shape)
    # The gap between two rectangles is no heart outline: use a typical PA cardiac box instead
    # (centred a little to the patient's left, i.e. the image right).
    lung_regions = np.logical_or.reduce([masks[n] for n in REGION_NAMES if n not in ("cardiac silhouette", OUTSIDE)])
    heart = np.zeros(shape, bool)
    heart[int(0.45 * h) : int(0.8 * h), int(0.38 * w) : int(0.68 * w)] = True
    masks["cardiac silhouette"] = heart & ~lung_regions
    masks[OUTSIDE] = ~(lung_regions | masks["cardiac silhouette"])
    return RegionMap(masks, "fixed grid", note, tuple(_box(m) for m in lungs))


def locate_regions(image: np.ndarray) -> RegionMap:
    """Anatomical regions of a grey ``(H, W)`` radiograph in [0, 1] (see the module docstring).

    Tries to segment the two lung fields (first discarding dark areas connected to the image
    border, i.e. air outside the body; then, if that fails, only a thin border ring); falls back
    to :func:`fixed_grid_regions` with a note naming why segmentation was not trusted.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"The 'image' parameter must be a 2-D grey image of at least 16x16. Got shape {img.shape} instead.")
    # Segment at <= 128 px (regions are coarse; large openings are slow at full size), then
    # scale the lung masks back up and build the regions at the image's own size.
    small = _resize(img, min(_SEG_SIZE, img.shape[0]), min(_SEG_SIZE, img.shape[1]), order=1)
    why = "no dark lung-like regions found"
    for threshold, opening in _STRATEGIES:
        pair = _pick_lungs(_lung_candidates(small, threshold, opening), small.shape[1])
        if pair is None:
            why = "did not find a lung field on each side"
            continue
        problem = _plausible(*pair)
        if problem is None:
            full = tuple(_resize(m.astype(np.float64), *img.shape, order=0) > 0.5 for m in pair)
            masks = _regions_from_lungs(full, img.shape)
            return RegionMap(masks, "segmented lung fields", None, tuple(_box(m) for m in full))
        why = problem
    return fixed_grid_regions(img.shape, note=f"lung segmentation failed ({why}); regions from a fixed grid")


def region_shares(heat: np.ndarray, regions: RegionMap) -> dict[str, float]:
    """Share of the total (non-negative) heat in each region; sums to 1 (all 0 if no heat)."""
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    if heat.shape != regions.shape:
        raise ValueError(f"heat map shape {heat.shape} does not match the region map's {regions.shape}")
    total = heat.sum()
    if total <= 0:
        return {name: 0.0 for name in REGION_NAMES}
    return {name: float(heat[regions.masks[name]].sum() / total) for name in REGION_NAMES}
