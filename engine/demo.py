"""The README's main job on the embedded default data, as a sequence of cached steps.

Each step writes its outputs under the demo folder together with a stamp: the hash of the step's
inputs (parameters and the hashes of the files it reads). A second run finds matching stamps and
reuses the outputs, so it takes seconds instead of minutes; change a parameter and only the steps
downstream of it run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.storage import atomic_write_json, canonical_json, sha256_bytes, sha256_file

__all__ = ["DemoConfig", "QUICK", "FULL", "Step", "run_step", "file_digest", "decision_code_digest"]

_REPO = Path(__file__).resolve().parents[1]
#: The code a triage decision depends on (monitors, rules, interventions, verification, policy schema).
_DECISION_CODE = ("engine", "rules", "interventions", "model")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``QUICK`` is what CI smoke-tests, ``FULL`` what the README promises."""

    n_phantoms: int
    image_size: int
    preset: str
    epochs: int
    seed: int = 7


QUICK = DemoConfig(n_phantoms=300, image_size=32, preset="tiny", epochs=2)
FULL = DemoConfig(n_phantoms=2000, image_size=64, preset="densenet121", epochs=4)


@dataclass(frozen=True)
class Step:
    name: str
    outputs: tuple[Path, ...]
    inputs: dict[str, Any]


def file_digest(path: Path) -> str:
    """Content hash of a file, or of a dataset folder: its ``fault.json`` when injected (it records
    every image the fault changed, which the label file does not), else its label file."""
    if path.is_dir():
        if (path / "fault.json").is_file():
            return sha256_file(path / "fault.json")
        for name in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"):
            if (path / name).is_file():
                return sha256_file(path / name)
        return sha256_bytes(canonical_json(sorted(p.name for p in path.iterdir())))
    return sha256_file(path)


def decision_code_digest() -> str:
    """Hash of the Python sources triage decisions depend on, so that a changed rule or monitor
    re-runs the (seconds-long) triage steps instead of showing stale decisions. Training and
    compression are not keyed on it: minutes of work should not rerun for an unrelated edit."""
    files = sorted(p for d in _DECISION_CODE for p in (_REPO / d).rglob("*.py"))
    return sha256_bytes(canonical_json({str(p.relative_to(_REPO)): sha256_file(p) for p in files}))


def run_step(step: Step, stamp_dir: Path, action: Callable[[], dict[str, Any] | None]) -> tuple[bool, dict[str, Any]]:
    """Run ``action`` unless a stamp with the same inputs exists and every output is present.

    Returns (reused, info) where info is what the action returned (stored in the stamp).
    """
    key = sha256_bytes(canonical_json(step.inputs))
    stamp = stamp_dir / f"{step.name}.json"
    if stamp.is_file() and all(p.exists() for p in step.outputs):
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key:
            return True, saved.get("info", {})
    info = action() or {}
    atomic_write_json(stamp, {"key": key, "info": info})
    return False, info
