"""The NIH-layout reader on the real sample and on each kind of malformed input."""

from __future__ import annotations

import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import NIH1000, random_rows, requires_nih1000
from engine.core.errors import DataError
from model.data import MAX_IMAGE_PIXELS, load_nih_dataset, patient_disjoint_split, read_image, read_images
from model.labels import CHEXNET_LABELS


@requires_nih1000
def test_reads_real_nih_sample_with_patient_disjoint_lists() -> None:
    train = load_nih_dataset(NIH1000, "train_val")
    test = load_nih_dataset(NIH1000, "test")
    full = load_nih_dataset(NIH1000)
    assert (len(train), len(test), len(full)) == (641, 104, 745)
    assert not set(train.patient_ids) & set(test.patient_ids)
    assert train.labels.shape == (641, 14) and train.labels.dtype == np.uint8
    # Labels are parsed exactly from the CSV text.
    row = next(r for r in full.records if r.image_index == "00000004_000.png")
    assert {CHEXNET_LABELS[i] for i, v in enumerate(row.labels) if v} == {"Mass", "Nodule"}
    assert row.patient_id == "4" and row.view_position == "AP"


@requires_nih1000
def test_rgba_and_rgb_images_become_one_grey_channel() -> None:
    ds = load_nih_dataset(NIH1000)
    modes = {}
    for i in range(len(ds)):
        with Image.open(ds.image_path(i)) as im:
            modes.setdefault(im.mode, i)
    assert {"RGB", "RGBA"} <= set(modes)
    for mode, i in modes.items():
        img = read_image(ds.image_path(i), 64)
        with Image.open(ds.image_path(i)) as im:
            expected = np.asarray(im.convert("RGB"))[..., 0].astype(np.float32) / 255.0
        assert img.shape == (64, 64) and img.dtype == np.float32
        np.testing.assert_allclose(img, expected, atol=1 / 255 + 1e-6)


def test_manifest_hash_depends_on_names_and_labels_not_order(nih_factory) -> None:
    rows = random_rows(20, seed=3)
    a = load_nih_dataset(nih_factory(rows))
    b = load_nih_dataset(nih_factory(list(reversed(rows))))
    assert a.manifest_hash() == b.manifest_hash()
    changed = list(rows)
    name, labels, pid = changed[0]
    changed[0] = (name, "Hernia" if labels != "Hernia" else "Mass", pid)
    assert load_nih_dataset(nih_factory(changed)).manifest_hash() != a.manifest_hash()


def test_resizes_any_size_and_16_bit(tmp_path: Path) -> None:
    arr16 = (np.linspace(0, 65535, 100 * 80).reshape(80, 100)).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png", 32)
    assert img.shape == (32, 32) and 0.0 <= img.min() < 0.1 and 0.9 < img.max() <= 1.0


@pytest.mark.parametrize(
    "labels, message",
    [("Mass|Dragon", "unknown label 'Dragon'"), ("No Finding|Mass", "'No Finding' combined"), ("", "unknown label ''")],
)
def test_bad_labels_name_the_row(nih_factory, labels: str, message: str) -> None:
    rows = random_rows(6, seed=1)
    rows[3] = (rows[3][0], labels, rows[3][2])
    root = nih_factory(rows)
    with pytest.raises(DataError, match=r"row 5: .*" + message.replace("|", r"\|")):
        load_nih_dataset(root)
    ds = load_nih_dataset(root, skip_bad=True)
    assert len(ds) == 5 and len(ds.skipped) == 1 and "row 5" in ds.skipped[0].where


def test_missing_column_and_missing_csv(nih_factory) -> None:
    root = nih_factory(random_rows(4))
    csv_path = root / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(csv_path.read_text().replace("Finding Labels", "Findings"))
    with pytest.raises(DataError, match="missing column.*'Finding Labels'"):
        load_nih_dataset(root)
    csv_path.unlink()
    with pytest.raises(DataError, match="no label file"):
        load_nih_dataset(root)


def test_missing_image_is_an_error_or_skipped(nih_factory) -> None:
    rows = random_rows(5, seed=2)
    root = nih_factory(rows)
    (root / "images" / rows[2][0]).unlink()
    with pytest.raises(DataError, match=rf"row 4: image file .*{rows[2][0]} does not exist"):
        load_nih_dataset(root)
    assert len(load_nih_dataset(root, skip_bad=True)) == 4


def test_image_name_escaping_the_folder_is_refused(nih_factory, tmp_path: Path) -> None:
    rows = random_rows(3, seed=4)
    root = nih_factory(rows)
    (tmp_path / "secret.png").write_bytes((root / "images" / rows[0][0]).read_bytes())
    csv_path = root / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(csv_path.read_text().replace(rows[0][0], "../../secret.png"))
    with pytest.raises(DataError, match="escapes the images folder"):
        load_nih_dataset(root)


def test_corrupt_image_named_and_skippable(nih_factory) -> None:
    rows = random_rows(5, seed=5)
    root = nih_factory(rows)
    (root / "images" / rows[1][0]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = load_nih_dataset(root)
    with pytest.raises(DataError, match=rf"{rows[1][0]}: cannot decode image"):
        read_images(ds, 16)
    kept, images = read_images(ds, 16, skip_bad=True)
    assert len(kept) == 4 == len(images) and any(rows[1][0] in s.where for s in kept.skipped)
    assert kept.manifest_hash() != ds.manifest_hash()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG file declaring a huge canvas (the shape of a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width // 8 + 2), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_decompression_bomb_refused(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    _png_header_only(tmp_path / "bomb.png", side, side)
    assert (tmp_path / "bomb.png").stat().st_size < 1000
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(tmp_path / "bomb.png", 32)


def test_split_lists_and_missing_list(nih_factory) -> None:
    rows = random_rows(30, seed=6, n_patients=10)
    root = nih_factory(rows, test_patients=[1, 2, 3])
    test = load_nih_dataset(root, "test")
    assert set(test.patient_ids) <= {"1", "2", "3"}
    (root / "test_list.txt").write_text("00000099_000.png\n")
    with pytest.raises(DataError, match="test_list.txt line 1: image '00000099_000.png' is not in"):
        load_nih_dataset(root, "test")
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match="needs test_list.txt"):
        load_nih_dataset(root, "test")


def test_patient_disjoint_split_is_deterministic_and_disjoint(nih_factory) -> None:
    ds = load_nih_dataset(nih_factory(random_rows(60, seed=7, n_patients=20)))
    a, b = patient_disjoint_split(ds, 0.3, seed=1)
    a2, b2 = patient_disjoint_split(ds, 0.3, seed=1)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert len(a) + len(b) == len(ds)
    assert not set(ds.patient_ids[a]) & set(ds.patient_ids[b])
    with pytest.raises(ValueError, match="'fraction' parameter"):
        patient_disjoint_split(ds, 1.5, seed=1)
