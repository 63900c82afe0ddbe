"""Compression of a DenseNet: architecture, exact stage, reconstruction, surgery, replay, CLI.

Everything runs on the ``tiny`` preset at 32 px with a few hundred random-texture images, so the
whole file takes seconds. Planted channels (dead, constant, duplicate) must be found by the exact
stage with logits unchanged to 1e-5 on held-out images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

from cli import main
from conftest import NIH_HEADER
from engine.core.errors import BundleError, DataError
from model.bundle import Bundle, load_bundle, new_bundle, save_bundle
from model.compression import (
    CompressSettings,
    compress_bundle,
    count_macs,
    prepare_calibration,
    replay_compression,
    surgery,
)
from model.data import load_nih_dataset, read_images
from model.features import to_model_input
from model.labels import CHEXNET_LABELS
from model.nets import (
    ARCH_NAME,
    PrunedDenseNet,
    arch_config,
    build_model,
    count_parameters,
    decode_index,
    encode_index,
    from_densenet,
    pooled_features,
    to_json_config,
)
from model.nets.pruned import _COPY_MAP, SubsetBatchNorm2d, _matmul_pays, conv1x1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_textures(root: Path, n: int, *, size: int = 32, seed: int = 0, gain: float = 1.0, offset: float = 0.0,
                   n_test: int = 0) -> Path:
    """An NIH-layout folder of smooth random textures (two images per patient) with random labels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines, names = [NIH_HEADER], []
    for i in range(n):
        patient = 1 + i // 2
        name = f"{patient:08d}_{i % 2:03d}.png"
        img = gaussian_filter(rng.random((size, size)), sigma=1.5)
        img = (img - img.min()) / (np.ptp(img) + 1e-9)
        img = np.clip(img * gain + offset, 0, 1)
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(root / "images" / name)
        labels = "|".join(lab for lab in CHEXNET_LABELS if rng.random() < 0.15) or "No Finding"
        lines.append(f"{name},{labels},{i % 2},{patient},50,M,PA,{size},{size},0.1,0.1")
        names.append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    if n_test:
        (root / "test_list.txt").write_text("\n".join(names[-n_test:]) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(names[:-n_test]) + "\n")
    return root


def tiny_bundle(seed: int = 0) -> Bundle:
    """A random tiny DenseNet whose batch-norm statistics match texture inputs (logits of order 1)."""
    torch.manual_seed(seed)
    cfg = arch_config("tiny")
    model = build_model("densenet", cfg).eval()
    bundle = new_bundle(model, config=cfg, input_size=32)
    rng = np.random.default_rng(seed)
    imgs = np.stack([gaussian_filter(rng.random((32, 32)), sigma=1.5) for _ in range(64)])
    imgs = (imgs - imgs.min(axis=(1, 2), keepdims=True)) / np.ptp(imgs, axis=(1, 2), keepdims=True)
    with torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        model(to_model_input(imgs.astype(np.float32), bundle.meta))
        model.eval()
        model.classifier.weight.mul_(0.3)
    return bundle


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_textures(tmp_path_factory.mktemp("tex") / "ds", 240, seed=1, n_test=40)


@pytest.fixture(scope="module")
def half(data) -> tuple[Bundle, Bundle, dict]:
    """The tiny model compressed to half its parameters (target alone: no tolerance), then distilled."""
    parent = tiny_bundle()
    ds = load_nih_dataset(data, "train_val")
    settings = CompressSettings(target_reduction=0.5, max_auroc_drop=None, max_flip_rate=None, views=2,
                                distill_epochs=2, distill_lr=1e-4)
    result = compress_bundle(parent, ds, settings, speed=False)
    return parent, result.bundle, result.report


def _logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


