"""The public entry points: compress a bundle to one setting, or to several targets at once."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.core.errors import DataError
from model.bundle import Bundle
from model.compression.accepted import NOTE_KEY, holdout_fidelity
from model.compression.calibration import Calibration, prepare_calibration
from model.compression.history import HISTORY_OP, history_entry
from model.compression.measure import compression_report
from model.compression.search import compress_to_target, finish_network, prepare_planning, run_compression
from model.compression.settings import CompressSettings, Progress
from model.compression.walk import Walk
from model.data import NIHDataset
from model.nets.pruned import ARCH_NAME, PrunedDenseNet, as_pruned, to_json_config

__all__ = ["CompressResult", "compress_bundle", "compress_targets"]


@dataclass
class CompressResult:
    """The compressed bundle, its report (JSON-able) and the pruned network in physical form."""

    bundle: Bundle
    report: dict[str, Any]


def _finish(bundle: Bundle, calib: Calibration, settings: CompressSettings, walk: Walk, net: PrunedDenseNet,
            distilled: dict[str, Any] | None, info: dict[str, Any], log: list[str],
            report_data: tuple[torch.Tensor, np.ndarray, str] | None, speed: bool, target: float | None,
            t0: float) -> CompressResult:
    """The new bundle (the deployable ``net``) with its history entry, and the report."""
    parent_hash = bundle.content_hash()
    entry = history_entry(parent_hash, calib, settings, [walk.records[n] for n in walk.names], op=HISTORY_OP,
                          extra={"distill": distilled} if distilled else None)
    meta = bundle.meta
    new = Bundle(net, meta.model_copy(update={
        "arch": ARCH_NAME, "arch_config": to_json_config(net.config), "parent_hash": parent_hash,
        "history": list(meta.history) + [entry],
    }))
    x_rep, y_rep, where = report_data if report_data is not None else (calib.hold, calib.hold_labels,
                                                                     f"calibration holdout ({len(calib.hold)} images)")
    report = compression_report(bundle, new, x_rep, y_rep, where=where, speed=speed, seed=settings.seed)
    exact_tot: dict[str, int] = {}
    for v in walk.exact_found.values():
        for k, n in v.items():
            exact_tot[k] = exact_tot.get(k, 0) + n
    report.update(
        settings=dict(settings.model_dump(), target_reduction=target),
        strategy=info,
        log=list(log),
        exact_stage=exact_tot,
        calibration={"manifest_hash": calib.manifest_hash, "split": calib.split, "fit_images": calib.n_images,
                     "views": calib.views, "holdout_images": int(len(calib.hold))},
        distillation=distilled,
        target_met=None if target is None else report["ratios"]["parameter_reduction"] >= target - 1e-9,
        parent_hash=parent_hash,
        wall_time_s=time.perf_counter() - t0,
    )
    summary = {k: report["ratios"][k] for k in ("parameter_reduction", "flop_reduction")}
    summary.update(max_abs_dlogit=report["fidelity"]["max_abs_dlogit"], where=where)
    # The fidelity later audits compare with (engine/monitors/compression_fidelity.py): always the holdout.
    summary[NOTE_KEY] = holdout_fidelity(bundle, new, calib.hold, seed=settings.seed,
                                         where=f"calibration holdout ({len(calib.hold)} images)").to_json()
    new = new.with_meta(notes={**meta.notes, "compression": summary})
    return CompressResult(new, report)


def _prepare(bundle: Bundle, dataset: NIHDataset, settings: CompressSettings,
             images: np.ndarray | None) -> tuple[PrunedDenseNet, Calibration]:
    """The bundle's net as a (copied) pruned DenseNet, and its calibration data with a holdout."""
    parent_net, _ = as_pruned(bundle.model, bundle.meta.arch, bundle.meta.arch_config)
    parent_net = copy.deepcopy(parent_net).eval()
    calib = prepare_calibration(bundle, dataset, holdout_fraction=settings.holdout_fraction, seed=settings.seed,
                                views=settings.views, memory_mb=settings.memory_mb, images=images)
    if len(calib.hold) == 0:
        raise DataError(f"{dataset.root}: the held-out part of the calibration data is empty")
    return parent_net, calib


def compress_bundle(
    bundle: Bundle,
    dataset: NIHDataset,
    settings: CompressSettings | None = None,
    *,
    report_data: tuple[torch.Tensor, np.ndarray, str] | None = None,
    speed: bool = True,
    images: np.ndarray | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Compress a DenseNet bundle with calibration images from ``dataset``; see the module docstring.

    ``report_data`` = (model inputs, labels, description) of held-out images for the report; by
    default the calibration holdout is used. The returned bundle records ``parent_hash`` and a
    replayable ``compress`` history entry.
    """
    settings = settings or CompressSettings()
    t0 = time.perf_counter()
    parent_net, calib = _prepare(bundle, dataset, settings, images)
    log: list[str] = []
    walk, net, distilled, info = run_compression(parent_net, calib, settings, thresholds=np.asarray(bundle.meta.thresholds),
                                                 progress=progress, log=log)
    return _finish(bundle, calib, settings, walk, net, distilled, info, log, report_data, speed,
                   settings.target_reduction, t0)


def compress_targets(
    bundle: Bundle,
    dataset: NIHDataset,
    targets: list[float],
    settings: CompressSettings | None = None,
    *,
    report_data: tuple[torch.Tensor, np.ndarray, str] | None = None,
    speed: bool = False,
    images: np.ndarray | None = None,
    progress: Progress | None = None,
) -> list[CompressResult]:
    """One compressed bundle per target reduction, sharing one planning pass (for trade-off curves).

    Each is a plain target pass (with the settings' FLOP target and distillation); tolerances are
    not consulted -- the tolerance search is :func:`compress_bundle` without a target.
    """
    settings = settings or CompressSettings()
    parent_net, calib = _prepare(bundle, dataset, settings, images)
    pl = prepare_planning(parent_net, calib, settings, progress, np.asarray(bundle.meta.thresholds))
    out = []
    for target in targets:
        t0 = time.perf_counter()
        walk, info = compress_to_target(pl, target, progress, settings.target_flop_reduction)
        net, distilled = finish_network(pl, walk)
        out.append(_finish(bundle, calib, settings.replace(target_reduction=target), walk, net, distilled, info, [],
                           report_data, speed, target, t0))
    return out
