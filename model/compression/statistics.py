"""Sample statistics of the least-squares problems, and the exact stage's channel tests.

Every re-fit in this package works on second moments, never on the rows themselves: a consumer's
post-BN-ReLU inputs ``A`` and its original outputs ``Z``, sampled at some positions of some
images, are summarised by :class:`Moments` (streamed, centred, float64 sums). The exact stage
reads the same statistics to find input channels that are dead, constant or linearly dependent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CONST_TOL",
    "DEPENDENT_TOL",
    "Stats",
    "Moments",
    "parity_folds",
    "moments_of",
    "sample_rows",
    "moments_3x3",
    "dependent_channels",
    "exact_removals",
    "well_sampled",
]

#: Relative tolerances of the exact stage (float64 statistics): a channel is "constant" when its
#: range is below this fraction of its magnitude, "linearly dependent" when the part of its variance
#: the other kept channels do not explain is below this fraction.
CONST_TOL = 1e-6
DEPENDENT_TOL = 1e-10


@dataclass
class Stats:
    """Centred statistics of one sample: counts, means, covariances (float64)."""

    n: float
    mean_a: torch.Tensor
    mean_z: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor
    var_z: torch.Tensor


class Moments:
    """Streaming centred second moments of features ``A`` (n x f) and targets ``Z`` (n x o).

    Chunks are shifted by the first chunk's means (against cancellation) and summed in float64;
    ``exact=True`` also multiplies in float64 (the exact stage needs it), otherwise the chunk
    products are float32 (twice as fast). Rows are kept in two folds (by image parity) so that a
    ridge can be chosen by cross-validation where samples are few.
    """

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.n = 0
        self.parts: list[dict[str, Any]] = []

    def update(self, a: torch.Tensor, z: torch.Tensor, fold: torch.Tensor | None = None) -> None:
        dt = torch.float64 if self.exact else torch.float32
        for start in range(0, a.shape[0], 4096):
            ac, zc = a[start : start + 4096], z[start : start + 4096]
            if not self.parts:
                self.shift_a = ac.double().mean(0)
                self.shift_z = zc.double().mean(0)
                f, o = a.shape[1], z.shape[1]
                self.parts = [dict(n=0, aa=torch.zeros(f, f, dtype=torch.float64),
                                   az=torch.zeros(f, o, dtype=torch.float64), sa=torch.zeros(f, dtype=torch.float64),
                                   sz=torch.zeros(o, dtype=torch.float64), zz=torch.zeros(o, dtype=torch.float64))
                              for _ in range(2)]
            ac = ac.to(dt) - self.shift_a.to(dt)
            zc = zc.to(dt) - self.shift_z.to(dt)
            fc = fold[start : start + 4096] if fold is not None else None
            for f_id in (0, 1):
                if fc is None:
                    if f_id == 1:
                        break
                    aa, zz = ac, zc
                else:
                    mask = fc == bool(f_id)
                    if not bool(mask.any()):
                        continue
                    aa, zz = ac[mask], zc[mask]
                p = self.parts[f_id]
                p["aa"] += aa.T @ aa
                p["az"] += aa.T @ zz
                p["sa"] += aa.sum(0, dtype=torch.float64)
                p["sz"] += zz.sum(0, dtype=torch.float64)
                p["zz"] += (zz * zz).sum(0, dtype=torch.float64)
                p["n"] += aa.shape[0]
            self.n += ac.shape[0]

    def _stats(self, parts: list[dict[str, Any]]) -> Stats:
        n = float(sum(p["n"] for p in parts))
        sa, sz = sum(p["sa"] for p in parts), sum(p["sz"] for p in parts)
        aa, az, zz = sum(p["aa"] for p in parts), sum(p["az"] for p in parts), sum(p["zz"] for p in parts)
        ma, mz = sa / n, sz / n
        return Stats(n, self.shift_a + ma, self.shift_z + mz, aa / n - torch.outer(ma, ma),
                      az / n - torch.outer(ma, mz), zz / n - mz**2)

    def finish(self) -> "Moments":
        s = self._stats(self.parts)
        self.cov, self.cross, self.var_z, self.mean_a, self.mean_z = s.cov, s.cross, s.var_z, s.mean_a, s.mean_z
        return self

    def folds(self) -> tuple[Stats, Stats] | None:
        """Statistics of each fold, or None when a fold is (nearly) empty."""
        if min(p["n"] for p in self.parts) < 2:
            return None
        return self._stats([self.parts[0]]), self._stats([self.parts[1]])


def parity_folds(n_images: int, per_image: int, first: int = 0) -> torch.Tensor:
    """Fold of each row when rows come image by image (``per_image`` rows each)."""
    return ((torch.arange(n_images) + first) % 2 == 1).repeat_interleave(per_image)


def moments_of(a: torch.Tensor, z: torch.Tensor, exact: bool, fold: torch.Tensor | None = None) -> Moments:
    m = Moments(exact)
    m.update(a, z, fold)
    return m.finish()


def sample_rows(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``t`` (n, c, h, w) or (n, c, hw) sampled at ``pos`` (n, q) -> (n*q, c)."""
    n, c = t.shape[:2]
    flat = t.reshape(n, c, -1)
    g = flat.gather(2, pos[:, None, :].expand(n, c, pos.shape[1]))
    return g.permute(0, 2, 1).reshape(-1, c)


