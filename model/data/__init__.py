"""Datasets: the NIH ChestX-ray14 layout reader, phantoms rendered in that layout, and fault injection.

* :mod:`model.data.nih`: the one reader of the NIH on-disk layout (real data and phantoms alike);
  its public names are re-exported here, so ``from model.data import load_nih_dataset`` works.
* :mod:`model.data.phantom`: the procedural phantom generator (the embedded default data set).
* :mod:`model.data.faults`: copies of a dataset with a realistic fault and its ground truth.

Only the reader is imported here (phantoms and faults pull in scipy and are imported by name).
Modules inside ``model/data`` import :mod:`model.data.nih` directly, never this package.
"""

from __future__ import annotations

from model.data.nih import (
    CSV_NAMES,
    MAX_IMAGE_PIXELS,
    REQUIRED_COLUMNS,
    SPLIT_FILES,
    SPLITS,
    NIHDataset,
    Record,
    Skipped,
    load_nih_dataset,
    manifest_digest,
    patient_disjoint_split,
    read_image,
    read_images,
    safe_image_path,
)

__all__ = [
    "CSV_NAMES",
    "SPLITS",
    "SPLIT_FILES",
    "REQUIRED_COLUMNS",
    "MAX_IMAGE_PIXELS",
    "Record",
    "manifest_digest",
    "safe_image_path",
    "Skipped",
    "NIHDataset",
    "load_nih_dataset",
    "read_image",
    "read_images",
    "patient_disjoint_split",
]
