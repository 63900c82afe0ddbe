"""Fault-aimed augmentation: fine-tune the last dense block, norm5 and the classifier on the fit split.

Some faults live in the backbone's features, where no classifier-level change reaches them:

* a **scanner shift** (``calibration_drift``): the new scanner's intensity curve moves features the
  head was never trained on. Fine-tuning with intensity / gamma / noise jitter teaches the top of
  the network to read the finding through such changes;
* a **shortcut** (``fp_cluster``): the net learned that an artefact (a chest tube) means the
  finding. Counterfactual copies of a share of the label's NEGATIVES with the artefact drawn in —
  still labelled negative — break that correlation at its source. The artefact is the fault
  injector's chest tube (``model.data.faults.draw_tube``, the one drawer injection and augmentation share);
  another kind of shortcut needs its own drawer;
* lost **resolution** (``recall_collapse``, ``auroc_drop``): a softer detector or a resampling step (the
  ``blur`` fault) fades the fine detail a finding is read from. The fit split's sharpness is measured
  (an equivalent Gaussian sigma, :mod:`model.data.sharpness`) and training images are blurred or
  down-and-up-sampled across the range from as sharp as they are to at least that blur
  (:mod:`interventions.resolution`); the measurement and the range go into ``changes``. ``auto`` picks it
  for both kinds: where ranking or recall fell and the classifier-level fixes did not hold, lost detail
  is what a fine-tune of the top of the backbone can give back (intensity changes show first as
  calibration drift with ranking intact). Label noise also lowers AUROC; no augmentation heals that,
  and verification says so.

Only ``features.denseblock4``, ``features.norm5`` and ``classifier`` train (``fit_model`` with a
``trainable`` filter, on a copy), for a bounded number of epochs, keeping the best epoch by
validation mean AUROC on a patient-disjoint inner part of the fit split; operating thresholds are
then re-fitted by Youden's J on that inner part (labels with too few positives there keep theirs).
Deterministic for a seed on CPU. Costly (minutes on CPU for DenseNet121), so the default policy
asks for a human's approval.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BeforeValidator, Field

from engine.core.errors import DataError, InterventionError
from engine.core.validation import show_value
from interventions.attribution import finite_or_none, output_index, truth_index
from interventions.base import Intervention, InterventionParams, InterventionResult, TreatmentContext
from interventions.resolution import BLUR_SHARE, jitter_range, resolution_jitter
from model.bundle import BundleMeta
from model.data import patient_disjoint_split, read_images
from model.data.faults import draw_tube
from model.data.sharpness import measure_sharpness
from model.features import compute_features
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, sigmoid, youden_threshold
from model.train import augment_batch, fit_model, mean_auroc

__all__ = ["AugmentationIntervention", "intensity_jitter", "TRAINABLE_PREFIXES"]

#: The layers that fine-tuning may change (torchvision DenseNet names).
TRAINABLE_PREFIXES = ("features.denseblock4", "features.norm5", "classifier")


def _check_prefixes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a non-empty list of parameter-name prefixes, got {show_value(value)}")
    return tuple(value)


def intensity_jitter(meta: BundleMeta, *, gamma: tuple[float, float] = (0.7, 1.4), gain: float = 0.15,
                     bias: float = 0.1, noise: float = 0.03) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Batch augmentation (normalised in, normalised out) mimicking another scanner's intensity curve.

    Per image: the standard shift/intensity augmentation, then gamma in ``gamma``, gain ``1 +- gain``,
    offset ``+- bias`` and Gaussian noise up to ``noise`` (in [0, 1] grey units).
    """
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1)
    log_lo, log_hi = math.log(gamma[0]), math.log(gamma[1])

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = augment_batch(x, generator)
        n = x.shape[0]
        grey = (x * std + mean).clamp(0.0, 1.0)
        g = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 1, 1, 1, generator=generator))
        a = 1.0 + gain * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        b = bias * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        sigma = noise * torch.rand(n, 1, 1, 1, generator=generator)
        eps = torch.randn(n, 1, x.shape[2], x.shape[3], generator=generator)  # same noise on all channels
        grey = (grey.clamp_min(1e-6) ** g) * a + b + sigma * eps
        return (grey.clamp(0.0, 1.0) - mean) / std

    return augment


