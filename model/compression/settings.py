"""What to compress to and how: :class:`CompressSettings`, validated like every other setting.

The settings are a frozen pydantic model (unknown keys refused) checked by the project's one
validation system (:mod:`engine.core.validation`), so a bad value is reported the way a bad policy
value is, naming the parameter and what was expected::

    CompressSettings: ==> At key: target_reduction: must be a number < 1, got 1.5

The error is a ``ValueError`` (``cli.py compress`` turns it into a usage message).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from engine.core.validation import format_validation_error, show_value

__all__ = ["CompressSettings", "Progress"]

#: ``progress(done, total)``, called after each consumer (and each decoded image batch).
Progress = Callable[[int, int], None]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"must be a finite number >= 0, got {show_value(value)}")
    return value


#: A finite number >= 0 (a tolerance, a weight); NaN fails the bound, infinity the finiteness.
FiniteNonNegative = Annotated[float, Field(ge=0.0), AfterValidator(_finite)]
#: A share strictly between 0 and 1.
OpenShare = Annotated[float, Field(gt=0.0, lt=1.0)]


class CompressSettings(BaseModel):
    """What to compress to and how. ``None`` tolerances are not enforced.

    ``target_reduction`` alone (no tolerance) is always met; with tolerances the tolerances win and
    the report says whether the target was reached. Neither: only the exact stage runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_reduction: OpenShare | None = None
    #: Multiply-adds to remove as well (a share of the parent's, at the calibration resolution);
    #: with ``target_reduction`` the budgets then weigh FLOPs until both are planned.
    target_flop_reduction: OpenShare | None = None
    #: AUROC tolerance on the calibration holdout: |mean ΔAUROC| <= it and every label <= 5x it,
    #: failed only when the paired-bootstrap interval lies beyond it (``model.compression.tolerance``).
    max_auroc_drop: FiniteNonNegative | None = 0.001
    #: Largest share of (image, label) decisions flipped at the bundle thresholds on the holdout
    #: (its Wilson upper bound): the noise-aware fidelity bound that steers the tolerance mode.
    max_flip_rate: FiniteNonNegative | None = 0.005
    #: Largest |Δlogit| on the calibration holdout (a point bound; off unless given).
    max_logit_delta: FiniteNonNegative | None = None
    exact_only: bool = False
    holdout_fraction: OpenShare = 0.2
    seed: int = 0
    #: Relative ridge of the reconstruction re-fits (x mean input variance), towards the old weights.
    ridge: float = Field(default=1e-3, ge=0.0)
    #: Calibration views per image (1 = no augmentation); None: automatic (about 1000 fitted inputs).
    views: int | None = Field(default=None, ge=1)
    #: Sampled positions per 1x1 / 3x3 least-squares problem.
    positions: int = Field(default=16384, ge=64)
    positions_3x3: int = Field(default=8192, ge=64)
    #: Most target passes (probes of the bisection) when tolerances steer the reduction.
    max_passes: int = Field(default=6, ge=1)
    #: Memory allowance for cached activations (MiB), which bounds the views at large inputs.
    memory_mb: int = 1024
    #: Weight of multiply-adds against parameters when budgets are allocated (0: parameters only;
    #: 1: a relative FLOP saving counts as much as the same relative parameter saving).
    flops_weight: FiniteNonNegative = 0.5
    #: Epochs of end-to-end distillation to the parent's logits after the re-fits (0: none). Off by
    #: default: on the 4,000-phantom model it took the held-out mean |Δlogit| of a -61 % model only
    #: from 0.0604 to 0.0594 in 4 epochs (200 s); at 1e-4 every epoch was worse than the re-fit. At
    #: the headline -51.43 % (0.0254 after the re-fits) every epoch was worse too with Adam at 1e-5 or
    #: 2e-6 and with SGD (momentum 0.9) at 1e-4 (1e-3 diverged); only without the jitter did SGD 1e-4
    #: gain, 0.2 % in 2 epochs: the re-fits leave little that 2,600 calibration images can teach.
    #: Nor can the whole 3,276-image train_val split: the -56.8 % parameter / -45 % FLOP model (test
    #: 0.0547, train 0.0495 -- an approximation error, not over-fitting) reached 0.0514 after 6 epochs
    #: at Adam 1e-4 (0.0785 after the first) and 0.0544 after 3 at 3e-5, 52 s an epoch.
    distill_epochs: int = Field(default=0, ge=0)
    distill_lr: float = Field(default=1e-5, gt=0.0)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc, "CompressSettings", type(self))) from None

    def replace(self, **changes: Any) -> CompressSettings:
        """A copy with ``changes`` applied, validated again (``model_copy`` would not validate)."""
        return CompressSettings(**{**self.model_dump(), **changes})

    @property
    def tolerances(self) -> bool:
        return any(v is not None for v in (self.max_auroc_drop, self.max_logit_delta, self.max_flip_rate))
