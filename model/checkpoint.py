"""Import a foreign DenseNet121 checkpoint into a bundle, and say exactly what was done to its keys.

The widely shared arnoweng CheXNet ``model.pth.tar`` was saved by PyTorch 0.3 from a
``DataParallel``-wrapped net: keys carry ``module.densenet121.`` prefixes, legacy ``norm.1`` style
layer names and a ``classifier.0`` head (``Sequential(Linear, Sigmoid)``). Each renaming rule is
counted with one example, so a site can check the import did what it expected; a checkpoint that is
not a 14- or 18-output DenseNet121 is refused naming the layer that shows it. Files load with
``torch.load(weights_only=True)`` (data, never code) or as a safetensors state dict.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from engine.core.errors import BundleError
from model.bundle import (
    Bundle,
    is_torch_checkpoint,
    load_state_dict_checked,
    new_bundle,
)
from model.labels import CHEXNET_LABELS, XRV_LABELS
from model.nets import arch_config, build_model

__all__ = ["LAYOUTS", "CheckpointImport", "KeyRemap", "import_checkpoint", "load_checkpoint", "remap_keys"]

Layout = Literal["auto", "chexnet", "torchvision", "xrv"]
#: ``--layout`` choices: ``auto`` reads the layout off the weights; the others validate it.
LAYOUTS: tuple[str, ...] = ("auto", "chexnet", "torchvision", "xrv")
#: Output layouts a bundle can carry: outputs -> (name, labels, input channels of the published weights).
_HEADS: dict[int, tuple[str, tuple[str, ...], int]] = {14: ("chexnet", CHEXNET_LABELS, 3), 18: ("xrv", XRV_LABELS, 1)}
_DENSENET121_BLOCKS = (6, 12, 24, 16)
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")

# torchvision's own reason: checkpoints from old PyTorch name DenseNet layers "norm.1", "conv.2"
# (module names with dots), which newer nn.Module naming forbids; today they are "norm1", "conv2".
_LEGACY_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_PREFIX = re.compile(r"^(?:(?:module|densenet121|model)\.)+")


@dataclass(frozen=True)
class KeyRemap:
    """One renaming rule applied to a checkpoint's keys: how many keys it renamed, and one of them."""

    rule: str
    count: int
    example: tuple[str, str]


@dataclass
class CheckpointImport:
    """A checkpoint turned into a bundle, with the record of how (for the user and the bundle's notes)."""

    bundle: Bundle
    layout: str
    container: str
    remaps: list[KeyRemap] = field(default_factory=list)
    added_buffers: int = 0

    def summary(self) -> dict[str, Any]:
        return _summary(self.layout, self.container, self.remaps, self.added_buffers)


def _summary(layout: str, container: str, remaps: list[KeyRemap], added: int) -> dict[str, Any]:
    """What the import did, as JSON (kept in the bundle's notes so the audit trail shows it)."""
    return {
        "layout": layout,
        "container": container,
        "remapped": [{"rule": r.rule, "count": r.count, "example": list(r.example)} for r in remaps],
        "added_num_batches_tracked": added,
    }


def _strip_prefix(key: str) -> tuple[str, str | None]:
    match = _PREFIX.match(key)
    return (key[match.end():], f"prefix '{match.group(0)}' removed") if match else (key, None)


def _head_rename(key: str) -> tuple[str, str | None]:
    # arnoweng's CheXNet wraps the head as Sequential(Linear, Sigmoid): classifier.0.* -> classifier.*
    if key.startswith("classifier.0."):
        return "classifier." + key[len("classifier.0."):], "classifier.0.* -> classifier.* (Sequential head)"
    return key, None


def _legacy_rename(key: str) -> tuple[str, str | None]:
    match = _LEGACY_DENSE_KEY.match(key)
    return (match.group(1) + match.group(2), "legacy norm.1 / conv.2 -> norm1 / conv2") if match else (key, None)


_RULES: tuple[Callable[[str], tuple[str, str | None]], ...] = (_strip_prefix, _head_rename, _legacy_rename)


def remap_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[KeyRemap]]:
    """Rename ``state``'s keys to torchvision's DenseNet names; the rules applied, with counts and an example."""
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, list[Any]] = {}
    for original, value in state.items():
        key = original
        for rule in _RULES:
            new, name = rule(key)
            if name is not None:
                entry = counts.setdefault(name, [0, (key, new)])
                entry[0] += 1
            key = new
        if key in out:
            raise BundleError(f"two checkpoint keys map to {key!r} (one is {original!r}); the checkpoint is ambiguous")
        out[key] = value
    return out, [KeyRemap(name, n, example) for name, (n, example) in counts.items()]