def _draw_tube_grey(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fault injector's tube (:func:`model.data.faults.draw_tube`) drawn on a grey ``(H, W)`` image in [0, 1]
    (through an 8-bit image, as the injector draws): counterfactuals carry the artefact the model learned."""
    im = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    draw_tube(im, rng)
    return np.asarray(im, dtype=np.float32) / 255.0


#: Recorded in the recipe as the counterfactuals' drawer.
_DRAWER_NAME = "model.data.faults.draw_tube"


def _sha(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _with_counterfactuals(ctx: TreatmentContext, params: AugmentationIntervention.Params, dataset: Any,
                          images: np.ndarray, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The training images and labels plus copies of a share of the label's negatives with the tube drawn in
    (still labelled negative), and the recipe entry that replays them."""
    labels = dataset.labels
    negatives = train_idx[labels[train_idx, truth_index(ctx.fact.label)] == 0]
    rng = np.random.default_rng([ctx.seed, 17])
    n_cf = max(1, int(round(params.counterfactual_share * len(negatives))))
    picked = np.sort(rng.choice(negatives, size=min(n_cf, len(negatives)), replace=False))
    counterfactual = np.stack([_draw_tube_grey(images[i].copy(), rng) for i in picked]).astype(np.float32)
    train_images = np.concatenate([images[train_idx], counterfactual])
    train_labels = np.concatenate([labels[train_idx], labels[picked]])
    record = {"counterfactual": {"label": ctx.fact.label, "n": int(len(picked)), "drawer": _DRAWER_NAME,
                                 "images_sha256": _sha([dataset.image_names[i] for i in picked]),
                                 "rng": [ctx.seed, 17]}}
    return train_images, train_labels, record


def _resolution_augment(meta: BundleMeta, params: AugmentationIntervention.Params,
                        images: np.ndarray) -> tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], dict[str, Any]]:
    """The resolution jitter matched to the fit split's measured sharpness, and its recipe entry."""
    measurement = measure_sharpness(images)
    q90 = measurement.quantile(0.9)
    if q90 is None:
        raise InterventionError("augmentation (resolution): no fit-split image has an edge to measure its "
                                "sharpness on, so no blur range can be matched to it")
    sigma_max, factor_max = jitter_range(q90, meta.input_size, params.blur_scale)
    record = {"sharpness": measurement.record(),
              "jitter": {"blur_sigma64": [0.0, sigma_max], "down_up_factor": [1.0, factor_max],
                         "blur_share": BLUR_SHARE, "blur_scale": params.blur_scale,
                         "blur": "model.data.faults.apply_blur"}}
    return resolution_jitter(sigma_max, factor_max), record


def _training_set(ctx: TreatmentContext, params: AugmentationIntervention.Params, mode: str, dataset: Any,
                  images: np.ndarray, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any, dict[str, Any]]:
    """The mode's training images, labels, batch augmentation and recipe entry."""
    meta = ctx.bundle.meta
    if mode == "shortcut":
        train_images, train_labels, record = _with_counterfactuals(ctx, params, dataset, images, train_idx)
        return train_images, train_labels, True, record
    if mode == "resolution":
        augment, record = _resolution_augment(meta, params, images)
    else:
        augment = intensity_jitter(meta)
        record = {"jitter": {"gamma": [0.7, 1.4], "gain": 0.15, "bias": 0.1, "noise": 0.03}}
    return images[train_idx], dataset.labels[train_idx], augment, record


