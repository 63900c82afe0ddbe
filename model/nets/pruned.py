"""The pruned DenseNet: every consumer of a dense concatenation reads its own subset of channels.

A DenseNet layer reads the concatenation of everything produced before it in its block. After
channel pruning each *consumer* (a dense layer's ``norm1``/``conv1``, a transition, ``norm5`` plus
the classifier) keeps only the input channels it still needs, and each *producer* (``conv0``, a
layer's ``conv2``, a transition's ``conv``) only emits channels that some consumer still reads, so
parameters, FLOPs and file size all shrink for real. The layout keeps torchvision's interface and
module names: ``model.features`` is an ``nn.Sequential`` ending in ``norm5`` (a batch norm on the
kept final channels, so ``features(x)`` is the pre-ReLU map Grad-CAM hooks), and
``model.classifier`` is an ``nn.Linear`` on the pooled, ReLU'd features.

Cost of the subsets: a consumer gathers its channels by indexing (one copy of the kept
channels, ``k·H·W`` values per image, about ``1/mid`` of the following 1x1 convolution's
multiply-adds) unless it reads a contiguous prefix, which is a free view. In inference mode a block
writes every layer's output into one preallocated buffer instead of re-concatenating the growing
list of feature maps at every layer as torchvision does, and a transition pools before its 1x1
convolution (the two commute), so the convolution sees a quarter of the pixels, and a dense layer's
``norm2`` is folded into ``conv1`` (cached; the modules keep their own weights and state-dict names).
1x1 convolutions run as matrix products on the map sizes where that measured faster (``conv1x1``).
A strided channel prefix on a small map is copied before its batch norm (``SubsetBatchNorm2d.forward``).

``arch_config`` (JSON in the bundle) is everything needed to rebuild the net::

    {"in_channels": 3, "num_classes": 14, "stem": 64,
     "blocks": [{"layers": [{"i": "0-63", "m": 128, "o": 32}, ...]}, ...],
     "transitions": [{"i": "0-255", "o": 128}, ...],
     "head": "0-1023"}

``i`` is the consumer's kept input channels (positions in its block's physical concatenation:
block input first, then each kept layer's outputs in order), run-length encoded as ``"a-b,c,..."``;
``m`` a layer's bottleneck width (``conv1`` outputs), ``o`` its produced channels. A layer with
``o == 0`` no longer exists (its name is skipped, the others keep torchvision's numbering).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import BundleError

__all__ = [
    "ARCH_NAME",
    "encode_index",
    "conv1x1",
    "decode_index",
    "SubsetBatchNorm2d",
    "PrunedDenseLayer",
    "PrunedDenseBlock",
    "PrunedTransition",
    "PrunedDenseNet",
    "build_pruned_densenet",
    "config_from_densenet",
    "from_densenet",
    "as_pruned",
    "block_input_widths",
    "validate_config",
    "to_json_config",
]

ARCH_NAME = "densenet_pruned"


# --------------------------------------------------------------------------- index encoding
def encode_index(index: Sequence[int]) -> str:
    """Run-length text of a sorted list of channel positions: ``[0,1,2,5,7,8] -> "0-2,5,7-8"``."""
    values = [int(v) for v in index]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"channel index must be strictly increasing, got {values[:20]}")
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def decode_index(text: str | Sequence[int], *, where: str = "index") -> list[int]:
    """Inverse of :func:`encode_index` (a plain list of ints is accepted too)."""
    if not isinstance(text, str):
        try:
            out = [int(v) for v in text]
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: expected a run-length string or a list of ints, got {text!r}") from exc
    else:
        out = []
        if text.strip():
            for part in text.split(","):
                try:
                    if "-" in part:
                        a, b = part.split("-")
                        out.extend(range(int(a), int(b) + 1))
                    else:
                        out.append(int(part))
                except ValueError as exc:
                    raise BundleError(f"{where}: cannot parse {part!r} in channel index {text[:60]!r}") from exc
    if any(b <= a for a, b in zip(out, out[1:])) or (out and out[0] < 0):
        raise BundleError(f"{where}: channel index must be non-negative and strictly increasing")
    return out


# --------------------------------------------------------------------------- modules
#: Feature maps up to this many pixels (12 x 12) gather by ``index_select`` even when strided: below it
#: ``index_select`` was as fast as advanced indexing or faster at batch 32 (see ``SubsetBatchNorm2d.gather``).
_SMALL_MAP = 144

#: A strided channel prefix (a dense layer's view of the block buffer at batch > 1) on a map up to this
#: many pixels (16 x 16) is copied before the batch norm (see ``SubsetBatchNorm2d.forward``).
_COPY_MAP = 256


class SubsetBatchNorm2d(nn.BatchNorm2d):
    """Batch norm on a fixed subset of the input's channels (gathered first).

    The index is rebuilt from ``arch_config`` and therefore not stored in the state dict.
    """

    def __init__(self, index: Sequence[int], in_width: int) -> None:
        index = [int(i) for i in index]
        super().__init__(len(index))
        self.in_width = int(in_width)
        self.prefix = index == list(range(len(index)))
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefix:
            return x if x.shape[1] == self.num_features else x[:, : self.num_features]
        # The same copy two ways, whichever is faster for the layout (2 cores, 70 % of the channels):
        # index_select on a contiguous tensor (batch 1) or a small map, advanced indexing on the block
        # buffer's strided channel slice at batch > 1 on large maps, where index_select took 2.6-3x as
        # long (32 x 179 of 256 channels at 56 x 56: 72 ms against 22 ms) and made compressed models
        # slower than their parent at 224 px, batch 32. At batch 1 index_select is 2-3x faster.
        if x.is_contiguous() or x.shape[2] * x.shape[3] <= _SMALL_MAP:
            return x.index_select(1, self.index)
        return x[:, self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.gather(x)
        if not x.is_contiguous() and x.shape[2] * x.shape[3] <= _COPY_MAP:
            # CPU batch norm has no fast kernel for a strided tensor: on the block buffer's prefix view
            # at batch 32 it took 3-5x as long as a copy plus the norm (16 x 16 down to 7 x 7 maps,
            # 2 threads; the 64 px, batch-32 pass of an unpruned layout, A/B in one run, went x1.00 / 1.02
            # -> x1.11 / 1.08 against torchvision's). On larger maps the copy costs as much as it saves.
            x = x.contiguous()
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reads {self.num_features}/{self.in_width}"


def _matmul_pays(batch: int, pixels: int) -> bool:
    """Whether a 1x1 convolution of this shape runs faster as a matrix product than as ``conv2d``.

    Measured on 2 threads (AMD EPYC, torch 2.14; conv time / matmul time, median of 9 interleaved
    rounds, 256-512 inputs -> 128 outputs): at batch 1 x2.2 at 7x7 and 8x8, x1.9 at 14x14, x1.5 at
    16x16, x1.1 at 28x28, but x0.82 at 56x56 and x1.0 at 4x4 and below (torch already multiplies
    matrices there); at batch 8 and 32 only 56x56 pays (x1.3, x1.6) and small maps lose up to x0.16.
    A rule on the shape alone, so the same input always takes the same kernel (deterministic).
    """
    return 49 <= pixels <= 784 if batch == 1 else pixels >= 3136


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel, as a matrix product where that is faster.

    The same result to float rounding (summation order differs); inference paths only.
    """
    n, c, h, w = x.shape
    if not _matmul_pays(n, h * w):
        return F.conv2d(x, weight, bias)
    w2 = weight.view(weight.shape[0], c)
    if n == 1:
        flat = x.reshape(c, h * w)
        out = torch.mm(w2, flat) if bias is None else torch.addmm(bias[:, None], w2, flat)
    else:
        out = torch.matmul(w2, x.reshape(n, c, h * w))
        if bias is not None:
            out += bias[:, None]
    return out.view(n, -1, h, w)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook watches one of ``modules`` (then they must run as themselves, not folded)."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class PrunedDenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck ``mid``) - BN-ReLU-conv3x3 (``out`` channels) on a channel subset."""

    def __init__(self, index: Sequence[int], in_width: int, mid: int, out: int) -> None:
        super().__init__()
        self.norm1 = SubsetBatchNorm2d(index, in_width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(len(index), mid, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out, kernel_size=3, stride=1, padding=1, bias=False)
        self.in_width = int(in_width)
        self.out_channels = int(out)

    def _conv1_input(self, concat: torch.Tensor) -> torch.Tensor:
        """What ``conv1`` reads: BN-ReLU of this layer's channel subset (shared by both forward paths)."""
        return self.relu1(self.norm1(concat))

    def bottleneck(self, concat: torch.Tensor) -> torch.Tensor:
        """The pre-``norm2`` bottleneck map (``conv1`` output)."""
        return self.conv1(self._conv1_input(concat))

    def forward(self, concat: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if torch.is_grad_enabled() or self.training or _hooked(self.conv1, self.norm2):
            return self.conv2(self.relu2(self.norm2(self.bottleneck(concat))))
        # Inference: norm2 is an affine map right after conv1, so it folds into conv1's weights and a
        # bias -- one pass over the bottleneck map less per layer (the same result to float rounding).
        weight, bias = self._folded_conv1()
        return self.conv2(self.relu2(conv1x1(self._conv1_input(concat), weight, bias)))

    def _folded_conv1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv1`` with ``norm2`` folded in, cached until any of the five tensors changes.

        The key is each tensor's storage and version counter: every in-place write (a re-fit,
        ``load_state_dict``, zeroing) bumps the counter, and a copied module has new storage.
        """
        n2 = self.norm2
        tensors = (self.conv1.weight, n2.weight, n2.bias, n2.running_mean, n2.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = getattr(self, "_fold_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                scale = n2.weight / torch.sqrt(n2.running_var + n2.eps)
                weight = self.conv1.weight * scale[:, None, None, None]
                bias = n2.bias - n2.running_mean * scale
            cached = (key, weight, bias)
            self._fold_cache = cached
        return cached[1], cached[2]


class PrunedDenseBlock(nn.ModuleDict):
    """A dense block whose layers append their outputs to one growing concatenation."""

    def __init__(self, in_width: int, layers: Sequence[tuple[str, PrunedDenseLayer]]) -> None:
        super().__init__(dict(layers))
        self.in_width = int(in_width)
        self.out_width = self.in_width + sum(layer.out_channels for layer in self.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if torch.is_grad_enabled():
            # Autograd-friendly path (training, gradients for sensitivities): torchvision's list + cat.
            features = [x]
            for layer in self.values():
                features.append(layer(torch.cat(features, 1)))
            return torch.cat(features, 1)
        n, _, h, w = x.shape
        buf = x.new_empty((n, self.out_width, h, w))
        buf[:, : self.in_width] = x
        pos = self.in_width
        for layer in self.values():
            buf[:, pos : pos + layer.out_channels] = layer(buf[:, :pos])
            pos += layer.out_channels
        return buf


class PrunedTransition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool on a channel subset of the block output."""

    def __init__(self, index: Sequence[int], in_width: int, out: int) -> None:
        super().__init__()
        self.add_module("norm", SubsetBatchNorm2d(index, in_width))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(len(index), out, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.relu(self.norm(x))
        if torch.is_grad_enabled():
            # torchvision's order, which the compression's gradient passes measure sensitivities in.
            return self.pool(self.conv(h))
        # Inference: a 1x1 convolution without bias and 2x2 average pooling are both linear, so they
        # commute; pooling first runs the convolution on a quarter of the pixels (the same result to
        # float rounding, 3/4 of the transition's multiply-adds saved). A watched conv runs as itself.
        pooled = self.pool(h)
        return self.conv(pooled) if _hooked(self.conv) else conv1x1(pooled, self.conv.weight)


class PrunedDenseNet(nn.Module):
    """torchvision-compatible DenseNet built from a pruned ``arch_config`` (see the module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = validate_config(config)
        self.config = cfg
        stem = cfg["stem"]
        features = nn.Sequential()
        features.add_module("conv0", nn.Conv2d(cfg["in_channels"], stem, kernel_size=7, stride=2, padding=3, bias=False))
        features.add_module("norm0", nn.BatchNorm2d(stem))
        features.add_module("relu0", nn.ReLU(inplace=True))
        features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        width = stem
        for b, block in enumerate(cfg["blocks"]):
            layers = []
            pos = width
            for j, layer in enumerate(block["layers"]):
                if layer["o"] > 0:
                    layers.append((f"denselayer{j + 1}", PrunedDenseLayer(layer["idx"], pos, layer["m"], layer["o"])))
                    pos += layer["o"]
            features.add_module(f"denseblock{b + 1}", PrunedDenseBlock(width, layers))
            if b < len(cfg["transitions"]):
                t = cfg["transitions"][b]
                features.add_module(f"transition{b + 1}", PrunedTransition(t["idx"], pos, t["o"]))
                width = t["o"]
            else:
                width = pos
        features.add_module("norm5", SubsetBatchNorm2d(cfg["head_idx"], width))
        self.features = features
        self.classifier = nn.Linear(len(cfg["head_idx"]), cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)

    # Helpers used by compression (not needed for inference).
    def blocks(self) -> list[PrunedDenseBlock]:
        return [m for m in self.features if isinstance(m, PrunedDenseBlock)]

    def transitions(self) -> list[PrunedTransition]:
        return [m for m in self.features if isinstance(m, PrunedTransition)]


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class _Where:
    text: str

    def __str__(self) -> str:
        return self.text


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BundleError(f"densenet_pruned config: {where} must be an integer >= {minimum}, got {value!r}")
    return value


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a ``densenet_pruned`` config; returns it normalised (indices decoded under ``idx``/``head_idx``)."""
    if not isinstance(config, dict):
        raise BundleError(f"densenet_pruned config must be a JSON object, got {type(config).__name__}")
    required = {"in_channels", "num_classes", "stem", "blocks", "transitions", "head"}
    missing = required - set(config)
    unknown = set(config) - required
    if missing or unknown:
        raise BundleError(f"densenet_pruned config: missing key(s) {sorted(missing)}, unknown key(s) {sorted(unknown)}; "
                          f"expected {sorted(required)}")
    out: dict[str, Any] = {
        "in_channels": _int(config["in_channels"], "in_channels", 1),
        "num_classes": _int(config["num_classes"], "num_classes", 1),
        "stem": _int(config["stem"], "stem", 1),
    }
    blocks, transitions = config["blocks"], config["transitions"]
    if not isinstance(blocks, list) or not blocks:
        raise BundleError("densenet_pruned config: 'blocks' must be a non-empty list")
    if not isinstance(transitions, list) or len(transitions) != len(blocks) - 1:
        raise BundleError(f"densenet_pruned config: expected {len(blocks) - 1} transitions for {len(blocks)} blocks, "
                          f"got {len(transitions) if isinstance(transitions, list) else transitions!r}")
    width = out["stem"]
    out_blocks, out_trans = [], []
    for b, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("layers"), list):
            raise BundleError(f"densenet_pruned config: blocks[{b}] must be an object with a 'layers' list")
        pos = width
        layers = []
        for j, layer in enumerate(block["layers"]):
            where = f"blocks[{b}].layers[{j}]"
            if not isinstance(layer, dict) or set(layer) != {"i", "m", "o"}:
                raise BundleError(f"densenet_pruned config: {where} must have exactly the keys i, m, o")
            o = _int(layer["o"], f"{where}.o", 0)
            idx = decode_index(layer["i"], where=f"densenet_pruned config {where}.i") if o > 0 else []
            m = _int(layer["m"], f"{where}.m", 1) if o > 0 else _int(layer["m"], f"{where}.m", 0)
            if o > 0:
                if not idx:
                    raise BundleError(f"densenet_pruned config: {where} reads no channel")
                if idx[-1] >= pos:
                    raise BundleError(f"densenet_pruned config: {where} reads channel {idx[-1]} but only {pos} exist there")
            layers.append({"i": layer["i"], "idx": idx, "m": m, "o": o})
            pos += o
        out_blocks.append({"layers": layers})
        if b < len(blocks) - 1:
            t = transitions[b]
            where = f"transitions[{b}]"
            if not isinstance(t, dict) or set(t) != {"i", "o"}:
                raise BundleError(f"densenet_pruned config: {where} must have exactly the keys i, o")
            idx = decode_index(t["i"], where=f"densenet_pruned config {where}.i")
            if not idx or idx[-1] >= pos:
                raise BundleError(f"densenet_pruned config: {where} must read channels among the {pos} of block {b + 1}")
            out_trans.append({"i": t["i"], "idx": idx, "o": _int(t["o"], f"{where}.o", 1)})
            width = out_trans[-1]["o"]
        else:
            width = pos
    head = decode_index(config["head"], where="densenet_pruned config head")
    if not head or head[-1] >= width:
        raise BundleError(f"densenet_pruned config: 'head' must read channels among the {width} final ones")
    out.update(blocks=out_blocks, transitions=out_trans, head_idx=head, head=config["head"])
    return out


def to_json_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The compact JSON form of a normalised config (drops decoded index lists)."""
    return {
        "in_channels": cfg["in_channels"],
        "num_classes": cfg["num_classes"],
        "stem": cfg["stem"],
        "blocks": [{"layers": [{"i": encode_index(l["idx"]), "m": l["m"], "o": l["o"]} for l in b["layers"]]}
                   for b in cfg["blocks"]],
        "transitions": [{"i": encode_index(t["idx"]), "o": t["o"]} for t in cfg["transitions"]],
        "head": encode_index(cfg["head_idx"]),
    }


def block_input_widths(cfg: dict[str, Any]) -> list[int]:
    """Physical width of each block's input (stem or previous transition output)."""
    widths = [cfg["stem"]]
    for t in cfg["transitions"]:
        widths.append(t["o"])
    return widths


def build_pruned_densenet(config: dict[str, Any]) -> PrunedDenseNet:
    """The ``densenet_pruned`` entry of the architecture table (:data:`model.nets.archs.ARCHS`)."""
    return PrunedDenseNet(config)


# --------------------------------------------------------------------------- conversion
def _densenet_parts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return iter(model.features.named_children())


def config_from_densenet(model: nn.Module) -> dict[str, Any]:
    """The full (nothing pruned) ``densenet_pruned`` config of a torchvision-style DenseNet."""
    feats = getattr(model, "features", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(feats, nn.Sequential) or not isinstance(classifier, nn.Linear) or not hasattr(feats, "conv0"):
        raise BundleError("not a DenseNet: expected .features (nn.Sequential with conv0 ... norm5) and a Linear .classifier")
    stem = feats.conv0.out_channels
    blocks, transitions = [], []
    width = stem
    for name, module in _densenet_parts(model):
        if name.startswith("denseblock"):
            layers = []
            pos = width
            for lname, layer in module.items():
                mid = layer.conv1.out_channels
                out = layer.conv2.out_channels
                if layer.conv1.in_channels != pos:
                    raise BundleError(f"not a plain DenseNet: {name}.{lname} reads {layer.conv1.in_channels} channels, "
                                      f"expected {pos}")
                layers.append({"i": f"0-{pos - 1}", "m": mid, "o": out})
                pos += out
            blocks.append({"layers": layers})
            width = pos
        elif name.startswith("transition"):
            out = module.conv.out_channels
            transitions.append({"i": f"0-{width - 1}", "o": out})
            width = out
    if not blocks:
        raise BundleError("not a DenseNet: no denseblock in .features")
    return {"in_channels": feats.conv0.in_channels, "num_classes": classifier.out_features, "stem": stem,
            "blocks": blocks, "transitions": transitions, "head": f"0-{width - 1}"}


def from_densenet(model: nn.Module) -> PrunedDenseNet:
    """A ``PrunedDenseNet`` with full channel sets and the weights of a torchvision-style DenseNet."""
    net = PrunedDenseNet(config_from_densenet(model))
    state = model.state_dict()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("index")]
    if missing or unexpected:
        raise BundleError(f"DenseNet weights do not map onto the pruned layout (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    net.train(model.training)
    return net


def as_pruned(model: nn.Module, arch: str, config: dict[str, Any]) -> tuple[PrunedDenseNet, dict[str, Any]]:
    """Any DenseNet bundle model as a ``PrunedDenseNet`` plus its (JSON) config; others raise BundleError."""
    if arch == ARCH_NAME and isinstance(model, PrunedDenseNet):
        return model, to_json_config(model.config)
    if arch == "densenet":
        net = from_densenet(model)
        return net, to_json_config(net.config)
    raise BundleError(f"compression needs a DenseNet bundle (arch 'densenet' or '{ARCH_NAME}'), got arch {arch!r}")