def _read_raw(path: Path) -> Any:
    with open(path, "rb") as fh:
        head = fh.read(9)
    try:
        # byte 8 of a safetensors file opens its JSON header; anything else goes to the safe unpickler
        if head[8:9] == b"{" and not is_torch_checkpoint(path):
            return st_load(path.read_bytes())
        return torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as exc:
        raise BundleError(f"{path}: neither a PyTorch checkpoint nor a safetensors file ({exc})") from exc
    except Exception as exc:  # torch raises many types for a non-checkpoint or a pickle with code
        raise BundleError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {exc})") from exc


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    container = "state dict"
    if isinstance(raw, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(raw.get(key), dict):
                raw, container = raw[key], f"dict with '{key}'"
                break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BundleError(f"{path}: expected a state dict of tensors (or a dict with one of "
                          f"{', '.join(repr(k) for k in _CONTAINER_KEYS)})")
    return raw, container


def _check_densenet121(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse what is not a DenseNet121, naming the layer that shows it."""
    if "features.conv0.weight" not in state:
        groups: dict[str, list[str]] = {}
        for key in sorted(state):
            groups.setdefault(key.split(".")[0], []).append(key)
        # a top-level layer by its weight (fc.weight), a nested one by its name (layer1...)
        found = [next((k for k in keys if k.endswith(".weight")), keys[0]) if all(k.count(".") == 1 for k in keys)
                 else f"{top}..." for top, keys in groups.items()][:6]
        resnet = "fc.weight" in state or any(k.startswith("layer1.") for k in state)
        raise BundleError(f"{path}: no features.conv0.weight: not a DenseNet121 (found {', '.join(found)}"
                          f"{': a ResNet?' if resnet else ''})")
    blocks = []
    for b in range(1, 5):
        layers = {m.group(1) for k in state if (m := re.match(rf"features\.denseblock{b}\.denselayer(\d+)\.", k))}
        blocks.append(len(layers))
    if tuple(blocks) != _DENSENET121_BLOCKS:
        raise BundleError(f"{path}: dense blocks have {tuple(blocks)} layers; a DenseNet121 has {_DENSENET121_BLOCKS}")
    if "classifier.weight" not in state:
        raise BundleError(f"{path}: no classifier.weight (the output layer); keys end with {', '.join(sorted(state)[-3:])}")


def _resolve_layout(state: dict[str, torch.Tensor], remaps: list[KeyRemap], layout: str, path: Path) -> str:
    outputs = int(state["classifier.weight"].shape[0])
    if outputs not in _HEADS:
        hint = " (an ImageNet classifier?)" if outputs == 1000 else ""
        raise BundleError(f"{path}: classifier.weight has {outputs} outputs{hint}; expected 14 (CheXNet) or "
                          "18 (torchxrayvision)")
    found = _HEADS[outputs][0]
    if layout == "torchvision":
        if remaps:
            first = remaps[0]
            raise BundleError(f"{path}: --layout torchvision expects torchvision's key names, but {first.count} "
                              f"key(s) needed renaming ({first.rule}, e.g. {first.example[0]}); use --layout auto "
                              "or chexnet")
        return "torchvision"
    if layout in ("chexnet", "xrv") and layout != found:
        want = 14 if layout == "chexnet" else 18
        raise BundleError(f"{path}: --layout {layout} expects {want} outputs; classifier.weight has {outputs}")
    return found


def import_checkpoint(path: str | Path, *, layout: Layout = "auto", input_size: int = 224) -> CheckpointImport:
    """Load a foreign DenseNet121 checkpoint as a bundle, recording every key rename it needed.

    The output layout (14 CheXNet or 18 torchxrayvision labels, 1 or 3 input channels) is read off
    the weights; ``layout`` other than ``auto`` refuses a checkpoint of another layout.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise BundleError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint does not exist")
    raw, container = _unwrap(_read_raw(path), path)
    state, remaps = remap_keys(raw)
    _check_densenet121(state, path)
    resolved = _resolve_layout(state, remaps, layout, path)
    num_classes = int(state["classifier.weight"].shape[0])
    in_channels = int(state["features.conv0.weight"].shape[1])
    config = arch_config("densenet121", num_classes=num_classes, in_channels=in_channels)
    model = build_model("densenet", config)
    # Old checkpoints predate BatchNorm's num_batches_tracked buffer; it does not affect eval.
    added = 0
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
            added += 1
    load_state_dict_checked(model, state, str(path))
    model.eval()
    labels = list(_HEADS[num_classes][1])
    bundle = new_bundle(model, config=config, input_size=input_size, labels=labels,
                        notes={"imported_from": path.name, "import": _summary(resolved, container, remaps, added)})
    return CheckpointImport(bundle, resolved, container, remaps, added)


def load_checkpoint(path: str | Path, *, input_size: int = 224) -> Bundle:
    """The bundle of :func:`import_checkpoint` with the layout read off the weights."""
    return import_checkpoint(path, input_size=input_size).bundle