def _refit_thresholds(meta: BundleMeta, val_labels: np.ndarray, val_after: np.ndarray,
                      least: int) -> tuple[list[float], list[str], list[str]]:
    """Youden thresholds on the inner validation part for labels with ``least`` positives and negatives there
    (the others keep theirs from ``meta``)."""
    thresholds = list(meta.thresholds)
    refit, kept = [], []
    for j, label in enumerate(meta.labels):  # outputs are in CheXNet order (checked in applicable)
        y = val_labels[:, j]
        if int(y.sum()) < least or int((1 - y).sum()) < least:
            kept.append(label)
            continue
        thresholds[j] = youden_threshold(y.astype(int), sigmoid(val_after[:, j].astype(np.float64)))
        refit.append(label)
    return thresholds, refit, kept


def _fit_metrics(label: str | None, labels: tuple[str, ...], val_labels: np.ndarray, val_before: np.ndarray,
                 val_after: np.ndarray, report: dict[str, Any]) -> dict[str, Any]:
    fit_metrics: dict[str, Any] = {
        "inner_validation": {
            "n": int(len(val_labels)),
            "mean_auroc": {"before": mean_auroc(val_labels, val_before),
                           "after": mean_auroc(val_labels, val_after)},
        },
        "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"], "history": report["history"],
    }
    if label is not None and label in labels:
        j = labels.index(label)
        y = val_labels[:, j].astype(int)
        before_a, after_a = auroc(y, val_before[:, j]), auroc(y, val_after[:, j])
        fit_metrics[label] = {"auroc_inner_validation": {
            "before": None if np.isnan(before_a) else float(before_a),
            "after": None if np.isnan(after_a) else float(after_a)}}
    return fit_metrics


#: ``mode: auto`` by issue kind (other treated kinds: resolution).
_AUTO_MODES = {"fp_cluster": "shortcut", "calibration_drift": "intensity"}


