"""The foundation's CLI: phantom -> train -> evaluate end to end, --help, and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import build_parser, main
from model.bundle import load_bundle
from model.data import load_nih_dataset
from model.features import extract_features
from model.train import train_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ph") / "ph"
    assert main(["phantom", "--out", str(out), "--n", "160", "--size", "32", "--seed", "1"]) == 0
    return out


def test_phantom_train_evaluate_end_to_end(phantom_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    assert main(["train", "--data", str(phantom_dir), "--out", str(model), "--arch", "tiny",
                 "--image-size", "32", "--epochs", "1", "--seed", "1"]) == 0
    bundle = load_bundle(model)
    assert bundle.meta.train_manifest_hash == load_nih_dataset(phantom_dir, "train_val").manifest_hash()
    assert len(bundle.meta.thresholds) == 14 and set(bundle.meta.reference_metrics) == set(bundle.labels)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(model), "--data", str(phantom_dir), "--json", str(out),
                 "--n-boot", "50"]) == 0
    result = json.loads(out.read_text())
    test = load_nih_dataset(phantom_dir, "test")
    assert result["summary"]["n_images"] == len(test) and result["summary"]["split"] == "test"
    for name, row in result["labels"].items():
        assert row["positives"] == int(test.labels[:, bundle.labels.index(name)].sum())
        assert row["tp"] + row["fn"] == row["positives"]


def test_training_is_deterministic_under_a_seed(phantom_dir: Path) -> None:
    ds = load_nih_dataset(phantom_dir, "train_val")
    a, _ = train_bundle(ds, preset="tiny", image_size=32, epochs=1, seed=3)
    b, _ = train_bundle(ds, preset="tiny", image_size=32, epochs=1, seed=3)
    c, _ = train_bundle(ds, preset="tiny", image_size=32, epochs=1, seed=4)
    assert a.content_hash() == b.content_hash()
    assert a.weights_hash() != c.weights_hash()


def test_feature_cache_serves_the_second_call(phantom_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_nih_dataset(phantom_dir, "test")
    bundle, _ = train_bundle(load_nih_dataset(phantom_dir, "train_val"), preset="tiny", image_size=32, epochs=1)
    first = extract_features(bundle, ds)
    import model.features as features_module

    def no_backbone(*args, **kwargs):
        raise AssertionError("backbone ran although the features were cached")

    monkeypatch.setattr(features_module, "compute_features", no_backbone)
    second = extract_features(bundle, ds.subset(np.arange(len(ds))[::-1]))
    assert np.array_equal(second.logits, first.logits[::-1])
    x = features_module.to_model_input(np.zeros((1, 32, 32), np.float32), bundle.meta)
    with torch.no_grad():
        assert torch.allclose(bundle.model(x), bundle.model.classifier(
            features_module.pooled_features(bundle.model, x)))


def test_help_lists_commands_and_each_command_has_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("phantom", "train", "evaluate"):
        assert command in text
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--image-size" in result.stdout


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "nope.safetensors"), "--data", str(tmp_path)]) == 1
    assert "nope.safetensors: model bundle does not exist" in capsys.readouterr().err
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "train", "--data"], capture_output=True, text=True)
    assert result.returncode == 2
    result = subprocess.run([sys.executable, str(REPO / "cli.py")], capture_output=True, text=True)
    assert result.returncode == 2


def test_feature_cache_is_not_fooled_by_a_copy_with_other_pixels(phantom_dir: Path, tmp_path: Path) -> None:
    """A fault-injected copy keeps names and labels (same manifest) but has other pixels."""
    import shutil

    from PIL import Image

    bundle, _ = train_bundle(load_nih_dataset(phantom_dir, "train_val"), preset="tiny", image_size=32, epochs=1)
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    clean = extract_features(bundle, load_nih_dataset(phantom_dir, "test"))
    shifted_ds = load_nih_dataset(copy, "test")
    for i in range(len(shifted_ds)):
        path = shifted_ds.image_path(i)
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        Image.fromarray((255 * (pixels / 255) ** 2).astype(np.uint8)).save(path)
    assert shifted_ds.manifest_hash() == load_nih_dataset(phantom_dir, "test").manifest_hash()
    shifted = extract_features(bundle, shifted_ds)
    assert not np.array_equal(shifted.logits, clean.logits)


def test_write_reference_measures_baseline_on_the_given_data(phantom_dir: Path, tmp_path: Path) -> None:
    model, ref = tmp_path / "m.safetensors", tmp_path / "ref.safetensors"
    assert main(["train", "--data", str(phantom_dir), "--out", str(model), "--arch", "tiny",
                 "--image-size", "32", "--epochs", "1", "--seed", "2"]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(phantom_dir), "--n-boot", "20",
                 "--write-reference", str(ref)]) == 0
    original, referenced = load_bundle(model), load_bundle(ref)
    assert referenced.meta.parent_hash == original.content_hash()
    assert referenced.weights_hash() == original.weights_hash()
    test = load_nih_dataset(phantom_dir, "test")
    k = int(np.argmax(test.labels.sum(0)))
    assert referenced.meta.reference_metrics[referenced.labels[k]]["positives"] == int(test.labels[:, k].sum())
