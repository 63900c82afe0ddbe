"""``cli.py import``: a CheXNet checkpoint becomes a bundle with identical logits; what is not a 14/18-output
DenseNet121 is refused naming the layer; a checkpoint given as --model, and an --out that cannot be one,
get a clear message instead of a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from engine.commands.main import main
from engine.core.errors import BundleError
from model.bundle import is_torch_checkpoint, load_bundle, new_bundle, save_bundle
from model.checkpoint import import_checkpoint
from model.nets import arch_config, build_model, chexnet_densenet121

REPO = Path(__file__).resolve().parents[1]


def _randomised_densenet121(seed: int = 0) -> torch.nn.Module:
    """A DenseNet121 whose BatchNorm affine weights and running statistics are random too (a fresh net's are
    ones and zeros), so a buffer mapped to the wrong key changes the logits."""
    torch.manual_seed(seed)
    model = chexnet_densenet121()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _arnoweng_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """arnoweng/CheXNet's naming: DataParallel + ``densenet121`` attribute prefixes, PyTorch 0.3 ``norm.1``
    layer names, a ``Sequential(Linear, Sigmoid)`` head, and no ``num_batches_tracked`` buffers."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        if ".denselayer" in new:
            for part in ("norm1", "norm2", "relu1", "relu2", "conv1", "conv2"):
                new = new.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        new = new.replace("classifier.", "classifier.0.")
        out["module.densenet121." + new] = value.clone()
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_arnoweng_checkpoint_imports_bit_for_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _randomised_densenet121()
    state = _arnoweng_state(reference)
    legacy = sum(".norm.1." in k or ".norm.2." in k or ".conv.1." in k or ".conv.2." in k for k in state)
    assert legacy > 0 and "module.densenet121.classifier.0.weight" in state
    torch.save({"epoch": 3, "arch": "densenet121", "state_dict": state, "best_loss": 0.1}, tmp_path / "model.pth.tar")

    out = tmp_path / "chexnet.safetensors"
    code, stdout, err = _run(["import", "--checkpoint", str(tmp_path / "model.pth.tar"), "--input-size", "64",
                              "--out", str(out)], capsys)
    assert code == 0, err
    bundle = load_bundle(out)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reference(x), bundle.model(x))
    assert bundle.meta.input_size == 64 and len(bundle.labels) == 14 and bundle.meta.in_channels == 3

    record = bundle.meta.notes["import"]
    counts = {r["rule"]: r["count"] for r in record["remapped"]}
    assert counts == {"prefix 'module.densenet121.' removed": len(state),
                      "legacy norm.1 / conv.2 -> norm1 / conv2": legacy,
                      "classifier.0.* -> classifier.* (Sequential head)": 2}
    assert record["added_num_batches_tracked"] == 121 and record["layout"] == "chexnet"
    example = {r["rule"]: r["example"] for r in record["remapped"]}["classifier.0.* -> classifier.* (Sequential head)"]
    assert example == ["classifier.0.bias", "classifier.bias"] or example == ["classifier.0.weight", "classifier.weight"]
    flat = " ".join(stdout.split())
    assert f"{legacy} " in flat and "norm.1" in flat and "module.densenet121." in flat
    assert "evaluate --model" in flat and "--write-reference" in flat


def _plain_state(num_classes: int = 14) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("densenet", arch_config("densenet121", num_classes=num_classes)).state_dict()


def test_ten_output_and_resnet_checkpoints_are_refused_naming_the_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"state_dict": _plain_state(10)}, tmp_path / "ten.pth")
    torch.save(torchvision.models.resnet18(num_classes=14).state_dict(), tmp_path / "resnet.pth")
    for name, expected in (("ten.pth", "classifier.weight has 10 outputs; expected 14 (CheXNet) or 18 (torchxrayvision)"),
                           ("resnet.pth", "no features.conv0.weight: not a DenseNet121 (found ")):
        out = tmp_path / f"{name}.safetensors"
        code, _, err = _run(["import", "--checkpoint", str(tmp_path / name), "--out", str(out)], capsys)
        flat = " ".join(err.split())
        assert code == 1 and expected in flat and "Traceback" not in err
        assert not out.exists()
    assert "fc.weight" in flat and "layer1..." in flat and "a ResNet?" in flat


