"""Argument checks of the phantom generator's public functions.

Plain checks raising :class:`~engine.core.errors.DataError`, the user-facing error family, whose
message the CLI prints as it stands (``cli.py phantom --n 0`` says which parameter and what came).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.core.errors import DataError
from model.labels import NUM_LABELS


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An int >= ``minimum`` (bools refused), or a DataError naming the parameter."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"The {name!r} parameter must be an int >= {minimum}. Got {value!r} instead.")
    return int(value)


def check_test_fraction(value: object) -> float:
    """A float in [0, 1) (bools refused), or a DataError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise DataError(f"The 'test_fraction' parameter of generate_phantoms must be a float in [0, 1). Got {value!r} instead.")
    return float(value)


def check_out_dir(out_dir: str | Path) -> Path:
    """A directory that is absent or empty, or a DataError saying which it is not."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"The 'out_dir' parameter of generate_phantoms must be a new or empty directory. Got {str(out)!r}, which {'is not a directory' if not out.is_dir() else 'is not empty'}.")
    return out


def check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """A 14-vector of 0/1 as uint8, or a DataError saying what came."""
    vec = np.asarray(labels)
    if vec.shape != (NUM_LABELS,) or not np.isin(vec, (0, 1)).all():
        raise DataError(f"The 'labels' parameter must be a 0/1 vector of length {NUM_LABELS} in CHEXNET_LABELS order. Got shape {vec.shape} instead.")
    return vec.astype(np.uint8)
