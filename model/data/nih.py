"""Reader for datasets in the NIH ChestX-ray14 on-disk layout.

A dataset folder holds ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``), an ``images/``
folder and optionally ``train_val_list.txt`` / ``test_list.txt``. The same reader serves the
112,120-image NIH release, the 745-image sample in ``../shared/data/nih1000`` and our phantoms.

Bad input never turns into a silently wrong label: an unknown label, a missing column, a missing,
corrupt or oversized image, or an image name that escapes the folder raises :class:`DataError`
naming the file and row; with ``skip_bad=True`` such rows are dropped and counted in
``NIHDataset.skipped``.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.core.errors import DataError
from engine.core.storage import canonical_json, sha256_bytes
from model.labels import CHEXNET_LABELS, NO_FINDING, NUM_LABELS

__all__ = [
    "CSV_NAMES",
    "SPLITS",
    "MAX_IMAGE_PIXELS",
    "Record",
    "manifest_digest",
    "Skipped",
    "NIHDataset",
    "load_nih_dataset",
    "read_image",
    "read_images",
    "patient_disjoint_split",
]

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLITS = ("all", "train_val", "test")
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
#: Larger images are refused as possible decompression bombs (NIH originals are ~3000 x 3000).
MAX_IMAGE_PIXELS = 40_000_000

_LABEL_INDEX = {name: i for i, name in enumerate(CHEXNET_LABELS)}


@dataclass(frozen=True)
class Record:
    """One CSV row: an image, its patient and its 14-label vector (CheXNet order)."""

    image_index: str
    patient_id: str
    labels: tuple[int, ...]
    follow_up: int | None = None
    view_position: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A row or image dropped under ``skip_bad=True`` and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class NIHDataset:
    """An ordered selection of records from one dataset folder."""

    root: Path
    csv_path: Path
    split: str
    records: tuple[Record, ...]
    skipped: tuple[Skipped, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.records)

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def image_names(self) -> list[str]:
        return [r.image_index for r in self.records]

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([r.patient_id for r in self.records], dtype=object)

    @property
    def labels(self) -> np.ndarray:
        """``(N, 14)`` uint8 label matrix in CheXNet order."""
        if not self.records:
            return np.zeros((0, NUM_LABELS), dtype=np.uint8)
        return np.asarray([r.labels for r in self.records], dtype=np.uint8)

    def manifest_hash(self) -> str:
        """Content hash of (image name, label vector) pairs, independent of row order."""
        return manifest_digest(self.image_names, self.labels)

    def images_fingerprint(self) -> str:
        """Cheap identity of the pixel files: (name, size, mtime) of every image.

        The manifest hash names images and labels only; a fault-injected copy of a dataset has the
        same manifest but other pixels. Caches of anything computed from pixels key on this too.
        Reading every file's bytes would be exact but costs minutes on the 112,120-image release.
        """
        items = []
        for i, record in enumerate(self.records):
            st = self.image_path(i).stat()
            items.append((record.image_index, st.st_size, st.st_mtime_ns))
        return sha256_bytes(canonical_json(sorted(items)))

    def image_path(self, index: int) -> Path:
        return safe_image_path(self.images_dir, self.records[index].image_index, where=str(self.csv_path))

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> "NIHDataset":
        """A dataset of the given rows (in the given order)."""
        records = tuple(self.records[int(i)] for i in indices)
        return replace(self, records=records, split=split or self.split)


def manifest_digest(names: Sequence[str], labels: np.ndarray) -> str:
    """Order-independent hash of (image name, label bits) pairs: the identity of a labelled set."""
    items = sorted((name, "".join(str(int(v)) for v in row)) for name, row in zip(names, labels))
    return sha256_bytes(canonical_json(items))


def safe_image_path(images_dir: Path, name: str, *, where: str) -> Path:
    """Resolve ``name`` inside ``images_dir``; refuse names that escape it (``../``, absolute)."""
    if not name or Path(name).is_absolute() or "\\" in name:
        raise DataError(f"{where}: image name {name!r} must be a relative file name inside {images_dir}")
    base = images_dir.resolve()
    candidate = (images_dir / name).resolve()
    if not candidate.is_relative_to(base):
        raise DataError(f"{where}: image name {name!r} escapes the images folder {images_dir}")
    return candidate


def _find_csv(root: Path) -> Path:
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no label file; expected one of {', '.join(CSV_NAMES)}")


def _parse_labels(text: str, where: str) -> tuple[int, ...]:
    names = [t.strip() for t in text.split("|")]
    if names == [NO_FINDING]:
        return (0,) * NUM_LABELS
    vector = [0] * NUM_LABELS
    for name in names:
        if name == NO_FINDING:
            raise DataError(f"{where}: 'No Finding' combined with findings in {text!r}")
        if name not in _LABEL_INDEX:
            raise DataError(
                f"{where}: unknown label {name!r} in 'Finding Labels' {text!r}; "
                f"expected '{NO_FINDING}' or '|'-separated names from: {', '.join(CHEXNET_LABELS)}"
            )
        vector[_LABEL_INDEX[name]] = 1
    return tuple(vector)


def _read_csv(csv_path: Path, images_dir: Path, skip_bad: bool) -> tuple[list[Record], list[Skipped]]:
    records: list[Record] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read ({exc.strerror})") from exc
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{csv_path}: empty file; expected a header with columns {', '.join(REQUIRED_COLUMNS)}")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; header is {header}")
        col = {name: header.index(name) for name in header}
        for line_no, row in enumerate(reader, start=2):
            where = f"{csv_path.name} row {line_no}"
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                if len(row) <= max(col[c] for c in REQUIRED_COLUMNS):
                    raise DataError(f"{where}: {len(row)} fields; too few for columns {', '.join(REQUIRED_COLUMNS)}")
                name = row[col["Image Index"]].strip()
                if name in seen:
                    raise DataError(f"{where}: duplicate image {name!r}")
                path = safe_image_path(images_dir, name, where=where)
                if not path.is_file():
                    raise DataError(f"{where}: image file {path} does not exist")
                labels = _parse_labels(row[col["Finding Labels"]], where)
                patient = row[col["Patient ID"]].strip()
                if not patient:
                    raise DataError(f"{where}: empty 'Patient ID'")
                follow_up = None
                if "Follow-up #" in col and row[col["Follow-up #"]].strip():
                    try:
                        follow_up = int(row[col["Follow-up #"]])
                    except ValueError:
                        raise DataError(f"{where}: 'Follow-up #' must be an integer, got {row[col['Follow-up #']]!r}") from None
                view = row[col["View Position"]].strip() if "View Position" in col and len(row) > col["View Position"] else None
            except DataError as exc:
                if not skip_bad:
                    raise
                skipped.append(Skipped(where, str(exc)))
                continue
            seen.add(name)
            records.append(Record(name, patient, labels, follow_up, view or None))
    return records, skipped


def _read_split_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_nih_dataset(root: str | Path, split: str = "all", *, skip_bad: bool = False) -> NIHDataset:
    """Read a dataset folder in the NIH layout and select ``split`` (``all``, ``train_val``, ``test``).

    ``split`` other than ``all`` needs the matching list file. Names listed there but missing from
    the CSV are errors (or skipped with ``skip_bad``).
    """
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"The 'split' parameter must be one of {', '.join(SPLITS)}. Got {split!r} instead.")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no 'images/' folder (NIH ChestX-ray14 layout expected)")
    csv_path = _find_csv(root)
    records, skipped = _read_csv(csv_path, images_dir, skip_bad)
    if split != "all":
        list_path = root / SPLIT_FILES[split]
        if not list_path.is_file():
            raise DataError(f"{root}: split {split!r} needs {SPLIT_FILES[split]}, which does not exist")
        by_name = {r.image_index: r for r in records}
        selected = []
        for line_no, name in enumerate(_read_split_list(list_path), start=1):
            if name in by_name:
                selected.append(by_name[name])
            elif not skip_bad:
                raise DataError(f"{list_path.name} line {line_no}: image {name!r} is not in {csv_path.name}")
            elif not any(s.where.endswith(name) for s in skipped):
                skipped.append(Skipped(f"{list_path.name} line {line_no}", f"image {name!r} is not in {csv_path.name}"))
        records = selected
    if not records:
        raise DataError(f"{root}: split {split!r} holds no usable images")
    return NIHDataset(root=root, csv_path=csv_path, split=split, records=tuple(records), skipped=tuple(skipped))


def read_image(path: Path, size: int) -> np.ndarray:
    """Decode one PNG/JPEG of any mode to a ``(size, size)`` float32 grey image in [0, 1]."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{path}: {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit "
                    "(possible decompression bomb)"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / (65535.0 if arr.max() > 255 else 255.0)
                grey = Image.fromarray(arr.astype(np.float32), mode="F")
            elif im.mode == "F":
                grey = im
            else:
                grey = im.convert("L")
            if grey.size != (size, size):
                grey = grey.resize((size, size), Image.BILINEAR)
            out = np.asarray(grey, dtype=np.float32)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    if grey.mode != "F":
        out = out / 255.0
    return np.clip(out, 0.0, 1.0)