# ---------------------------------------------------------------------------------- architecture
def test_index_encoding_roundtrip():
    idx = [0, 1, 2, 5, 7, 8, 9, 30]
    assert encode_index(idx) == "0-2,5,7-9,30"
    assert decode_index(encode_index(idx)) == idx
    assert decode_index("") == []
    with pytest.raises(BundleError, match="cannot parse"):
        decode_index("1,x")


def test_full_pruned_layout_reproduces_torchvision_densenet():
    model = tiny_bundle().model
    net = from_densenet(model).eval()
    x = torch.randn(4, 3, 32, 32)
    assert np.allclose(_logits(model, x), _logits(net, x), rtol=1e-5, atol=1e-4)
    with torch.enable_grad():  # the autograd (list + cat) path gives the same answer
        assert torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-4)
    assert count_parameters(net) == count_parameters(model)
    rebuilt = build_model(ARCH_NAME, to_json_config(net.config))
    rebuilt.load_state_dict(net.state_dict())
    assert np.array_equal(_logits(rebuilt, x), _logits(net, x))


@pytest.mark.parametrize("n, hw", [(1, 4), (1, 20), (3, 4), (3, 20)])
def test_subset_gather_is_the_same_copy_on_every_layout(n, hw):
    # Batch 1 (contiguous) and small maps take index_select, strided large maps advanced indexing:
    # both must hand batch norm exactly the kept channels of the block buffer's slice.
    norm = SubsetBatchNorm2d([0, 2, 3, 7, 9], in_width=10).eval()
    buf = torch.randn(n, 12, hw, hw)
    view = buf[:, :10]
    expected = torch.stack([view[:, c] for c in (0, 2, 3, 7, 9)], dim=1)
    assert torch.equal(norm.gather(view), expected)
    assert torch.equal(norm.gather(view.contiguous()), expected)


