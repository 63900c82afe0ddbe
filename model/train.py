"""Training and fine-tuning of DenseNet bundles on NIH-layout datasets.

``train_bundle`` trains from scratch with early stopping on a patient-disjoint validation part
and stores, in the bundle, what later monitors compare against: reference metrics per label and
Youden-J operating thresholds, both measured on that held-out part (never on training images).
``fit_model`` is the shared inner loop; interventions reuse it to fine-tune parts of a model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import DataError
from model.bundle import Bundle, new_bundle
from model.data import NIHDataset, patient_disjoint_split, read_images
from model.features import compute_features, to_model_input
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, numeric_rows, per_label_metrics, sigmoid, youden_threshold
from model.nets import arch_config, build_model

__all__ = ["default_device", "augment_batch", "fit_model", "train_bundle", "reference_from_holdout", "mean_auroc"]

Progress = Callable[[int, int], None]
EpochCallback = Callable[[int, float, float], None]


def default_device() -> str:
    """CUDA when present, else CPU (everything here runs on CPU; a GPU only makes it faster)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild, anatomy-preserving augmentation on a normalised batch: small shifts and intensity jitter.

    No horizontal flips: the heart's side and the laterality of findings are part of the signal.
    """
    n, _, h, w = x.shape
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    gain = 1.0 + 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 2
    bias = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 2
    return out * gain + bias


def mean_auroc(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean AUROC over labels that have both classes (NaN if none)."""
    values = [auroc(labels[:, k], logits[:, k]) for k in range(labels.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def fit_model(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    patience: int = 3,
    augment: bool | Callable[[torch.Tensor, torch.Generator], torch.Tensor] = True,
    trainable: Callable[[str], bool] | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train ``bundle.model`` in place on grey images; keeps the best epoch by validation mean AUROC.

    ``trainable(param_name)`` selects the parameters to update (others are frozen and their
    BatchNorm statistics kept). Deterministic for a seed on CPU.
    """
    if len(images) == 0:
        raise DataError("cannot train on an empty image set")
    device = device or default_device()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = bundle.model.to(device)
    params, frozen = _select_trainable(model, trainable)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs * steps_per_epoch))
    epoch_run = _EpochRunner(bundle, images, torch.from_numpy(labels.astype(np.float32)), batch_size,
                             augment_batch if augment is True else (augment or None), generator, device,
                             optimiser, scheduler, frozen, progress, epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    best_state, best_score, since_best = None, -math.inf, 0
    for epoch in range(epochs):
        train_loss = epoch_run()
        score = float("nan")
        if val_images is not None and val_labels is not None and len(val_images):
            _, val_logits = compute_features(bundle, val_images)
            score = mean_auroc(val_labels, val_logits)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_mean_auroc": score})
        if on_epoch is not None:
            on_epoch(epoch + 1, train_loss, score)
        comparable = score if not math.isnan(score) else -train_loss
        if comparable > best_score:
            best_score, since_best = comparable, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.to("cpu").eval()
    return {"epochs_run": len(history), "history": history, "best_epoch": int(np.argmax([
        h["val_mean_auroc"] if not math.isnan(h["val_mean_auroc"]) else -h["train_loss"] for h in history])) + 1}


def _select_trainable(model: nn.Module, trainable: Callable[[str], bool] | None) -> tuple[list[nn.Parameter], set[str]]:
    """(parameters to update, names of the frozen ones); frozen parameters stop asking for gradients."""
    params = [p for name, p in model.named_parameters() if trainable is None or trainable(name)]
    frozen = {name for name, _ in model.named_parameters() if trainable is not None and not trainable(name)}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return params, frozen


class _EpochRunner:
    """One pass over the training images in a seeded random order; returns the mean training loss.

    Holds what every epoch shares (optimiser, scheduler, generator, the step count for progress), so
    that :func:`fit_model` reads as the early-stopping loop it is.
    """

    def __init__(self, bundle: Bundle, images: np.ndarray, y_all: torch.Tensor, batch_size: int,
                 aug: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None, generator: torch.Generator,
                 device: str, optimiser: torch.optim.Optimizer, scheduler, frozen: set[str],
                 progress: Progress | None, total_steps: int) -> None:
        self.bundle, self.images, self.y_all, self.batch_size, self.aug = bundle, images, y_all, batch_size, aug
        self.generator, self.device, self.optimiser, self.scheduler = generator, device, optimiser, scheduler
        self.frozen, self.progress, self.total_steps, self.step = frozen, progress, total_steps, 0

    def __call__(self) -> float:
        model, images = self.bundle.model, self.images
        model.train()
        if self.frozen:  # keep frozen BatchNorms in eval mode so their running statistics stay put
            for name, module in model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in self.frozen:
                    module.eval()
        order = torch.randperm(len(images), generator=self.generator).numpy()
        running = 0.0
        for start in range(0, len(images), self.batch_size):
            idx = order[start : start + self.batch_size]
            if len(idx) == 1 and len(images) > 1:
                continue  # BatchNorm cannot train on one image with 1x1 maps; it is seen next epoch
            x = to_model_input(images[idx], self.bundle.meta)
            if self.aug is not None:
                x = self.aug(x, self.generator)
            logits = model(x.to(self.device))
            loss = F.binary_cross_entropy_with_logits(logits, self.y_all[idx].to(self.device))
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            self.scheduler.step()
            running += loss.item() * len(idx)
            self.step += 1
            if self.progress is not None:
                self.progress(self.step, self.total_steps)
        return running / len(images)


def reference_from_holdout(bundle: Bundle, labels: np.ndarray, logits: np.ndarray) -> Bundle:
    """Bundle with Youden-J thresholds and reference metrics measured on a held-out part."""
    probs = sigmoid(logits)
    thresholds = [youden_threshold(labels[:, k], probs[:, k]) for k in range(labels.shape[1])]
    metrics = per_label_metrics(labels, logits, thresholds, bundle.meta.labels, n_boot=200, seed=0)
    return bundle.with_meta(thresholds=thresholds, reference_metrics=numeric_rows(metrics))


def train_bundle(
    dataset: NIHDataset,
    *,
    preset: str = "densenet121",
    image_size: int = 64,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    val_fraction: float = 0.15,
    patience: int = 3,
    augment: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
    on_epoch: EpochCallback | None = None,
    images: np.ndarray | None = None,
) -> tuple[Bundle, dict[str, Any]]:
    """Train a CheXNet-layout DenseNet from scratch on ``dataset``; returns the bundle and a report.

    A patient-disjoint ``val_fraction`` of the patients is held out for early stopping, reference
    metrics and Youden thresholds. ``images`` may pass pre-decoded images (same rows) to skip decoding.
    """
    if epochs < 1:
        raise ValueError(f"The 'epochs' parameter must be >= 1. Got {epochs!r} instead.")
    if images is None:
        dataset, images = read_images(dataset, image_size)
    train_idx, val_idx = patient_disjoint_split(dataset, val_fraction, seed)
    labels = dataset.labels
    torch.manual_seed(seed)
    config = arch_config(preset, num_classes=len(CHEXNET_LABELS))
    bundle = new_bundle(build_model("densenet", config), config=config, input_size=image_size,
                        train_manifest_hash=dataset.manifest_hash())
    report = fit_model(
        bundle, images[train_idx], labels[train_idx],
        val_images=images[val_idx], val_labels=labels[val_idx],
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
        augment=augment, device=device, progress=progress, on_epoch=on_epoch,
    )
    _, val_logits = compute_features(bundle, images[val_idx])
    bundle = reference_from_holdout(bundle, labels[val_idx], val_logits)
    report.update(
        preset=preset, image_size=image_size, seed=seed, n_train=int(len(train_idx)), n_val=int(len(val_idx)),
        val_mean_auroc=mean_auroc(labels[val_idx], val_logits), lr=lr, batch_size=batch_size,
    )
    bundle = bundle.with_meta(notes={"training": {k: v for k, v in report.items() if k != "history"}})
    return bundle, report