class AugmentationIntervention(Intervention):
    """Fine-tune the top of the backbone with augmentation aimed at the fault."""

    name = "augmentation"
    treats = ("calibration_drift", "fp_cluster", "recall_collapse", "auroc_drop")
    expected_time_s = 120.0
    classifier_only = False

    class Params(InterventionParams):
        """``params.augmentation``: the fault's augmentation and the fine-tuning schedule."""

        #: auto: shortcut for fp_cluster, intensity for calibration_drift, resolution otherwise.
        mode: Literal["auto", "intensity", "shortcut", "resolution"] = "auto"
        epochs: int = Field(3, ge=1, le=100)
        lr: float = Field(3e-4, gt=0.0, allow_inf_nan=False)
        weight_decay: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
        batch_size: int = Field(32, ge=1, le=4096)
        patience: int = Field(2, ge=1)
        val_fraction: float = Field(0.2, gt=0.0, le=1.0, allow_inf_nan=False)
        counterfactual_share: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
        #: resolution: the largest added blur is this times the fit split's 90th-percentile measured sigma.
        blur_scale: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
        min_threshold_positives: int = Field(5, ge=1)
        trainable: Annotated[tuple[str, ...], BeforeValidator(_check_prefixes)] = TRAINABLE_PREFIXES

    def _mode(self, ctx: TreatmentContext, params: AugmentationIntervention.Params) -> str:
        if params.mode != "auto":
            return params.mode
        return _AUTO_MODES.get(ctx.fact.kind, "resolution")

    def _applicable(self, ctx: TreatmentContext, params: AugmentationIntervention.Params) -> tuple[bool, str]:
        if list(ctx.bundle.labels) != list(CHEXNET_LABELS):
            return False, (f"fine-tuning trains on the 14 NIH labels; this model's {len(ctx.bundle.labels)} outputs "
                           "are not in CheXNet order")
        if ctx.fit_dataset is None or len(ctx.fit_dataset) == 0:
            return False, "augmentation needs the fit split's images (no fit dataset given)"
        if list(ctx.fit_dataset.image_names) != list(ctx.fit.image_names):
            return False, "the fit dataset's rows do not match the fit split's features"
        names = [n for n, _ in ctx.bundle.model.named_parameters()]
        trainable = [n for n in names if n.startswith(params.trainable)]
        if not trainable:
            return False, (f"no parameter of the {ctx.bundle.meta.arch!r} model starts with "
                           f"{', '.join(params.trainable)}; nothing to fine-tune")
        mode = self._mode(ctx, params)
        if mode == "shortcut":
            if ctx.fact.label is None:
                return False, "shortcut augmentation needs the fact's label (whose negatives get the artefact)"
            try:
                output_index(ctx.bundle, ctx.fact.label)
                k = truth_index(ctx.fact.label)
            except InterventionError as exc:
                return False, str(exc)
            if int((ctx.fit.labels[:, k] == 0).sum()) == 0:
                return False, f"the fit split has no {ctx.fact.label} negatives to draw counterfactuals on"
        if len(set(ctx.fit_dataset.patient_ids.tolist())) < 2:
            return False, "the fit split has fewer than 2 patients; no inner validation part can be held out"
        return True, (f"augmentation ({mode}) fine-tunes {len(trainable)} parameter tensors "
                      f"({', '.join(params.trainable)}) for up to {params.epochs} epoch(s)")

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = self.read_params(ctx.params)
        mode = self._mode(ctx, params)
        meta = ctx.bundle.meta
        try:
            dataset, images = read_images(ctx.fit_dataset, meta.input_size)
        except DataError as exc:
            raise InterventionError(f"augmentation: cannot read the fit split's images: {exc}") from exc
        train_idx, val_idx = patient_disjoint_split(dataset, params.val_fraction, ctx.seed)
        train_images, train_labels, augment, recipe_extra = _training_set(ctx, params, mode, dataset, images,
                                                                           train_idx)

        val_images, val_labels = images[val_idx], dataset.labels[val_idx]
        _, val_before = compute_features(ctx.bundle, val_images)
        new = ctx.bundle.copy()
        prefixes = params.trainable
        batch_size = params.batch_size
        while len(train_images) % batch_size == 1 and batch_size < len(train_images):
            batch_size += 1  # a last batch of one image breaks BatchNorm in training mode at 1x1 maps
        report = fit_model(
            new, train_images, train_labels, val_images=val_images, val_labels=val_labels,
            epochs=params.epochs, batch_size=batch_size, lr=params.lr,
            weight_decay=params.weight_decay, seed=ctx.seed, patience=params.patience, augment=augment,
            trainable=lambda n: n.startswith(prefixes), device=None, progress=ctx.progress,
        )
        _, val_after = compute_features(new, val_images)
        thresholds, refit, kept = _refit_thresholds(meta, val_labels, val_after, params.min_threshold_positives)
        fit_metrics = _fit_metrics(ctx.fact.label, new.labels, val_labels, val_before, val_after, report)
        recipe = {
            "op": "fine_tune",
            "mode": mode,
            "trainable": list(prefixes),
            "epochs": params.epochs, "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"],
            "lr": params.lr, "weight_decay": params.weight_decay, "batch_size": batch_size,
            "patience": params.patience, "val_fraction": params.val_fraction, "seed": ctx.seed,
            "fit_manifest_hash": ctx.fit_dataset.manifest_hash(),
            "train_images_sha256": _sha([dataset.image_names[i] for i in train_idx]),
            "val_images_sha256": _sha([dataset.image_names[i] for i in val_idx]),
            **recipe_extra,
            "thresholds_refit": refit, "thresholds_kept": kept,
            "result_weights_hash": new.weights_hash(),
        }
        history = list(meta.history) + [recipe]
        new = new.with_meta(thresholds=thresholds, history=history, parent_hash=ctx.bundle.content_hash())
        return InterventionResult(bundle=new, changes=finite_or_none(recipe), fit_metrics=finite_or_none(fit_metrics),
                                  classifier_only=False)