def test_layout_option_validates_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_plain_state(), tmp_path / "plain.pth")
    with pytest.raises(BundleError, match="--layout xrv expects 18 outputs; classifier.weight has 14"):
        import_checkpoint(tmp_path / "plain.pth", layout="xrv")
    assert import_checkpoint(tmp_path / "plain.pth", layout="torchvision").remaps == []
    torch.save({f"module.{k}": v for k, v in _plain_state().items()}, tmp_path / "wrapped.pth")
    with pytest.raises(BundleError, match=r"--layout torchvision expects torchvision's key names, but \d+ key"):
        import_checkpoint(tmp_path / "wrapped.pth", layout="torchvision")
    assert import_checkpoint(tmp_path / "wrapped.pth", layout="chexnet").layout == "chexnet"


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("densenet", arch_config("tiny")).state_dict()


def test_checkpoint_given_as_model_is_recognised_by_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_tiny_state(), tmp_path / "weights.bin")  # zip format; the name says nothing
    torch.save({"state_dict": _tiny_state()}, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)
    for name in ("weights.bin", "legacy.pth.tar"):
        path = tmp_path / name
        assert is_torch_checkpoint(path)
        code, _, err = _run(["evaluate", "--model", str(path), "--data", str(tmp_path)], capsys)
        flat = " ".join(err.split())
        assert code == 1 and "Traceback" not in err and "Error while deserializing" not in flat
        assert f"{path} is a PyTorch checkpoint, not a bundle: import it with `cli.py import --checkpoint {path}" in flat
    # a bundle is never taken for a checkpoint, nor is other junk
    config = arch_config("tiny")
    save_bundle(new_bundle(build_model("densenet", config), config=config, input_size=32), tmp_path / "b.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02 but not a pickle at all")
    assert not is_torch_checkpoint(tmp_path / "b.safetensors")
    with pytest.raises(BundleError, match="not a readable safetensors bundle"):
        load_bundle(tmp_path / "junk.bin")


def _out_cases(tmp_path: Path) -> list[tuple[list[str], Path]]:
    """(argv, the path given as --out) per command; every other input is missing, so only a check made before
    any work can name --out."""
    afile, adir, nope = tmp_path / "afile", tmp_path / "adir", str(tmp_path / "missing")
    afile.write_text("x")
    adir.mkdir()
    policy = str(REPO / "policies" / "default.yaml")
    return [
        (["triage", "--model", nope, "--data", nope, "--policy", policy, "--out", str(afile)], afile),
        (["backtest", "--policy", policy, "--model", nope, "--data", nope, "--faults", "blur", "--out", str(afile)], afile),
        (["demo", "--quick", "--out", str(afile)], afile),
        (["report", "--model", nope, "--image", nope, "--out", str(afile)], afile),
        (["inject", "--data", nope, "--fault", "blur", "--out", str(afile)], afile),
        (["phantom", "--out", str(afile / "sub"), "--n", "10"], afile / "sub"),
        (["train", "--data", nope, "--out", str(adir)], adir),
        (["compress", "--model", nope, "--data", nope, "--out", str(adir)], adir),
        (["import", "--checkpoint", nope, "--out", str(adir)], adir),
        (["evaluate", "--model", nope, "--data", nope, "--json", str(adir)], adir),
    ]


def test_unusable_out_paths_are_usage_errors_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, path in _out_cases(tmp_path):
        code, _, err = _run(argv, capsys)
        flat = " ".join(err.split())
        option = "--json" if "--json" in argv else "--out"
        assert code == 2, (argv, err)
        assert f"{option} {path}" in flat and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not any((tmp_path / "adir").iterdir())
