"""The replayable history of a compression, and what reads it: replay and re-fitting to the parent.

A ``compress`` (or ``f_reopt``) entry in a bundle's history holds the calibration data's identity,
the sampling settings and, per consumer, the kept input channels and bottleneck (in the parent's
channel coordinates), the fit mode and the ridges. Re-running the deterministic re-fits with those
sets on the same images rebuilds the weights (:func:`replay_compression`); on new images it is the
``f_reopt`` intervention (:func:`refit_to_parent`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from engine.core.errors import BundleError, DataError
from model.bundle import Bundle
from model.compression.calibration import Calibration, prepare_calibration
from model.compression.distill import distill
from model.compression.modes import ReplayWalk
from model.compression.passes import check_problem_sizes, consumer_names
from model.compression.settings import CompressSettings, Progress
from model.compression.surgery import surgery
from model.data import NIHDataset
from model.nets.pruned import ARCH_NAME, PrunedDenseNet, as_pruned, to_json_config

__all__ = [
    "HISTORY_OP",
    "METHOD",
    "history_entry",
    "latest_plan",
    "settings_from_entry",
    "replay_compression",
    "refit_to_parent",
]

HISTORY_OP = "compress"
METHOD = "channel-subset least-squares reconstruction v1"


def history_entry(parent_hash: str, calib: Calibration, settings: CompressSettings,
                  consumers: list[dict[str, Any]], *, op: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The replayable record of one compression (or re-fit): data identity, sampling, per-consumer sets.

    ``parent_hash`` is the uncompressed model the network reproduces; ``consumers[i]`` holds the
    kept input channels (``keep``, in the parent's channel coordinates), the kept bottleneck
    (``mid``), the fit mode (``ls``/``exact``/``keep``) and the ridge(s) the re-fit used.
    """
    entry = {
        "op": op,
        "method": METHOD,
        "parent_hash": parent_hash,
        "calibration": {"manifest_hash": calib.manifest_hash, "split": calib.split, "images": calib.n_images,
                        "holdout_fraction": settings.holdout_fraction, "views": calib.views,
                        "holdout": len(calib.hold) > 0},
        "seed": settings.seed,
        "ridge": settings.ridge,
        "positions": settings.positions,
        "positions_3x3": settings.positions_3x3,
        "memory_mb": settings.memory_mb,
        "consumers": consumers,
    }
    if extra:
        entry.update(extra)
    return entry


def latest_plan(bundle: Bundle) -> dict[str, Any]:
    """The newest history entry that carries a replayable consumer plan (``compress`` or ``f_reopt``)."""
    for entry in reversed(bundle.meta.history):
        if isinstance(entry, dict) and entry.get("consumers") and entry.get("op") in (HISTORY_OP, "f_reopt"):
            return entry
    raise BundleError("bundle history has no compression entry to replay (expected an op 'compress' with consumers)")


def settings_from_entry(entry: dict[str, Any], **over: Any) -> CompressSettings:
    """The settings a history entry was made with (``over``: seed/views of a re-fit on new images)."""
    cal = entry.get("calibration", {})
    return CompressSettings(
        target_reduction=None, max_auroc_drop=None, max_logit_delta=None, max_flip_rate=None,
        holdout_fraction=float(cal.get("holdout_fraction", 0.2)), seed=int(over.get("seed", entry.get("seed", 0))),
        ridge=float(entry.get("ridge", 1e-3)), views=over.get("views", cal.get("views")),
        positions=int(entry.get("positions", 16384)), positions_3x3=int(entry.get("positions_3x3", 8192)),
        memory_mb=int(entry.get("memory_mb", 1024)),
    )


def _replay_walk(parent: Bundle, entry: dict[str, Any], calib: Calibration, settings: CompressSettings,
                 progress: Progress | None) -> PrunedDenseNet:
    """The parent re-fitted with the entry's per-consumer sets, after surgery."""
    parent_net, _ = as_pruned(parent.model, parent.meta.arch, parent.meta.arch_config)
    parent_net = copy.deepcopy(parent_net).eval()
    records = {r["name"]: r for r in entry["consumers"]}
    names = consumer_names(parent_net)
    if set(names) != set(records):
        extra = sorted(set(records) - set(names))[:3]
        missing = sorted(set(names) - set(records))[:3]
        raise BundleError(f"history does not match the parent network: consumers missing {missing}, unknown {extra}")
    walk = ReplayWalk(parent_net, calib, settings, records=records, progress=progress)
    check_problem_sizes(parent_net, calib, walk.samples)
    walk.run()
    net = surgery(walk.work)
    rec = entry.get("distill")
    if rec:  # the recorded schedule, up to the epoch that was kept
        net, _ = distill(net, parent_net, calib.fit, calib.hold, epochs=int(rec["epochs"]), lr=float(rec["lr"]),
                         seed=settings.seed, keep_epoch=int(rec["kept_epoch"]))
    return net


