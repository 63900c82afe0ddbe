"""``f_reopt``: re-fit a compressed model to its uncompressed parent on the data it now sees.

Why: compression re-fits each pruned convolution by least squares so that, on the calibration
images, it reproduces the parent's output from fewer inputs. When the input distribution moves
(new scanner, new site), those fits were made on the wrong images and the compressed model drifts
away from its parent even though the parent may still be fine (a ``compression_fidelity`` fact).
Re-running the same per-layer reconstruction on the new images -- same kept channels, same
architecture, only weights change -- restores the fidelity without labels and without training.

The bundle's accepted-fidelity record (``model.compression.accepted``) is kept, not refreshed: it is
the standard the compression was accepted under, measured on images the re-fits never saw. The
re-fit's own figures are in-sample (it fits every image it is given), so they would set a standard
fresh images cannot meet; the verify split judges the re-fit against the record instead.

Needs the parent bundle (``ctx.parent``) and the bundle's ``compress`` history (which channels
each layer keeps); refuses clearly without either.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from engine.core.errors import BundleError, DataError, InterventionError
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from model.compression import latest_plan, refit_to_parent
from model.data import read_images
from model.features import to_model_input
from model.nets import ARCH_NAME

__all__ = ["FReopt"]

def _logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[s : s + 64]) for s in range(0, len(x), 64)]).numpy()
    finally:
        model.train(was)


class FReopt(Intervention):
    """Re-run the compressed model's least-squares reconstruction on the fit split's images."""

    name: ClassVar[str] = "f_reopt"
    treats: ClassVar[tuple[str, ...]] = ("compression_fidelity",)
    expected_time_s: ClassVar[float] = 120.0
    classifier_only: ClassVar[bool] = False

    class Params(InterventionParams):
        """``params.f_reopt``."""

        #: Augmented views per image for the re-fit (None: automatic).
        views: int | None = Field(None, ge=1)

    def _applicable(self, ctx: TreatmentContext, params: FReopt.Params) -> tuple[bool, str]:
        if ctx.bundle.meta.arch != ARCH_NAME:
            return False, (f"f_reopt re-fits a compressed model (arch '{ARCH_NAME}'); this bundle has arch "
                           f"{ctx.bundle.meta.arch!r}")
        try:
            entry = latest_plan(ctx.bundle)
        except BundleError as exc:
            return False, f"f_reopt cannot re-fit: {exc}"
        if ctx.parent is None:
            return False, ("f_reopt needs the uncompressed parent bundle (hash "
                           f"{str(entry.get('parent_hash'))[:12]}…) and none was provided")
        want = entry.get("parent_hash")
        have = ctx.parent.content_hash()
        if want and have != want:
            return False, (f"f_reopt was given parent {have[:12]}…, but this model was compressed from "
                           f"{want[:12]}…")
        return True, "compressed model with its parent and a replayable compression history"

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        parent = ctx.parent
        assert parent is not None  # checked by applicable()
        dataset, images = read_images(ctx.fit_dataset, parent.meta.input_size, skip_bad=True)
        x = to_model_input(images, parent.meta)
        ref = _logits(parent.model, x)
        before = _logits(ctx.bundle.model, x)
        try:
            refit, entry = refit_to_parent(ctx.bundle, parent, dataset, seed=ctx.seed, views=params.views,
                                           images=images, progress=ctx.progress)
        except (BundleError, DataError) as exc:
            raise InterventionError(f"f_reopt cannot re-fit on {ctx.fit_dataset.root} ({ctx.fit_dataset.split}): "
                                    f"{exc}") from exc
        after = _logits(refit.model, x)
        input_hash = ctx.bundle.content_hash()
        bundle = refit.with_meta(parent_hash=input_hash)
        d_before, d_after = np.abs(before - ref), np.abs(after - ref)
        fit_metrics: dict[str, Any] = {
            "where": f"fit split, in-sample ({len(dataset)} images; the verify split judges)",
            "max_abs_dlogit_before": float(d_before.max()),
            "max_abs_dlogit_after": float(d_after.max()),
            "mean_abs_dlogit_before": float(d_before.mean()),
            "mean_abs_dlogit_after": float(d_after.mean()),
        }
        changes = {
            "op": "f_reopt",
            "reproduces": entry["parent_hash"],
            "calibration_manifest_hash": entry["calibration"]["manifest_hash"],
            "images": entry["calibration"]["images"],
            "views": entry["calibration"]["views"],
            "seed": entry["seed"],
            "consumers_refitted": sum(1 for c in entry["consumers"] if c["fit"] != "keep"),
            "history_index": len(bundle.meta.history) - 1,
        }
        return InterventionResult(bundle=bundle, changes=changes, fit_metrics=fit_metrics, classifier_only=False)
