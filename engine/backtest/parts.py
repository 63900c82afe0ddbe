"""A scenario's data: an AUDIT part that triage sees and an untouched HOLDOUT part that judges it.

The scenario's dataset split is divided patient-disjoint (seeded) into the two parts, each
written as its own NIH-layout folder (the CSV rows, the images, every image listed as ``test``),
and the fault is injected into each with fresh randomness of its own (a shortcut's tube lands on
the label's negatives in both, as the fault injector does for a test split). The holdout also
stays available without the fault, for the "treated model is not worse on clean images" check.

Folders are built in a temporary sibling and renamed into place, so a killed backtest never
leaves a half-written part; an existing part is reused (the scenario key names its contents).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backtest.scenarios import Scenario
from model.data import NIHDataset, load_nih_dataset, patient_disjoint_split
from model.data.faults import FAULT_FILE, inject_fault
from model.data.nih import SPLIT_FILES

__all__ = ["ScenarioParts", "load_source", "prepare_parts"]


@dataclass(frozen=True)
class ScenarioParts:
    """The datasets of one scenario and the fault's ground truth (empty for a clean control)."""

    audit: NIHDataset
    holdout: NIHDataset
    holdout_clean: NIHDataset
    fault_record: dict[str, Any]

    @property
    def expected(self) -> list[dict[str, Any]]:
        return list(self.fault_record.get("expected_issues") or [])


def load_source(scenario: Scenario) -> NIHDataset:
    """The scenario's dataset split (``all`` when the folder has no split lists)."""
    split = scenario.split
    if split != "all" and not all((scenario.data / f).is_file() for f in SPLIT_FILES.values()):
        split = "all"
    return load_nih_dataset(scenario.data, split)


def _part_seed(seed: int, part: str) -> int:
    """Independent fault randomness per part (the audit's tube positions say nothing about the holdout's)."""
    return int(np.random.default_rng([seed, zlib.crc32(part.encode())]).integers(0, 2**31 - 1))


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (no second copy of the pixels), else a copy.

    Not a symlink: the dataset reader refuses an image that resolves outside its ``images/``.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_subset(ds: NIHDataset, out: Path) -> None:
    """``ds``'s rows as an NIH-layout folder: CSV rows, images (hard links where possible), all in test."""
    if out.is_dir():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    (tmp / "images").mkdir(parents=True)
    try:
        keep = set(ds.image_names)
        with open(ds.csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
        name_col = [h.strip() for h in rows[0]].index("Image Index")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(rows[0])
        writer.writerows(r for r in rows[1:] if r and r[name_col].strip() in keep)
        (tmp / ds.csv_path.name).write_text(text.getvalue(), encoding="utf-8")
        for i, name in enumerate(ds.image_names):
            dst = tmp / "images" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(ds.image_path(i), dst)
        (tmp / SPLIT_FILES["test"]).write_text("".join(f"{n}\n" for n in ds.image_names), encoding="utf-8")
        (tmp / SPLIT_FILES["train_val"]).write_text("", encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _faulted(clean_dir: Path, fault: str, out: Path, seed: int) -> dict[str, Any]:
    if not (out / FAULT_FILE).is_file():
        if out.exists():  # an interrupted injection never leaves a folder without fault.json; be safe
            shutil.rmtree(out)
        inject_fault(clean_dir, fault, out, seed=seed)
    return json.loads((out / FAULT_FILE).read_text(encoding="utf-8"))


def prepare_parts(scenario: Scenario, source: NIHDataset, work: Path) -> ScenarioParts:
    """Write (or reuse) the scenario's audit and holdout folders under ``work``; return their datasets."""
    audit_idx, holdout_idx = patient_disjoint_split(source, scenario.holdout_fraction, scenario.seed)
    _write_subset(source.subset(audit_idx), work / "audit_clean")
    _write_subset(source.subset(holdout_idx), work / "holdout_clean")
    record: dict[str, Any] = {}
    audit_dir, holdout_dir = work / "audit_clean", work / "holdout_clean"
    if scenario.fault is not None:
        record = _faulted(audit_dir, scenario.fault, work / "audit", _part_seed(scenario.seed, "audit"))
        _faulted(holdout_dir, scenario.fault, work / "holdout", _part_seed(scenario.seed, "holdout"))
        audit_dir, holdout_dir = work / "audit", work / "holdout"
    return ScenarioParts(
        audit=load_nih_dataset(audit_dir, "test"),
        holdout=load_nih_dataset(holdout_dir, "test"),
        holdout_clean=load_nih_dataset(work / "holdout_clean", "test"),
        fault_record=record,
    )
