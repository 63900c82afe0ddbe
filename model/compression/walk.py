"""The network walk: one pass through the network, consumer by consumer, in network order.

:class:`Walk` owns what every pass shares: the traversal (block by block, each dense layer, then
the block's transition or the head), each consumer's activations under the original network and
under the already compressed prefix, the moments of its least-squares problem, and installing a
re-fitted consumer into the working copy. What to *do* at a consumer is the mode's business; the
four modes are subclasses in :mod:`model.compression.modes` (plan, exact, compress, replay), each
overriding :meth:`Walk.fit_dense` and :meth:`Walk.fit_simple` (plus :meth:`Walk.bottleneck` for
how a dense layer's bottleneck is chosen).

Names: *orig* is the original network's value, *now* the value under the compressed prefix;
a block's *concat* is its growing concatenation on the sampled images; *hold* the held-out inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.compression.calibration import Calibration
from model.compression.least_squares import EXACT_RIDGE, choose_ridge, refit, ridge_to_json
from model.compression.passes import consumer_names, original_pass, sample_positions, stem_output, through_transition
from model.compression.settings import CompressSettings, Progress
from model.compression.statistics import Moments, moments_3x3, moments_of, parity_folds, sample_rows
from model.nets.pruned import (
    PrunedDenseLayer,
    PrunedDenseNet,
    PrunedTransition,
    SubsetBatchNorm2d,
    encode_index,
)

__all__ = ["DenseSite", "SimpleSite", "Walk", "copy_bn"]


@dataclass
class DenseSite:
    """One dense layer as the walk reaches it: where it sits and its activations (sampled rows)."""

    block: int
    name: str
    parent_layer: PrunedDenseLayer
    #: The working network's layer before this consumer is re-fitted.
    work_layer: PrunedDenseLayer
    #: The block's concatenation under the compressed prefix (this layer writes its outputs in it).
    concat_now: torch.Tensor
    #: Where this layer's outputs start in the concatenation.
    offset: int
    positions_3x3: torch.Tensor
    #: ``conv1``'s post-BN-ReLU inputs under the compressed prefix.
    conv1_in_now: torch.Tensor
    conv1_moments: Moments
    #: The original ``conv2`` inputs (bottleneck) and outputs.
    conv2_in_orig: torch.Tensor
    conv2_out_orig: torch.Tensor
    #: Statistics in float64 (the exact stage and non-``ls`` replays need them).
    float64: bool
    conv1_sens: torch.Tensor
    conv2_sens: torch.Tensor
    hold_now: torch.Tensor | None

    @property
    def candidates(self) -> torch.Tensor:
        """The input channels the layer reads now (positions in the block's concatenation)."""
        return self.work_layer.norm1.index

    @property
    def mid(self) -> int:
        return self.parent_layer.conv1.out_channels

    @property
    def growth(self) -> int:
        return self.parent_layer.out_channels


@dataclass
class SimpleSite:
    """A 1x1 consumer (a transition or the head) as the walk reaches it."""

    block: int
    name: str
    kind: str
    moments: Moments
    sens: torch.Tensor
    old_weight: torch.Tensor
    candidates: torch.Tensor
    outputs: int
    #: Spatial positions per image its convolution runs at (a transition's pooled map; 1 for the head).
    hw: int
    slot: _TransitionSlot | _HeadSlot
    hold_now: torch.Tensor | None


class Walk:
    """One pass through the network, consumer by consumer (see the module docstring).

    Subclasses set :attr:`changes_network` and implement the per-mode steps. After :meth:`run`,
    ``work`` is the re-fitted network (still in the parent's channel layout: surgery comes later),
    ``records`` the replayable per-consumer record and ``exact_found`` the exact stage's counts.
    """

    #: Whether the walk re-fits consumers: then each one also sees its inputs as the compressed
    #: prefix produces them (planning only measures the original network).
    changes_network = True

    def __init__(self, parent: PrunedDenseNet, calib: Calibration, settings: CompressSettings, *,
                 sens: dict[str, torch.Tensor] | None = None, cache: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> None:
        self.parent = parent.eval()
        self.cache = cache if cache is not None else {}
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.work = copy.deepcopy(parent).eval()
        self.calib = calib
        self.settings = settings
        self.sens = sens or {}
        self.progress = progress
        self.records: dict[str, dict[str, Any]] = {}
        self.exact_found: dict[str, dict[str, int]] = {}
        self.names = consumer_names(parent)
        self.done = 0
        self.samples = sample_positions(parent, calib.fit.shape[0], int(calib.fit.shape[-1]), settings)

    # ----------------------------------------------------------------- per-mode steps
    def float64_statistics(self, name: str) -> bool:
        """Whether consumer ``name``'s moments are multiplied in float64."""
        return False

    def fit_dense(self, site: DenseSite) -> None:
        raise NotImplementedError

    def fit_simple(self, site: SimpleSite) -> None:
        raise NotImplementedError

    def bottleneck(self, site: DenseSite, conv2_in_now: torch.Tensor, request: Any,
                   exact_info: dict[str, list[int]] | None) -> tuple[torch.Tensor, Moments | None,
                                                                       dict[str, list[int]] | None]:
        """The kept bottleneck channels for ``request``, the 3x3 moments if computed, the exact counts."""
        raise NotImplementedError

    # ----------------------------------------------------------------- traversal
    def run(self) -> Walk:
        calib = self.calib
        parent_blocks = self.parent.blocks()
        n_blocks = len(parent_blocks)
        if "orig_inputs" not in self.cache:
            self.cache["orig_inputs"], self.cache["ranges"] = original_pass(self.parent, calib.fit)
        orig_inputs = self.cache["orig_inputs"]
        self.ranges = self.cache["ranges"]
        fit_now = hold_now = None
        if self.changes_network:
            fit_now = stem_output(self.work, calib.fit)
            hold_now = stem_output(self.work, calib.hold) if len(calib.hold) else None
        for b in range(n_blocks):
            images, positions, positions_3x3 = self.samples[b]
            block = parent_blocks[b]
            block_in = orig_inputs[b]
            concat_orig = block_in.new_empty((len(images), block.out_width) + tuple(block_in.shape[2:]))
            concat_orig[:, : block.in_width] = block_in[images]
            if self.changes_network:
                concat_now = concat_orig.new_empty(concat_orig.shape)
                concat_now[:, : block.in_width] = fit_now[images]
            else:
                concat_now = concat_orig
            offset = block.in_width
            for lname, parent_layer in block.items():
                self._dense(b, lname, parent_layer, concat_orig, concat_now, offset, positions, positions_3x3,
                            hold_now)
                offset += parent_layer.out_channels
            if b < n_blocks - 1:
                self._transition(b, concat_orig, concat_now, positions, hold_now)
                if self.changes_network:
                    fit_now = through_transition(self.work, b, fit_now)
                    hold_now = through_transition(self.work, b, hold_now) if hold_now is not None else None
            else:
                self._head(b, concat_orig, concat_now, hold_now)
        return self

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, len(self.names))

    # ----------------------------------------------------------------- consumers
    def _dense(self, b: int, lname: str, parent_layer: PrunedDenseLayer, concat_orig: torch.Tensor,
               concat_now: torch.Tensor, offset: int, positions: torch.Tensor, positions_3x3: torch.Tensor,
               hold_now: torch.Tensor | None) -> None:
        name = f"denseblock{b + 1}.{lname}"
        work_layer: PrunedDenseLayer = self.work.blocks()[b][lname]
        growth, mid = parent_layer.out_channels, parent_layer.conv1.out_channels
        with torch.no_grad():
            conv1_in = F.relu(parent_layer.norm1(concat_orig[:, :offset]))
            conv1_out = parent_layer.conv1(conv1_in)
            conv2_in = F.relu(parent_layer.norm2(conv1_out))
            conv2_out = parent_layer.conv2(conv2_in)
            concat_orig[:, offset : offset + growth] = conv2_out
            conv1_in_now = F.relu(work_layer.norm1(concat_now[:, :offset])) if self.changes_network else conv1_in
        float64 = self.float64_statistics(name)
        fold = parity_folds(conv1_in_now.shape[0], positions.shape[1])
        conv1_moments = moments_of(sample_rows(conv1_in_now, positions), sample_rows(conv1_out, positions),
                                   exact=float64, fold=fold)
        self.fit_dense(DenseSite(
            block=b, name=name, parent_layer=parent_layer, work_layer=work_layer, concat_now=concat_now,
            offset=offset, positions_3x3=positions_3x3, conv1_in_now=conv1_in_now, conv1_moments=conv1_moments,
            conv2_in_orig=conv2_in, conv2_out_orig=conv2_out, float64=float64,
            conv1_sens=self.sens.get(name + ".conv1", torch.ones(mid, dtype=torch.float64)),
            conv2_sens=self.sens.get(name + ".conv2", torch.ones(growth, dtype=torch.float64)),
            hold_now=hold_now))
        self._tick()

    def _transition(self, b: int, concat_orig: torch.Tensor, concat_now: torch.Tensor, positions: torch.Tensor,
                    hold_now: torch.Tensor | None) -> None:
        name = f"transition{b + 1}"
        parent_tr: PrunedTransition = self.parent.transitions()[b]
        work_tr: PrunedTransition = self.work.transitions()[b]
        with torch.no_grad():
            inputs_orig = F.relu(parent_tr.norm(concat_orig))
            outputs_orig = parent_tr.conv(inputs_orig)
            inputs_now = F.relu(work_tr.norm(concat_now)) if self.changes_network else inputs_orig
        out = parent_tr.conv.out_channels
        fold = parity_folds(inputs_now.shape[0], positions.shape[1])
        self._simple(b, name, "transition", outputs_orig, inputs_now, lambda t: sample_rows(t, positions), fold,
                     work_tr.conv.weight.detach().reshape(out, -1), work_tr.norm.index, _TransitionSlot(self, b, out),
                     out, hold_now)

    def _head(self, b: int, concat_orig: torch.Tensor, concat_now: torch.Tensor, hold_now: torch.Tensor | None) -> None:
        parent = self.parent
        with torch.no_grad():
            pooled_orig = torch.flatten(F.adaptive_avg_pool2d(F.relu(parent.features.norm5(concat_orig)), 1), 1)
            logits_orig = parent.classifier(pooled_orig)
            norm5 = self.work.features.norm5
            pooled_now = (torch.flatten(F.adaptive_avg_pool2d(F.relu(norm5(concat_now)), 1), 1)
                          if self.changes_network else pooled_orig)
        n_out = parent.classifier.out_features
        self._simple(b, "head", "head", logits_orig, pooled_now, lambda t: t, parity_folds(pooled_now.shape[0], 1),
                     self.work.classifier.weight.detach(), self.work.features.norm5.index, _HeadSlot(self, n_out),
                     n_out, hold_now)

    def _simple(self, b: int, name: str, kind: str, outputs_orig: torch.Tensor, inputs_now: torch.Tensor,
                rows: Any, fold: torch.Tensor, old_weight: torch.Tensor, candidates: torch.Tensor,
                slot: _TransitionSlot | _HeadSlot, outputs: int, hold_now: torch.Tensor | None) -> None:
        """A 1x1 consumer (transition or head): its moments, then the mode's step."""
        float64 = self.float64_statistics(name)
        moments = moments_of(rows(inputs_now), rows(outputs_orig), exact=float64, fold=fold)
        # Positions its 1x1 convolution runs at: a transition pools first (PrunedTransition), the head is pooled.
        hw = (inputs_now.shape[2] // 2) * (inputs_now.shape[3] // 2) if kind == "transition" else 1
        self.fit_simple(SimpleSite(
            block=b, name=name, kind=kind, moments=moments,
            sens=self.sens.get(name, torch.ones(outputs, dtype=torch.float64)), old_weight=old_weight,
            candidates=candidates, outputs=outputs, hw=hw, slot=slot, hold_now=hold_now))
        self._tick()

    # ----------------------------------------------------------------- bias folding
    def _readers(self, b: int) -> list[SubsetBatchNorm2d]:
        blocks = self.work.blocks()
        norms = [layer.norm1 for layer in blocks[b].values()]
        if b < len(blocks) - 1:
            norms.append(self.work.transitions()[b].norm)
        else:
            norms.append(self.work.features.norm5)
        return norms

    def fold(self, b: int, start: int, shift: torch.Tensor) -> None:
        """A produced bias ``shift`` on block ``b``'s channels ``start..`` moves into its readers' BN means."""
        lo, hi = start, start + len(shift)
        for norm in self._readers(b):
            idx = norm.index
            mask = (idx >= lo) & (idx < hi)
            if bool(mask.any()):
                norm.running_mean[mask] -= shift[idx[mask] - lo].to(norm.running_mean.dtype)

    # ----------------------------------------------------------------- installing a dense layer
    def install_dense(self, site: DenseSite, keep_inputs: torch.Tensor, bottleneck: Any, fit: str, *,
                      exact_info: dict[str, list[int]] | None = None,
                      ridges: tuple[float, float] | None = None) -> None:
        """Re-fit conv1 on ``keep_inputs``, choose the bottleneck, re-fit conv2, install, fold the bias, record.

        ``bottleneck``: what :meth:`bottleneck` chooses from (the recorded channels in a replay, a
        budget when compressing, None in the exact stage). ``fit``: ``ls`` re-fits both
        convolutions, ``exact`` re-fits (numerically unregularised) only those whose inputs shrank,
        ``keep`` changes nothing. Replay follows the same rules with the recorded ridges, so it
        reproduces the weights bit for bit.
        """
        n_in = site.work_layer.conv1.in_channels
        w1, b1, r1 = self._refit_conv1(site, keep_inputs, fit, ridges)
        norm2, conv2_in_now = self._bottleneck_input(site, keep_inputs, w1, b1)
        keep_mid, conv2_moments, exact_info = self.bottleneck(site, conv2_in_now, bottleneck, exact_info)
        if fit == "exact" and len(keep_inputs) == n_in and len(keep_mid) == site.mid:
            fit = "keep"
        w2, b2, r2 = self._refit_conv2(site, conv2_in_now, keep_mid, conv2_moments, fit, ridges)
        self._place_dense(site, keep_inputs, keep_mid, norm2, w1, w2, b2)
        kept = site.candidates[keep_inputs].tolist()
        self.records[site.name] = {"name": site.name, "fit": fit, "keep": encode_index(kept),
                                   "mid": encode_index(keep_mid.tolist())}
        if fit == "ls":
            self.records[site.name]["ridge"] = [ridge_to_json(r1), ridge_to_json(r2)]
        if exact_info is not None:
            self.exact_found[site.name] = {k: len(v) for k, v in exact_info.items()}

    def _refit_conv1(self, site: DenseSite, keep_inputs: torch.Tensor, fit: str,
                     ridges: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``conv1`` on the kept inputs (re-fitted or sliced) with its bias, and the ridge used."""
        lw = site.work_layer
        w_old = lw.conv1.weight.detach().reshape(site.mid, -1)
        ridge = EXACT_RIDGE
        if fit == "ls" or (fit == "exact" and len(keep_inputs) < lw.conv1.in_channels):
            if fit == "ls":
                ridge = ridges[0] if ridges else choose_ridge(site.conv1_moments, keep_inputs, w_old,
                                                              self.settings.ridge, site.conv1_sens)
            w, b = refit(site.conv1_moments, keep_inputs, w_old, ridge)
        else:
            w, b = w_old[:, keep_inputs], torch.zeros(site.mid)
        return w, b, ridge

    @staticmethod
    def _bottleneck_input(site: DenseSite, keep_inputs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor
                          ) -> tuple[nn.BatchNorm2d, torch.Tensor]:
        """``norm2`` with conv1's new bias folded in, and the bottleneck it produces now."""
        norm2 = copy.deepcopy(site.work_layer.norm2)
        with torch.no_grad():
            norm2.running_mean -= b1
            conv2_in_now = F.relu(norm2(F.conv2d(site.conv1_in_now[:, keep_inputs], w1[:, :, None, None])))
        return norm2, conv2_in_now

    def _refit_conv2(self, site: DenseSite, conv2_in_now: torch.Tensor, keep_mid: torch.Tensor,
                     conv2_moments: Moments | None, fit: str, ridges: tuple[float, float] | None
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``conv2`` on the kept bottleneck channels (re-fitted or sliced) with its bias, and the ridge."""
        g, mid = site.growth, site.mid
        w_old = site.work_layer.conv2.weight.detach().reshape(g, -1)
        ridge = EXACT_RIDGE
        if fit == "ls" or (fit == "exact" and len(keep_mid) < mid):
            if conv2_moments is None:
                conv2_moments = moments_3x3(conv2_in_now, site.conv2_out_orig, site.positions_3x3, exact=site.float64)
            cols = (keep_mid[:, None] * 9 + torch.arange(9)[None, :]).reshape(-1)
            if fit == "ls":
                ridge = ridges[1] if ridges else choose_ridge(conv2_moments, cols, w_old, self.settings.ridge,
                                                              site.conv2_sens)
            w, b = refit(conv2_moments, cols, w_old, ridge)
        else:
            w, b = w_old.reshape(g, mid, 9)[:, keep_mid].reshape(g, -1), torch.zeros(g)
        return w, b, ridge

    def _place_dense(self, site: DenseSite, keep_inputs: torch.Tensor, keep_mid: torch.Tensor,
                     norm2: nn.BatchNorm2d, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        """Swap the re-fitted layer in, fold conv2's bias into its readers, write its outputs."""
        lw, g = site.work_layer, site.growth
        new = PrunedDenseLayer(site.candidates[keep_inputs].tolist(), lw.norm1.in_width, len(keep_mid), g)
        copy_bn(new.norm1, lw.norm1, keep_inputs)
        copy_bn(new.norm2, norm2, keep_mid)
        with torch.no_grad():
            new.conv1.weight.copy_(w1[keep_mid][:, :, None, None])
            new.conv2.weight.copy_(w2.reshape(g, len(keep_mid), 3, 3))
        new.eval()
        self.work.blocks()[site.block][site.name.split(".")[1]] = new
        self.fold(site.block, site.offset, b2)
        with torch.no_grad():
            site.concat_now[:, site.offset : site.offset + g] = new(site.concat_now[:, : site.offset])

    # ----------------------------------------------------------------- installing a 1x1 consumer
    def install_simple(self, site: SimpleSite, keep: torch.Tensor, fit: str, *, ridge: float | None = None) -> None:
        """Re-fit (``ls``/``exact``) or slice (``keep``) a 1x1 consumer on ``keep``, install, record."""
        r = EXACT_RIDGE
        if fit == "keep":
            w, bias = site.old_weight[:, keep], None
        else:
            if fit == "ls":
                r = ridge if ridge is not None else choose_ridge(site.moments, keep, site.old_weight,
                                                                 self.settings.ridge, site.sens)
            w, bias = refit(site.moments, keep, site.old_weight, r)
        kept = site.slot.install(keep, w, bias)
        self.records[site.name] = {"name": site.name, "fit": fit, "keep": encode_index(kept)}
        if fit == "ls":
            self.records[site.name]["ridge"] = ridge_to_json(r)


class _TransitionSlot:
    """Transition ``b`` of the working network: swapped for a re-fitted one (its bias folded forward)."""

    def __init__(self, walk: Walk, b: int, outputs: int) -> None:
        self.walk, self.b, self.outputs = walk, b, outputs
        self.name = f"transition{b + 1}"

    def install(self, keep: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> list[int]:
        """Install the re-fitted transition; returns the kept input channels (block positions)."""
        cur = self.walk.work.transitions()[self.b]
        new = PrunedTransition(cur.norm.index[keep].tolist(), cur.norm.in_width, self.outputs)
        copy_bn(new.norm, cur.norm, keep)
        with torch.no_grad():
            new.conv.weight.copy_(w.reshape(self.outputs, len(keep), 1, 1))
        new.eval()
        setattr(self.walk.work.features, self.name, new)
        if bias is not None:
            self.walk.fold(self.b + 1, 0, bias)
        return cur.norm.index[keep].tolist()


class _HeadSlot:
    """``norm5`` + the classifier of the working network: swapped for a re-fitted pair."""

    def __init__(self, walk: Walk, outputs: int) -> None:
        self.walk, self.outputs = walk, outputs

    def install(self, keep: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> list[int]:
        """Install the re-fitted head; returns the kept final channels."""
        work = self.walk.work
        cur_n5, cur_cls = work.features.norm5, work.classifier
        n5_new = SubsetBatchNorm2d(cur_n5.index[keep].tolist(), cur_n5.in_width)
        copy_bn(n5_new, cur_n5, keep)
        cls = nn.Linear(len(keep), self.outputs)
        with torch.no_grad():
            cls.weight.copy_(w)
            cls.bias.copy_(bias if bias is not None else cur_cls.bias)
        work.features.norm5 = n5_new.eval()
        work.classifier = cls
        return cur_n5.index[keep].tolist()


def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    """``dst`` takes ``src``'s affine parameters and running statistics of the ``keep`` channels."""
    with torch.no_grad():
        dst.weight.copy_(src.weight[keep])
        dst.bias.copy_(src.bias[keep])
        dst.running_mean.copy_(src.running_mean[keep])
        dst.running_var.copy_(src.running_var[keep])
        dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps = src.eps
    dst.momentum = src.momentum