@pytest.mark.parametrize("n, hw", [(1, 8), (3, 8), (3, 20)])
@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4], [0, 2, 3, 7, 9]])
def test_subset_norm_on_a_strided_buffer_view_is_the_norm_of_its_channels(n, hw, index):
    # At batch > 1 a prefix reader gets a strided view of the block buffer, which small maps copy
    # before the norm (faster); large maps and contiguous views go straight in. Every route must be
    # batch norm of exactly the kept channels.
    norm = SubsetBatchNorm2d(index, in_width=10).eval()
    with torch.no_grad():
        norm.running_mean.normal_(0.0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    buf = torch.randn(n, 12, hw, hw)
    view = buf[:, :10]
    kept = view[:, index].contiguous()
    expected = F.batch_norm(kept, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    with torch.no_grad():
        out = norm(view)
    assert out.shape == kept.shape
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
    if n > 1 and hw * hw <= _COPY_MAP:  # the copied route is the contiguous norm itself
        assert torch.equal(out, expected)


@pytest.mark.parametrize("n, side", [(1, 2), (1, 8), (1, 56), (2, 8), (2, 56)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_1x1_convolution_as_matmul_is_the_same_convolution(n, side, with_bias):
    # Each shape rule branch (conv2d, mm/addmm at batch 1, batched matmul) on a strided buffer slice
    # as a block hands it, and on a contiguous map: the same numbers as conv2d to float rounding.
    assert {_matmul_pays(n, side * side) for n, side in [(1, 2), (1, 8), (1, 56), (2, 8), (2, 56)]} == {True, False}
    gen = torch.Generator().manual_seed(n * 100 + side)
    buf = torch.randn(n, 40, side, side, generator=gen)
    weight = torch.randn(7, 24, 1, 1, generator=gen)
    bias = torch.randn(7, generator=gen) if with_bias else None
    for x in (buf[:, :24], buf[:, :24].contiguous()):
        out = conv1x1(x, weight, bias)
        assert out.shape == (n, 7, side, side)
        assert torch.allclose(out, F.conv2d(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_inference_shortcuts_match_the_module_by_module_network():
    # Inference pools before a transition's convolution and folds norm2 into conv1; the gradient
    # path runs every module as torchvision does. Both must agree, and the fold must follow weight edits.
    model = tiny_bundle().model
    net = from_densenet(model).eval()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.enable_grad():
        reference = net(x).detach()
    assert torch.allclose(_torch_logits(net, x), reference, rtol=1e-5, atol=1e-5)
    layer = next(iter(net.blocks()[0].values()))
    with torch.no_grad():
        layer.norm2.weight.mul_(3.0)  # an in-place edit, as a re-fit or load_state_dict makes
    with torch.enable_grad():
        edited = net(x).detach()
    assert not torch.allclose(edited, reference, atol=1e-3)
    assert torch.allclose(_torch_logits(net, x), edited, rtol=1e-5, atol=1e-5)
    # a hook on conv1 sees conv1 run (the multiply-add count relies on it)
    seen = []
    handle = layer.conv1.register_forward_hook(lambda *_: seen.append(1))
    _torch_logits(net, x)
    handle.remove()
    assert seen
    # ... and one on a transition's conv sees it run on the pooled map (so does count_macs)
    seen.clear()
    handle = net.transitions()[0].conv.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[-1]))
    _torch_logits(net, x)
    handle.remove()
    assert seen == [4]  # 32 px: stem to 8 x 8, pooled to 4 x 4 before the convolution
    # pooling first: the transitions' convolutions run on a quarter of the positions
    assert count_macs(net, 32, 3) < count_macs(model, 32, 3)


def _torch_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def test_bad_config_is_rejected_with_the_key():
    cfg = to_json_config(from_densenet(tiny_bundle().model).config)
    cfg["blocks"][0]["layers"][1]["i"] = "0-999"
    with pytest.raises(BundleError, match=r"blocks\[0\]\.layers\[1\] reads channel 999"):
        build_model(ARCH_NAME, cfg)


def test_surgery_removes_unread_layer_and_keeps_outputs():
    model = tiny_bundle().model
    net = from_densenet(model).eval()
    cfg = to_json_config(net.config)
    # Nobody reads denseblock1.denselayer2's 8 outputs (channels 24-31): the transition drops them.
    cfg["transitions"][0]["i"] = "0-23"
    cut = PrunedDenseNet(cfg).eval()
    state = net.state_dict()
    state["features.transition1.norm.weight"] = state["features.transition1.norm.weight"][:24]
    for key in ("bias", "running_mean", "running_var"):
        state[f"features.transition1.norm.{key}"] = state[f"features.transition1.norm.{key}"][:24]
    state["features.transition1.conv.weight"] = state["features.transition1.conv.weight"][:, :24]
    cut.load_state_dict(state)
    small = surgery(cut)
    assert "denselayer2" not in small.features.denseblock1
    assert count_parameters(small) < count_parameters(cut)
    x = torch.randn(3, 3, 32, 32)
    assert np.allclose(_logits(small, x), _logits(cut, x), rtol=1e-5, atol=1e-4)
    # the compact config (with the removed layer as o=0) rebuilds the same network
    cfg_small = to_json_config(small.config)
    assert cfg_small["blocks"][0]["layers"][1] == {"i": "", "m": 0, "o": 0}
    rebuilt = build_model(ARCH_NAME, json.loads(json.dumps(cfg_small)))
    rebuilt.load_state_dict(small.state_dict())
    assert np.array_equal(_logits(rebuilt, x), _logits(small, x))


# ---------------------------------------------------------------------------------- exact stage
def _plant(bundle: Bundle) -> tuple[Bundle, dict]:
    """Dead + constant inputs of one consumer and a duplicated produced channel (read identically)."""
    b = bundle.copy()
    f = b.model.features
    with torch.no_grad():
        n1 = f.denseblock2.denselayer2.norm1  # reads 24 channels
        n1.weight[3], n1.bias[3] = 0.0, -1.0  # relu(-1) = 0: dead
        n1.weight[5], n1.bias[5] = 0.0, 0.7  # relu(0.7): constant
        # denseblock3.denselayer1 produces channels 16..23 of block 3; make output 21 a copy of 20
        conv2 = f.denseblock3.denselayer1.conv2
        conv2.weight[5] = conv2.weight[4]
        for norm in (f.denseblock3.denselayer2.norm1, f.transition3.norm):
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, key)[21] = getattr(norm, key)[20]
    return b, {"consumer": "denseblock2.denselayer2", "dead": 3, "constant": 5}


def test_exact_stage_finds_planted_channels_and_keeps_logits(data):
    planted, where = _plant(tiny_bundle())
    ds = load_nih_dataset(data, "train_val")
    result = compress_bundle(planted, ds, CompressSettings(exact_only=True, views=2), speed=False)
    rep, out = result.report, result.bundle
    entry = out.meta.history[-1]
    rec = {c["name"]: c for c in entry["consumers"]}
    kept = decode_index(rec[where["consumer"]]["keep"])
    assert where["dead"] not in kept and where["constant"] not in kept
    assert rec[where["consumer"]]["fit"] == "exact"
    # the duplicate is read by nobody any more and is physically gone
    for name in ("denseblock3.denselayer2", "transition3"):
        keep = decode_index(rec[name]["keep"])
        assert not (20 in keep and 21 in keep)
    assert out.model.features.denseblock3.denselayer1.conv2.out_channels == 7
    assert rep["exact_stage"]["dead"] >= 1 and rep["exact_stage"]["constant"] >= 1
    assert rep["exact_stage"]["dependent"] >= 2
    # held-out logits unchanged to float tolerance
    assert rep["fidelity"]["max_abs_dlogit"] < 1e-5
    test = load_nih_dataset(data, "test")
    _, imgs = read_images(test, 32)
    x = to_model_input(imgs, planted.meta)
    assert np.abs(_logits(out.model, x) - _logits(planted.model, x)).max() < 1e-5
    assert count_parameters(out.model) < count_parameters(planted.model)


# ---------------------------------------------------------------------------------- reconstruction
def test_target_half_gives_at_most_half_the_parameters(half):
    parent, comp, rep = half
    assert comp.meta.arch == ARCH_NAME
    assert count_parameters(comp.model) <= 0.5 * count_parameters(parent.model)
    assert rep["ratios"]["parameter_reduction"] >= 0.5 and rep["target_met"] is True
    # FLOPs and bytes really shrink
    assert count_macs(comp.model, 32, 3) < count_macs(parent.model, 32, 3)
    assert rep["size"]["compressed"]["file_bytes"] < rep["size"]["parent"]["file_bytes"]
    fid = rep["fidelity"]
    assert fid["n_images"] > 0 and np.isfinite(fid["max_abs_dlogit"])
    assert set(fid["labels"]) == set(CHEXNET_LABELS)


def test_reconstruction_beats_pruning_without_refit(half, data):
    """The re-fit matters: the same kept channels with the old weights are far worse."""
    parent, comp, _ = half
    ds = load_nih_dataset(data, "test")
    _, imgs = read_images(ds, 32)
    x = to_model_input(imgs, parent.meta)
    ref = _logits(parent.model, x)
    err = np.abs(_logits(comp.model, x) - ref).mean()
    # naive: same structure, weights copied from the parent's kept channels, no re-fit
    naive = _naive_copy(parent, comp)
    err_naive = np.abs(_logits(naive, x) - ref).mean()
    assert err < 0.8 * err_naive, (err, err_naive)


def _naive_copy(parent: Bundle, comp: Bundle) -> nn.Module:
    entry = comp.meta.history[-1]
    net = from_densenet(parent.model).eval()
    records = {c["name"]: c for c in entry["consumers"]}
    cfg = to_json_config(net.config)
    state = net.state_dict()
    for b, block in enumerate(cfg["blocks"]):
        for j, layer in enumerate(block["layers"]):
            name = f"denseblock{b + 1}.denselayer{j + 1}"
            keep, mid = decode_index(records[name]["keep"]), decode_index(records[name]["mid"])
            layer["i"], layer["m"] = encode_index(keep), len(mid)
            pre = f"features.{name}."
            for key in ("weight", "bias", "running_mean", "running_var"):
                state[pre + "norm1." + key] = state[pre + "norm1." + key][keep]
                state[pre + "norm2." + key] = state[pre + "norm2." + key][mid]
            state[pre + "conv1.weight"] = state[pre + "conv1.weight"][mid][:, keep]
            state[pre + "conv2.weight"] = state[pre + "conv2.weight"][:, mid]
    for b, t in enumerate(cfg["transitions"]):
        keep = decode_index(records[f"transition{b + 1}"]["keep"])
        t["i"] = encode_index(keep)
        pre = f"features.transition{b + 1}."
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[pre + "norm." + key] = state[pre + "norm." + key][keep]
        state[pre + "conv.weight"] = state[pre + "conv.weight"][:, keep]
    keep = decode_index(records["head"]["keep"])
    cfg["head"] = encode_index(keep)
    for key in ("weight", "bias", "running_mean", "running_var"):
        state["features.norm5." + key] = state["features.norm5." + key][keep]
    state["classifier.weight"] = state["classifier.weight"][:, keep]
    naive = PrunedDenseNet(cfg)
    naive.load_state_dict(state)
    return naive.eval()


def test_bundle_saves_loads_and_runs_on_its_own(half, tmp_path):
    parent, comp, _ = half
    path = tmp_path / "mc.safetensors"
    digest = save_bundle(comp, path)
    loaded = load_bundle(path)
    assert loaded.content_hash() == digest
    assert loaded.meta.arch == ARCH_NAME and loaded.meta.parent_hash == parent.content_hash()
    assert len(json.dumps(loaded.meta.arch_config)) < 4000
    x = torch.randn(2, 3, 32, 32)
    assert np.array_equal(_logits(loaded.model, x), _logits(comp.model, x))
    assert isinstance(loaded.model.features[-1], nn.BatchNorm2d)  # norm5: Grad-CAM's target layer
    pooled = pooled_features(loaded.model, x)
    assert pooled.shape[1] == loaded.model.classifier.in_features


def test_history_replays_to_the_same_weights(half, data):
    parent, comp, _ = half
    ds = load_nih_dataset(data, "train_val")
    again = replay_compression(parent, comp, ds)
    a, b = comp.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert again.meta.arch_config == comp.meta.arch_config


def test_a_compressed_bundle_can_be_compressed_again(half, data):
    _, comp, _ = half
    ds = load_nih_dataset(data, "train_val")
    again = compress_bundle(comp, ds, CompressSettings(target_reduction=0.2, max_auroc_drop=None, max_flip_rate=None, views=2), speed=False)
    assert count_parameters(again.bundle.model) <= 0.8 * count_parameters(comp.model)
    assert again.bundle.meta.parent_hash == comp.content_hash()
    assert [e["op"] for e in again.bundle.meta.history] == ["compress", "compress"]


def test_replay_refuses_other_data_or_parent(half, data, tmp_path):
    parent, comp, _ = half
    other = load_nih_dataset(write_textures(tmp_path / "o", 60, seed=9), "all")
    with pytest.raises(DataError, match="manifest hash"):
        replay_compression(parent, comp, other)
    with pytest.raises(BundleError, match="parent bundle hash"):
        replay_compression(tiny_bundle(seed=3), comp, load_nih_dataset(data, "train_val"))


# ---------------------------------------------------------------------------------- errors
def test_too_small_calibration_set_is_a_clear_error(tmp_path):
    ds = load_nih_dataset(write_textures(tmp_path / "s", 8, seed=2), "all")
    with pytest.raises(DataError, match="calibration set too small"):
        compress_bundle(tiny_bundle(), ds, CompressSettings(target_reduction=0.5, max_auroc_drop=None, max_flip_rate=None, views=1),
                        speed=False)


def test_not_a_densenet_is_a_clear_error(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 14))
    bundle = new_bundle(model, arch="mlp", config={}, input_size=32)
    with pytest.raises(BundleError, match="needs a DenseNet"):
        compress_bundle(bundle, load_nih_dataset(data, "train_val"), CompressSettings(exact_only=True), speed=False)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="target_reduction"):
        CompressSettings(target_reduction=1.5)
    with pytest.raises(ValueError, match="holdout_fraction"):
        CompressSettings(holdout_fraction=0.0)


def test_calibration_is_patient_disjoint_and_augmented(data):
    ds = load_nih_dataset(data, "train_val")
    cal = prepare_calibration(tiny_bundle(), ds, seed=0, views=3)
    fit_p = {n.split("_")[0] for n in cal.fit_names}
    hold_p = {n.split("_")[0] for n in cal.hold_names}
    assert not fit_p & hold_p and hold_p
    assert cal.fit.shape[0] == 3 * cal.n_images


# ---------------------------------------------------------------------------------- tolerance mode + CLI
def test_tolerance_mode_stays_inside_its_logit_tolerance(data):
    ds = load_nih_dataset(data, "train_val")
    settings = CompressSettings(max_auroc_drop=None, max_flip_rate=None, max_logit_delta=0.5, max_passes=1, views=2)
    result = compress_bundle(tiny_bundle(), ds, settings, speed=False, report_data=None)
    # checked on the calibration holdout (the random tiny net's logits span about +-35)
    assert result.report["fidelity"]["max_abs_dlogit"] <= 0.5
    assert result.report["ratios"]["parameter_reduction"] > 0.0


def test_tolerance_search_keeps_the_largest_passing_reduction(data):
    """Every probe is judged on the holdout; the kept one passes and every larger probe failed."""
    ds = load_nih_dataset(data, "train_val")
    settings = CompressSettings(max_auroc_drop=None, max_flip_rate=None, max_logit_delta=2.0, max_passes=4, views=2)
    result = compress_bundle(tiny_bundle(), ds, settings, speed=False, report_data=None)
    strategy = result.report["strategy"]
    probes = strategy["probes"]
    assert 1 <= len(probes) <= 4 and strategy["mode"] == "tolerance"
    assert all((p["holdout_max_dlogit"] <= 2.0) == p["within_tolerance"] for p in probes)
    assert any(p["within_tolerance"] for p in probes)
    kept = strategy["target"]
    assert [p for p in probes if p["target"] == kept][0]["within_tolerance"]
    assert all(not p["within_tolerance"] for p in probes if p["target"] > kept)
    assert result.report["fidelity"]["max_abs_dlogit"] <= 2.0  # the report is on the same holdout


def test_target_with_loose_tolerance_is_one_probe_at_the_target(data):
    """A target given with tolerances caps the search: met at once when the tolerance allows it."""
    ds = load_nih_dataset(data, "train_val")
    settings = CompressSettings(target_reduction=0.3, max_auroc_drop=None, max_flip_rate=None, max_logit_delta=1e6, views=2)
    result = compress_bundle(tiny_bundle(), ds, settings, speed=False, report_data=None)
    assert [p["target"] for p in result.report["strategy"]["probes"]] == [0.3]
    assert result.report["target_met"] is True


def test_cli_compress_then_evaluate(data, tmp_path):
    model = tmp_path / "m.safetensors"
    save_bundle(tiny_bundle(), model)
    out, report = tmp_path / "mc.safetensors", tmp_path / "r.json"
    rc = main(["compress", "--model", str(model), "--data", str(data), "--out", str(out),
               "--target-reduction", "0.5", "--report", str(report), "--no-speed", "--views", "2"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["ratios"]["parameter_reduction"] >= 0.5
    assert rep["fidelity"]["where"].endswith("(40 images)")  # the test split, never fitted
    assert count_parameters(load_bundle(out).model) <= 0.5 * count_parameters(load_bundle(model).model)
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--n-boot", "20"]) == 0


# ---------------------------------------------------------------------------------- FLOPs, distillation, statistics
def test_flop_target_is_met_as_well_as_the_parameter_target(data):
    ds = load_nih_dataset(data, "train_val")
    parent = tiny_bundle()
    settings = CompressSettings(target_reduction=0.3, target_flop_reduction=0.25, max_auroc_drop=None,
                                max_flip_rate=None, views=2, distill_epochs=0)
    rep = compress_bundle(parent, ds, settings, speed=False).report
    assert rep["ratios"]["parameter_reduction"] >= 0.3
    assert rep["ratios"]["flop_reduction"] >= 0.25
    assert rep["strategy"]["planned_flop_reduction"] >= 0.25


def test_unreachable_flop_target_is_a_clear_error(data):
    ds = load_nih_dataset(data, "train_val")
    settings = CompressSettings(target_reduction=0.05, target_flop_reduction=0.99, max_auroc_drop=None,
                                max_flip_rate=None, views=2)
    with pytest.raises(BundleError, match="FLOP reduction 0.990 is out of reach: at most"):
        compress_bundle(tiny_bundle(), ds, settings, speed=False)


def test_distillation_only_keeps_an_epoch_that_improves_the_holdout(half):
    rec = half[2]["distillation"]
    curve = rec["holdout_mean_dlogit"]
    assert len(curve) == rec["epochs"] + 1
    assert curve[rec["kept_epoch"]] == min(curve)  # the re-fit (epoch 0) unless an epoch beat it
    assert half[1].meta.history[-1]["distill"] == rec  # replayable


def test_probe_judge_fails_on_flips_and_on_rankings_shown_beyond_noise():
    from model.compression.tolerance import judge_probe

    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < 0.3).astype(np.float64)
    ref = rng.normal(size=(400, 3)) + 2.0 * y
    thr = np.full(3, 0.5)
    settings = CompressSettings()
    assert judge_probe(ref, ref + 1e-4, y, thr, settings)["within_tolerance"]
    flipped = ref.copy()
    flipped[:40, 0] = -flipped[:40, 0]  # 40 of 1,200 decisions flip: 3.3 % > 0.5 %
    verdict = judge_probe(ref, flipped, y, thr, settings.replace(max_auroc_drop=None))
    assert not verdict["within_tolerance"] and "flip rate" in verdict["failed"][0]
    shuffled = ref.copy()
    shuffled[:, 1] = rng.permutation(shuffled[:, 1])  # label 1's ranking destroyed
    verdict = judge_probe(ref, shuffled, y, thr, settings.replace(max_flip_rate=None))
    assert any("label 1" in f for f in verdict["failed"]) and not any("label 0" in f for f in verdict["failed"])


def test_noise_level_auroc_change_on_few_images_does_not_stop_the_search():
    """One swapped pair among 2 positives moves AUROC far beyond 0.005, but its interval spans zero."""
    from model.compression.tolerance import judge_probe

    y = np.zeros((60, 1))
    y[:2] = 1
    ref = np.concatenate([[2.5, 3.0], np.linspace(-2.0, 2.0, 58)])[:, None]
    new = ref.copy()
    new[0, 0] = 1.9  # the lower positive drops below the two highest negatives: ΔAUROC -0.017
    verdict = judge_probe(ref, new, y, np.full(1, 0.999), CompressSettings(max_flip_rate=None))
    assert verdict["label_auroc_delta"]["0"]["estimate"] < -0.005
    assert verdict["within_tolerance"], verdict["failed"]
