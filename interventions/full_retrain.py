"""Full retraining from scratch on the fit split: the last resort when nothing cheaper holds.

``train_bundle`` trains a new CheXNet-layout DenseNet of the bundle's preset and input size on the
fit split's images (patient-disjoint early-stopping part inside), and stores Youden thresholds and
reference metrics measured on that held-out part. The recipe (preset, seed, epochs, learning rate,
the fit data's manifest hash) goes into the history, so the model can be rebuilt.

A compressed bundle (architecture other than ``densenet``) is retrained as its *uncompressed*
preset — from the ``preset`` parameter, the parent bundle, or the preset recorded in the bundle's
notes — and the result is an uncompressed model (re-run ``compress`` to deploy it compressed);
when none of those names a preset, the intervention refuses and says why.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from engine.core.errors import DataError, InterventionError
from interventions.attribution import finite_or_none
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from model.bundle import Bundle, BundleMeta
from model.labels import CHEXNET_LABELS
from model.nets import ARCH_PRESETS
from model.train import train_bundle

__all__ = ["FullRetrainIntervention", "preset_of"]

_PRESET_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size")


def _check_preset(value: str | None) -> str | None:
    if value is not None and value not in ARCH_PRESETS:
        raise ValueError(f"must be one of {', '.join(repr(p) for p in ARCH_PRESETS)} or null, got {value!r}")
    return value


def _preset_from_config(meta: BundleMeta) -> str | None:
    if meta.arch != "densenet":
        return None
    cfg = meta.arch_config
    for name, preset in ARCH_PRESETS.items():
        if all(_norm(cfg.get(k)) == _norm(preset[k]) for k in _PRESET_KEYS):
            return name
    return None


def _norm(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def preset_of(bundle: Bundle, parent: Bundle | None = None) -> tuple[str | None, str]:
    """The named preset to retrain ``bundle`` as, and where that name came from (or why there is none)."""
    own = _preset_from_config(bundle.meta)
    if own:
        return own, "the bundle's architecture config"
    if parent is not None:
        from_parent = _preset_from_config(parent.meta)
        if from_parent:
            return from_parent, "the uncompressed parent bundle"
    for section in ("training", "compression"):
        notes = bundle.meta.notes.get(section)
        if isinstance(notes, dict):
            for key in ("preset", "parent_preset"):
                if notes.get(key) in ARCH_PRESETS:
                    return str(notes[key]), f"the bundle's notes ({section}.{key})"
    if bundle.meta.arch != "densenet":
        return None, (f"the bundle's architecture {bundle.meta.arch!r} is not a named DenseNet preset and neither its "
                      "parent nor its notes name the uncompressed preset; pass the 'preset' parameter")
    return None, ("the bundle's DenseNet config matches none of the presets "
                  f"({', '.join(ARCH_PRESETS)}); pass the 'preset' parameter")


class FullRetrainIntervention(Intervention):
    """Train a fresh model from scratch on the fit split (costly; approval by default)."""

    name = "full_retrain"
    treats = ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop", "compression_fidelity")
    expected_time_s = 600.0
    classifier_only = False

    class Params(InterventionParams):
        """``params.full_retrain``: the architecture (None: the bundle's own preset) and the training schedule."""

        preset: Annotated[str | None, AfterValidator(_check_preset)] = None
        epochs: int = Field(5, ge=1, le=1000)
        lr: float = Field(1e-3, gt=0.0, allow_inf_nan=False)
        batch_size: int = Field(32, ge=1, le=4096)
        val_fraction: float = Field(0.15, gt=0.0, le=1.0, allow_inf_nan=False)
        patience: int = Field(3, ge=1)
        augment: bool = True

    def _preset(self, ctx: TreatmentContext, params: FullRetrainIntervention.Params) -> tuple[str | None, str]:
        if params.preset is not None:
            return params.preset, "the 'preset' parameter"
        return preset_of(ctx.bundle, ctx.parent)

    def _applicable(self, ctx: TreatmentContext, params: FullRetrainIntervention.Params) -> tuple[bool, str]:
        if list(ctx.bundle.labels) != list(CHEXNET_LABELS):
            return False, (f"retraining produces the 14 CheXNet outputs; this model has {len(ctx.bundle.labels)} "
                           "outputs in another layout")
        if ctx.bundle.meta.in_channels != 3:
            return False, f"retraining builds 3-channel models; this one takes {ctx.bundle.meta.in_channels} channel(s)"
        if ctx.fit_dataset is None or len(ctx.fit_dataset) == 0:
            return False, "full retraining needs the fit split's images (no fit dataset given)"
        if len(set(ctx.fit_dataset.patient_ids.tolist())) < 2:
            return False, "the fit split has fewer than 2 patients; no early-stopping part can be held out"
        preset, source = self._preset(ctx, params)
        if preset is None:
            return False, f"cannot tell which architecture to retrain: {source}"
        return True, (f"full_retrain trains a fresh {preset} at {ctx.bundle.meta.input_size} px on the fit split's "
                      f"{len(ctx.fit_dataset)} images (preset from {source})")

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        preset, source = self._preset(ctx, params)
        if preset is None:
            raise InterventionError(f"full_retrain: cannot tell which architecture to retrain: {source}")
        size = ctx.bundle.meta.input_size
        try:
            trained, report = train_bundle(
                ctx.fit_dataset, preset=preset, image_size=size, epochs=params.epochs, seed=ctx.seed,
                batch_size=params.batch_size, lr=params.lr, val_fraction=params.val_fraction,
                patience=params.patience, augment=params.augment, progress=ctx.progress,
            )
        except DataError as exc:
            raise InterventionError(f"full_retrain: cannot train on the fit split: {exc}") from exc
        was_compressed = ctx.bundle.meta.arch != "densenet"
        recipe = {
            "op": "full_retrain",
            "preset": preset, "preset_source": source, "image_size": size, "seed": ctx.seed,
            "epochs": params.epochs, "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"],
            "lr": params.lr, "batch_size": params.batch_size, "val_fraction": params.val_fraction,
            "patience": params.patience, "augment": params.augment,
            "data_manifest_hash": ctx.fit_dataset.manifest_hash(), "n_images": len(ctx.fit_dataset),
            "replaces_compressed": was_compressed,
            "result_weights_hash": trained.weights_hash(),
        }
        history = list(ctx.bundle.meta.history) + [recipe]
        notes = dict(trained.meta.notes)
        if was_compressed:
            notes["full_retrain"] = {"note": f"retrained as the uncompressed {preset}; re-run compress to deploy "
                                             f"a compressed model (was {ctx.bundle.meta.arch!r})"}
        new = trained.with_meta(history=history, parent_hash=ctx.bundle.content_hash(), notes=notes)
        fit_metrics = {
            "holdout_mean_auroc": report.get("val_mean_auroc"),
            "n_train": report.get("n_train"), "n_holdout": report.get("n_val"),
            "history": report.get("history"),
        }
        return InterventionResult(bundle=new, changes=finite_or_none(recipe), fit_metrics=finite_or_none(fit_metrics),
                                  classifier_only=False)