def moments_3x3(a2: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None = None,
                exact: bool = False) -> Moments:
    """Moments of the 3x3 convolution's unfolded input (channel-major, 9 taps) against its output."""
    m = Moments(exact=exact)
    buf_a: list[torch.Tensor] = []
    buf_z: list[torch.Tensor] = []
    buf_f: list[torch.Tensor] = []
    rows = 0
    for start in range(0, a2.shape[0], 16):
        chunk = a2[start : start + 16]
        if keep is not None:
            chunk = chunk[:, keep]
        cols = F.unfold(chunk, 3, padding=1)
        p = pos[start : start + 16]
        buf_a.append(sample_rows(cols, p))
        buf_z.append(sample_rows(y[start : start + 16], p))
        buf_f.append(parity_folds(p.shape[0], p.shape[1], start))
        rows += p.numel()
        if rows >= 4096 or start + 16 >= a2.shape[0]:
            m.update(torch.cat(buf_a), torch.cat(buf_z), torch.cat(buf_f))
            buf_a, buf_z, buf_f, rows = [], [], [], 0
    return m.finish()


def dependent_channels(gram: torch.Tensor, tol: float) -> list[int]:
    """Channels explained (unexplained variance share <= ``tol``) by *earlier* channels.

    Gram-Schmidt in channel order on the correlation matrix (float64): of two duplicates the
    later one is the dependent one, so every consumer drops the same copy and the producer can
    stop making it.
    """
    from scipy.linalg import solve_triangular

    n = gram.shape[0]
    if n < 2:
        return []
    d = torch.diagonal(gram).clamp_min(1e-300).sqrt()
    corr = (gram / torch.outer(d, d)).numpy().astype(np.float64)
    lower = np.zeros((n, n))
    kept: list[int] = []
    dependent: list[int] = []
    for j in range(n):
        k = len(kept)
        if k:
            v = solve_triangular(lower[:k, :k], corr[kept, j], lower=True, check_finite=False)
            r = 1.0 - float(v @ v)
        else:
            v, r = np.zeros(0), 1.0
        if r <= tol:
            dependent.append(j)
            continue
        lower[k, :k] = v
        lower[k, k] = math.sqrt(r)
        kept.append(j)
    return dependent


def exact_removals(m: Moments, amin: torch.Tensor, amax: torch.Tensor, dependent: bool = True) -> dict[str, list[int]]:
    """Dead, constant and (with ``dependent``) linearly dependent input channels of a 1x1 consumer.

    Dependence needs float64 statistics; the reconstruction stage (float32) skips it -- its
    backward elimination removes such channels first anyway, at no cost.
    """
    dead = [i for i in range(len(amax)) if float(amax[i]) == 0.0]
    dead_set = set(dead)
    const = [i for i in range(len(amax)) if i not in dead_set
             and float(amax[i] - amin[i]) <= CONST_TOL * max(abs(float(amax[i])), abs(float(amin[i])))]
    gone = dead_set | set(const)
    rest = well_sampled([i for i in range(len(amax)) if i not in gone], torch.diagonal(m.cov), amin, amax)
    dep: list[int] = []
    if dependent and len(rest) > 1:
        idx = torch.tensor(rest)
        dep = [rest[i] for i in dependent_channels(m.cov[idx][:, idx], DEPENDENT_TOL)]
    return {"dead": dead, "constant": const, "dependent": dep}


def well_sampled(chans: list[int], var: torch.Tensor, amin: torch.Tensor, amax: torch.Tensor) -> list[int]:
    """Channels whose sampled variance reflects their full range; only these can be judged dependent.

    A channel that is (almost) zero on the sampled positions but not on all calibration inputs
    would look linearly dependent on anything; it is kept, not folded.
    """
    return [i for i in chans if float(var[i]) > (1e-6 * float(amax[i] - amin[i])) ** 2]
