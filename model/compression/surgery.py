"""Surgery: physically remove the produced channels that no consumer reads any more.

After the walk every consumer reads its own subset of its block's concatenation, but producers
still make every channel. Walking the network backwards (head first) finds, per block, which
outputs of each layer are still read by a later layer or by the block's reader (transition or
head), then keeps only those rows of the producing convolutions (``conv2``, a transition's
``conv``, ``conv0``) and renumbers every consumer's index into the new physical layout.
"""

from __future__ import annotations

from typing import Any

import torch

from model.nets.pruned import PrunedDenseBlock, PrunedDenseNet, encode_index

__all__ = ["surgery"]


def surgery(net: PrunedDenseNet) -> PrunedDenseNet:
    """Physically remove produced channels that no consumer reads (and layers that produce nothing).

    Exact by construction: an unread channel cannot influence anything. Returns a new network in
    physical coordinates with every consumer's index remapped.
    """
    blocks = net.blocks()
    trans = net.transitions()
    n_blocks = len(blocks)
    new_blocks: list[dict[str, Any]] = [None] * n_blocks  # type: ignore[list-item]
    new_trans: list[dict[str, Any]] = [None] * (n_blocks - 1)  # type: ignore[list-item]
    # Rows of transition b's conv that block b + 1 still reads (known once block b + 1 is cut).
    keep_rows_trans: list[list[int]] = [None] * (n_blocks - 1)  # type: ignore[list-item]
    state = net.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    tail_reads: set[int] = set(net.features.norm5.index.tolist())  # what the block's reader reads
    keep_in: list[int] = []
    head_idx: list[int] = []
    # Walk backwards: which channels of each block concatenation are read?
    for b in range(n_blocks - 1, -1, -1):
        blk = blocks[b]
        offsets = _layer_offsets(blk)
        alive, keep_in = _read_rows(blk, offsets, tail_reads)
        mapping = _physical_positions(blk, offsets, alive, keep_in)
        new_blocks[b] = {"named": _cut_layers(b, blk, alive, mapping, state, new_state),
                         "n_layers": _n_layer_slots(blk)}
        tail_idx = [mapping[c] for c in sorted(tail_reads)]
        if b == n_blocks - 1:  # the last block is read by the head
            head_idx = tail_idx
        else:
            new_trans[b] = _cut_transition(b, tail_idx, keep_rows_trans[b], state, new_state)
        if b > 0:
            keep_rows_trans[b - 1] = keep_in
            tail_reads = set(trans[b - 1].norm.index.tolist())
    stem_rows = keep_in  # the first block's kept inputs are the stem's kept rows
    _cut_stem(stem_rows, state, new_state)
    config = _physical_config(net.config, new_blocks, new_trans, len(stem_rows), head_idx)
    out = PrunedDenseNet(config)
    missing, unexpected = out.load_state_dict(new_state, strict=False)
    if missing or unexpected:  # a bug, not a user error
        raise RuntimeError(f"surgery produced inconsistent weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return out.eval()


def _layer_offsets(blk: PrunedDenseBlock) -> list[int]:
    """Where each layer's outputs start in the block's concatenation (after the block input)."""
    offsets, pos = [], blk.in_width
    for layer in blk.values():
        offsets.append(pos)
        pos += layer.out_channels
    return offsets


def _read_rows(blk: PrunedDenseBlock, offsets: list[int], tail_reads: set[int]
               ) -> tuple[dict[str, list[int]], list[int]]:
    """Per layer the output rows still read (last layer first), and the block inputs still read."""
    reads = set(tail_reads)
    alive: dict[str, list[int]] = {}
    for (lname, layer), off in reversed(list(zip(blk.items(), offsets))):
        rows = [c for c in range(layer.out_channels) if off + c in reads]
        if rows:
            alive[lname] = rows
            reads |= set(layer.norm1.index.tolist())
    keep_in = sorted(c for c in reads if c < blk.in_width)
    return alive, keep_in


def _physical_positions(blk: PrunedDenseBlock, offsets: list[int], alive: dict[str, list[int]],
                        keep_in: list[int]) -> dict[int, int]:
    """Old concatenation position -> new physical position, for every channel that survives."""
    mapping: dict[int, int] = {c: i for i, c in enumerate(keep_in)}
    nxt = len(keep_in)
    for lname, off in zip(blk.keys(), offsets):
        for c in alive.get(lname, []):
            mapping[off + c] = nxt
            nxt += 1
    return mapping


def _cut_layers(b: int, blk: PrunedDenseBlock, alive: dict[str, list[int]], mapping: dict[int, int],
                state: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, Any]]]:
    """The surviving layers' configs (indices remapped) and weights (``conv2`` rows cut)."""
    layer_cfg = []
    for lname, layer in blk.items():
        rows = alive.get(lname)
        if not rows:
            continue
        idx = [mapping[c] for c in layer.norm1.index.tolist()]
        layer_cfg.append((lname, {"i": encode_index(idx), "m": layer.conv1.out_channels, "o": len(rows)}))
        pre = f"features.denseblock{b + 1}.{lname}."
        for key in ("norm1", "conv1", "norm2"):
            for k2, v in state.items():
                if k2.startswith(pre + key + "."):
                    new_state[k2] = v
        new_state[pre + "conv2.weight"] = state[pre + "conv2.weight"][rows]
    return layer_cfg


def _cut_transition(b: int, tail_idx: list[int], rows: list[int], state: dict[str, torch.Tensor],
                    new_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Transition ``b`` reading ``tail_idx`` and producing only ``rows`` (those block ``b + 1`` reads)."""
    config = {"i": encode_index(tail_idx), "o": len(rows)}
    pre = f"features.transition{b + 1}."
    for k2, v in state.items():
        if k2.startswith(pre + "norm."):
            new_state[k2] = v
    new_state[pre + "conv.weight"] = state[pre + "conv.weight"][rows]
    return config


def _cut_stem(stem_rows: list[int], state: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor]) -> None:
    """The stem keeps the rows the first block reads; ``norm5`` and the classifier are unchanged."""
    new_state["features.conv0.weight"] = state["features.conv0.weight"][stem_rows]
    for key in ("weight", "bias", "running_mean", "running_var"):
        new_state[f"features.norm0.{key}"] = state[f"features.norm0.{key}"][stem_rows]
    new_state["features.norm0.num_batches_tracked"] = state["features.norm0.num_batches_tracked"]
    for k2, v in state.items():
        if k2.startswith("features.norm5.") or k2.startswith("classifier."):
            new_state[k2] = v


def _physical_config(cfg: dict[str, Any], new_blocks: list[dict[str, Any]], new_trans: list[dict[str, Any]],
                     stem: int, head_idx: list[int]) -> dict[str, Any]:
    """The ``densenet_pruned`` config; a layer that produces nothing keeps its slot as ``o == 0``."""
    blocks_json = []
    for nb in new_blocks:
        slots = {lname: c for lname, c in nb["named"]}
        layers_json = []
        for j in range(nb["n_layers"]):
            lname = f"denselayer{j + 1}"
            layers_json.append(slots.get(lname, {"i": "", "m": 0, "o": 0}))
        blocks_json.append({"layers": layers_json})
    return {"in_channels": cfg["in_channels"], "num_classes": cfg["num_classes"], "stem": stem,
            "blocks": blocks_json, "transitions": new_trans, "head": encode_index(head_idx)}


def _n_layer_slots(blk: PrunedDenseBlock) -> int:
    nums = [int(n.replace("denselayer", "")) for n in blk]
    return max(nums) if nums else 0
