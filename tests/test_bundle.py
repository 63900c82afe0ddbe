"""Bundles: bit-identical round trip, deterministic bytes, foreign checkpoint loading without pickle."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from engine.core.errors import BundleError
from model.bundle import load_bundle, new_bundle, save_bundle
from model.checkpoint import load_checkpoint
from model.nets import arch_config, build_model, chexnet_densenet121, count_parameters, xrv_densenet121


def _tiny_bundle(seed: int = 0):
    torch.manual_seed(seed)
    config = arch_config("tiny")
    model = build_model("densenet", config).eval()
    return new_bundle(model, config=config, input_size=32, thresholds=[0.3] * 14, parent_hash="ab" * 32)


def test_layouts_have_the_reference_parameter_counts() -> None:
    assert count_parameters(chexnet_densenet121()) == 6_968_206
    assert count_parameters(xrv_densenet121()) == 6_966_034


def test_round_trip_gives_bit_identical_logits_and_metadata(tmp_path: Path) -> None:
    bundle = _tiny_bundle()
    digest = save_bundle(bundle, tmp_path / "m.safetensors")
    loaded = load_bundle(tmp_path / "m.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), loaded.model(x))
    assert loaded.meta == bundle.meta
    assert loaded.content_hash() == digest == bundle.content_hash()


def test_bundle_bytes_are_deterministic_and_hash_tracks_changes(tmp_path: Path) -> None:
    a, b = _tiny_bundle(1), _tiny_bundle(1)
    assert save_bundle(a, tmp_path / "a.safetensors") == save_bundle(b, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    changed = a.with_meta(thresholds=[0.4] * 14)
    assert changed.content_hash() != a.content_hash()
    assert changed.weights_hash() == a.weights_hash()  # thresholds do not invalidate feature caches


def test_copy_is_independent() -> None:
    bundle = _tiny_bundle()
    clone = bundle.copy()
    with torch.no_grad():
        clone.model.classifier.weight.zero_()
    assert bundle.model.classifier.weight.abs().sum() > 0


def _legacy_arnoweng_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The widely shared CheXNet checkpoint's naming: module.densenet121.*, norm.1 style, classifier.0."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # checkpoints from PyTorch 0.3 predate this buffer
        new = key
        for part in ("norm1", "norm2", "conv1", "conv2"):
            new = new.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        new = new.replace("classifier.", "classifier.0.")
        out["module.densenet121." + new] = value.clone()
    return out


def test_arnoweng_checkpoint_is_remapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = chexnet_densenet121().eval()
    state = _legacy_arnoweng_state(reference)
    assert any(".norm.1." in k for k in state) and "module.densenet121.classifier.0.weight" in state
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "model.pth.tar")
    bundle = load_checkpoint(tmp_path / "model.pth.tar", input_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reference(x), bundle.model(x))
    assert len(bundle.labels) == 14 and bundle.meta.in_channels == 3


def test_plain_torchvision_state_dict_and_xrv_layout(tmp_path: Path) -> None:
    model = xrv_densenet121().eval()
    torch.save(model.state_dict(), tmp_path / "xrv.pt")
    bundle = load_checkpoint(tmp_path / "xrv.pt")
    assert len(bundle.labels) == 18 and bundle.meta.in_channels == 1


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path: Path) -> None:
    state = chexnet_densenet121().state_dict()
    state.pop("features.norm5.weight")
    state["features.extra.weight"] = torch.zeros(3)
    state["features.conv0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BundleError) as err:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(err.value)
    assert "missing keys (1): features.norm5.weight" in message
    assert "unexpected keys (1): features.extra.weight" in message
    assert "features.conv0.weight: checkpoint (64, 3, 5, 5) vs model (64, 3, 7, 7)" in message


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_checkpoint_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    with pytest.raises(BundleError, match="cannot load checkpoint safely"):
        load_checkpoint(tmp_path / "evil.pth")
    assert "pickle code ran" not in capsys.readouterr().out


def test_non_bundle_files_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="not a readable safetensors bundle"):
        load_bundle(tmp_path / "junk.safetensors")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BundleError, match="has no 'cxr_triage' metadata"):
        load_bundle(tmp_path / "plain.safetensors")