def replay_compression(parent: Bundle, compressed_meta_or_entry: Any, dataset: NIHDataset, *,
                       progress: Progress | None = None) -> Bundle:
    """Rebuild a compressed bundle from its parent and the calibration data named in its history.

    ``compressed_meta_or_entry`` is the compressed bundle (its newest ``compress`` entry is used)
    or that entry itself. The dataset must be the one recorded (same manifest hash).
    """
    entry = latest_plan(compressed_meta_or_entry) if isinstance(compressed_meta_or_entry, Bundle) else compressed_meta_or_entry
    if entry.get("parent_hash") and parent.content_hash() != entry["parent_hash"]:
        raise BundleError(f"parent bundle hash {parent.content_hash()[:12]}… does not match the history's "
                          f"parent_hash {entry['parent_hash'][:12]}…")
    cal = entry.get("calibration", {})
    manifest = dataset.manifest_hash()
    if cal.get("manifest_hash") and manifest != cal["manifest_hash"]:
        raise DataError(f"{dataset.root}: calibration manifest hash {manifest[:12]}… differs from the recorded "
                        f"{cal['manifest_hash'][:12]}… (split {cal.get('split')!r}); replay needs the same images")
    settings = settings_from_entry(entry)
    calib = prepare_calibration(parent, dataset, holdout_fraction=settings.holdout_fraction, seed=settings.seed,
                                views=settings.views, memory_mb=settings.memory_mb, holdout=cal.get("holdout", True))
    net = _replay_walk(parent, entry, calib, settings, progress)
    meta = parent.meta.model_copy(update={"arch": ARCH_NAME, "arch_config": to_json_config(net.config),
                                          "parent_hash": entry.get("parent_hash"),
                                          "history": list(parent.meta.history) + [entry]})
    return Bundle(net, meta)


def refit_to_parent(compressed: Bundle, parent: Bundle, dataset: NIHDataset, *, seed: int = 0,
                    views: int | None = None, images: np.ndarray | None = None,
                    progress: Progress | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Re-run the per-layer least-squares re-fits of ``compressed`` on new images so it again matches ``parent``.

    The kept channel sets (architecture) stay; only weights change. All of ``dataset`` is fitted.
    """
    if compressed.meta.arch != ARCH_NAME:
        raise BundleError(f"re-fitting needs a compressed bundle (arch '{ARCH_NAME}'), got arch {compressed.meta.arch!r}")
    entry = latest_plan(compressed)
    parent_hash = parent.content_hash()
    if entry.get("parent_hash") and entry["parent_hash"] != parent_hash:
        raise BundleError(f"the given parent (hash {parent_hash[:12]}…) is not the one this model was compressed "
                          f"from ({entry['parent_hash'][:12]}…)")
    settings = settings_from_entry(entry, seed=seed, views=views)
    calib = prepare_calibration(parent, dataset, seed=seed, views=views, memory_mb=settings.memory_mb,
                                images=images, holdout=False)
    net = _replay_walk(parent, entry, calib, settings, progress)
    if to_json_config(net.config) != compressed.meta.arch_config:
        raise BundleError("re-fitted network does not have the compressed bundle's architecture; its history "
                          "does not describe it")
    extra: dict[str, Any] = {"previous_hash": compressed.content_hash()}
    if entry.get("distill"):
        extra["distill"] = entry["distill"]
    new_entry = history_entry(parent_hash, calib, settings, [dict(c) for c in entry["consumers"]], op="f_reopt",
                              extra=extra)
    new_entry["calibration"]["holdout"] = False
    meta = compressed.meta.model_copy(update={"history": list(compressed.meta.history) + [new_entry],
                                              "parent_hash": parent_hash})
    return Bundle(net, meta), new_entry