def read_images(
    dataset: NIHDataset,
    size: int,
    *,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[NIHDataset, np.ndarray]:
    """Decode every image of ``dataset``; returns the (possibly filtered) dataset and ``(N, size, size)``.

    With ``skip_bad`` unreadable images are dropped from the returned dataset and counted in
    its ``skipped``; otherwise the first one raises :class:`DataError`.
    """
    images = np.empty((len(dataset), size, size), dtype=np.float32)
    keep: list[int] = []
    skipped = list(dataset.skipped)
    for i in range(len(dataset)):
        try:
            images[len(keep)] = read_image(dataset.image_path(i), size)
            keep.append(i)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(Skipped(dataset.records[i].image_index, str(exc)))
        if progress is not None:
            progress(i + 1, len(dataset))
    if len(keep) == len(dataset):
        return dataset, images
    if not keep:
        raise DataError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    filtered = replace(dataset.subset(keep), skipped=tuple(skipped))
    return filtered, images[: len(keep)].copy()


def patient_disjoint_split(
    dataset: NIHDataset, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(a, b)`` with about ``fraction`` of the *patients* in ``b``; no patient in both.

    Deterministic for a given seed and dataset content (patients are ordered before shuffling).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The 'fraction' parameter must be in (0, 1). Got {fraction!r} instead.")
    patients = sorted(set(dataset.patient_ids.tolist()))
    if len(patients) < 2:
        raise DataError(f"{dataset.root}: a patient-disjoint split needs at least 2 patients, found {len(patients)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_b = min(len(patients) - 1, max(1, int(round(fraction * len(patients)))))
    b_patients = {patients[i] for i in order[:n_b]}
    pids = dataset.patient_ids
    in_b = np.array([p in b_patients for p in pids], dtype=bool)
    return np.flatnonzero(~in_b), np.flatnonzero(in_b)
