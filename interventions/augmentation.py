"""Fault-aimed augmentation: fine-tune the last dense block, norm5 and the classifier on the fit split.

Some faults live in the backbone's features, where no classifier-level change reaches them:

* a **scanner shift** (``calibration_drift``): the new scanner's intensity curve moves features the
  head was never trained on. Fine-tuning with intensity / gamma / noise jitter teaches the top of
  the network to read the finding through such changes;
* a **shortcut** (``fp_cluster``): the net learned that an artefact (a chest tube) means the
  finding. Counterfactual copies of a share of the label's NEGATIVES with the artefact drawn in —
  still labelled negative — break that correlation at its source. The artefact is the fault
  injector's chest tube (``model.data.faults.draw_tube``); another kind of shortcut needs its own drawer.

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
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.core.errors import DataError, InterventionError
from interventions.attribution import (
    choice_param, finite_or_none, float_param, int_param, output_index, resolve_params, truth_index,
)
from interventions.base import Intervention, InterventionResult, TreatmentContext, register
from model.bundle import BundleMeta
from model.data import patient_disjoint_split, read_images
from model.data.faults import draw_tube
from model.features import compute_features
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, sigmoid, youden_threshold
from model.train import augment_batch, fit_model, mean_auroc

__all__ = ["AugmentationIntervention", "intensity_jitter", "TRAINABLE_PREFIXES"]

#: The layers that fine-tuning may change (torchvision DenseNet names).
TRAINABLE_PREFIXES = ("features.denseblock4", "features.norm5", "classifier")


def _prefixes_param(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a non-empty list of parameter-name prefixes")
    return tuple(value)


PARAMS = {
    "mode": ("auto", choice_param("auto", "intensity", "shortcut")),
    "epochs": (3, int_param(1, 100)),
    "lr": (3e-4, float_param(0.0, lo_open=True)),
    "weight_decay": (1e-4, float_param(0.0)),
    "batch_size": (32, int_param(1, 4096)),
    "patience": (2, int_param(1)),
    "val_fraction": (0.2, float_param(0.0, 1.0, lo_open=True)),
    "counterfactual_share": (0.5, float_param(0.0, 1.0, lo_open=True)),
    "min_threshold_positives": (5, int_param(1)),
    "trainable": (TRAINABLE_PREFIXES, _prefixes_param),
}


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


def _shortcut_drawer() -> tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], str]:
    """The fault injector's own tube (:func:`model.data.faults.draw_tube`, drawn on an 8-bit copy of
    the image): counterfactuals should carry the artefact the model actually learned."""

    def drawer(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        im = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
        draw_tube(im, rng)
        return np.asarray(im, dtype=np.float32) / 255.0

    return drawer, "model.data.faults.draw_tube"


def _sha(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


@register
class AugmentationIntervention(Intervention):
    """Fine-tune the top of the backbone with augmentation aimed at the fault."""

    name = "augmentation"
    treats = ("calibration_drift", "fp_cluster")
    expected_time_s = 120.0
    classifier_only = False

    def _mode(self, ctx: TreatmentContext, params: dict[str, Any]) -> str:
        if params["mode"] != "auto":
            return params["mode"]
        return "shortcut" if ctx.fact.kind == "fp_cluster" else "intensity"

    def applicable(self, ctx: TreatmentContext) -> tuple[bool, str]:
        ok, why = super().applicable(ctx)
        if not ok:
            return ok, why
        try:
            params = resolve_params(self.name, dict(ctx.params), PARAMS)
        except InterventionError as exc:
            return False, str(exc)
        if list(ctx.bundle.labels) != list(CHEXNET_LABELS):
            return False, (f"fine-tuning trains on the 14 NIH labels; this model's {len(ctx.bundle.labels)} outputs "
                           "are not in CheXNet order")
        if ctx.fit_dataset is None or len(ctx.fit_dataset) == 0:
            return False, "augmentation needs the fit split's images (no fit dataset given)"
        if list(ctx.fit_dataset.image_names) != list(ctx.fit.image_names):
            return False, "the fit dataset's rows do not match the fit split's features"
        names = [n for n, _ in ctx.bundle.model.named_parameters()]
        trainable = [n for n in names if n.startswith(params["trainable"])]
        if not trainable:
            return False, (f"no parameter of the {ctx.bundle.meta.arch!r} model starts with "
                           f"{', '.join(params['trainable'])}; nothing to fine-tune")
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
                      f"({', '.join(params['trainable'])}) for up to {params['epochs']} epoch(s)")

    def _apply(self, ctx: TreatmentContext) -> InterventionResult:
        params = resolve_params(self.name, dict(ctx.params), PARAMS)
        mode = self._mode(ctx, params)
        meta = ctx.bundle.meta
        try:
            dataset, images = read_images(ctx.fit_dataset, meta.input_size)
        except DataError as exc:
            raise InterventionError(f"augmentation: cannot read the fit split's images: {exc}") from exc
        labels = dataset.labels
        train_idx, val_idx = patient_disjoint_split(dataset, params["val_fraction"], ctx.seed)
        train_images, train_labels = images[train_idx], labels[train_idx]
        recipe_extra: dict[str, Any] = {}
        if mode == "shortcut":
            k_truth = truth_index(ctx.fact.label)
            drawer, drawer_name = _shortcut_drawer()
            negatives = train_idx[labels[train_idx, k_truth] == 0]
            rng = np.random.default_rng([ctx.seed, 17])
            n_cf = max(1, int(round(params["counterfactual_share"] * len(negatives))))
            picked = np.sort(rng.choice(negatives, size=min(n_cf, len(negatives)), replace=False))
            counterfactual = np.stack([drawer(images[i].copy(), rng) for i in picked]).astype(np.float32)
            train_images = np.concatenate([train_images, counterfactual])
            train_labels = np.concatenate([train_labels, labels[picked]])
            augment: Any = True
            recipe_extra = {"counterfactual": {"label": ctx.fact.label, "n": int(len(picked)), "drawer": drawer_name,
                                               "images_sha256": _sha([dataset.image_names[i] for i in picked]),
                                               "rng": [ctx.seed, 17]}}
        else:
            augment = intensity_jitter(meta)
            recipe_extra = {"jitter": {"gamma": [0.7, 1.4], "gain": 0.15, "bias": 0.1, "noise": 0.03}}

        val_images, val_labels = images[val_idx], labels[val_idx]
        _, val_before = compute_features(ctx.bundle, val_images)
        new = ctx.bundle.copy()
        prefixes = params["trainable"]
        batch_size = params["batch_size"]
        while len(train_images) % batch_size == 1 and batch_size < len(train_images):
            batch_size += 1  # a last batch of one image breaks BatchNorm in training mode at 1x1 maps
        report = fit_model(
            new, train_images, train_labels, val_images=val_images, val_labels=val_labels,
            epochs=params["epochs"], batch_size=batch_size, lr=params["lr"],
            weight_decay=params["weight_decay"], seed=ctx.seed, patience=params["patience"], augment=augment,
            trainable=lambda n: n.startswith(prefixes), device=None, progress=ctx.progress,
        )
        _, val_after = compute_features(new, val_images)

        thresholds = list(meta.thresholds)
        refit, kept = [], []
        for j, label in enumerate(new.labels):  # outputs are in CheXNet order (checked in applicable)
            y = val_labels[:, j]
            least = params["min_threshold_positives"]
            if int(y.sum()) < least or int((1 - y).sum()) < least:
                kept.append(label)
                continue
            thresholds[j] = youden_threshold(y.astype(int), sigmoid(val_after[:, j].astype(np.float64)))
            refit.append(label)

        fit_metrics: dict[str, Any] = {
            "inner_validation": {
                "n": int(len(val_idx)),
                "mean_auroc": {"before": mean_auroc(val_labels, val_before),
                               "after": mean_auroc(val_labels, val_after)},
            },
            "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"], "history": report["history"],
        }
        if ctx.fact.label is not None and ctx.fact.label in new.labels:
            j = new.labels.index(ctx.fact.label)
            y = val_labels[:, j].astype(int)
            before_a, after_a = auroc(y, val_before[:, j]), auroc(y, val_after[:, j])
            fit_metrics[ctx.fact.label] = {"auroc_inner_validation": {
                "before": None if np.isnan(before_a) else float(before_a),
                "after": None if np.isnan(after_a) else float(after_a)}}

        recipe = {
            "op": "fine_tune",
            "mode": mode,
            "trainable": list(prefixes),
            "epochs": params["epochs"], "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"],
            "lr": params["lr"], "weight_decay": params["weight_decay"], "batch_size": batch_size,
            "patience": params["patience"], "val_fraction": params["val_fraction"], "seed": ctx.seed,
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
