"""Reported false positives: a reader's "image X is not L" as a ``reported_fp`` issue fact.

What a site actually produces is the single report, not a cluster: ``triage --reports FILE.csv``
(columns ``image,label,reporter,note``) and ``correct --image NAME --label L`` turn reports into
facts, one per label (a correction of that label's row must bring all of its reported images below
the threshold together). The reporter and the note travel in the fact's evidence, so they land in the
audit record and the reports.

Not a policy monitor: it needs the reports as input. :class:`ReportedMonitor` has the monitors'
call signature (``engine.triage.verify.MonitorFn``) and re-checks the reports under any model: a
report is an issue while its image is still predicted positive for its label. Its images' rows come
from the data it is given when they are there, else from the audited set's features (valid while only
the classifier changed: every treatment of ``reported_fp`` is classifier-level), so the verify split
judges the reported images wherever the fit/verify split put them.

The fact measures ``n_channels_needed``: the fewest channels of the label's row whose mean ablation
against the label's true positives in the data (``w_c * (f_c - mean over TPs of f_c)``, largest first,
exact for one image) brings every reported image below the threshold, ignoring the true positives;
the rules read it against ``conditions.zeroing.max_channels`` as for an FP cluster, so zeroing is not
proposed where even the unconstrained cap cannot succeed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.errors import DataError, UsageError
from engine.core.facts import IssueFact
from interventions.attribution import classifier_layer, head_logits, truth_index
from model.bundle import Bundle
from model.data import NIHDataset
from model.features import FeatureSet
from model.labels import CHEXNET_LABELS
from model.metrics import auroc, logit, sigmoid

__all__ = ["NAME", "COLUMNS", "Report", "ReportedMonitor", "read_reports", "reports_from_args", "with_reports"]

NAME = "reported_fp"
COLUMNS = ("image", "label", "reporter", "note")


@dataclass(frozen=True)
class Report:
    """One reader's report: ``image`` is not ``label``. ``row`` is the CSV line (0: the command line)."""

    image: str
    label: str
    reporter: str
    note: str = ""
    row: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "label": self.label, "reporter": self.reporter, "note": self.note,
                "row": self.row}


def _check(report: Report, dataset: NIHDataset, labels: Sequence[str], where: str) -> None:
    """A report's image must be audited and labelled negative, its label an output with ground truth."""
    if report.label not in labels or report.label not in CHEXNET_LABELS:
        raise DataError(f"{where}: unknown label {report.label!r} (expected one of: {', '.join(labels)})")
    index = {n: i for i, n in enumerate(dataset.image_names)}
    if report.image not in index:
        raise DataError(f"{where}: image {report.image!r} is not in the audited data ({dataset.root}, split "
                        f"{dataset.split}, {len(dataset)} images)")
    if dataset.labels[index[report.image], truth_index(report.label)]:
        raise DataError(f"{where}: image {report.image!r} is labelled {report.label} in the data; a reported false "
                        "positive must be a negative there (correct the label first)")


def read_reports(path: Path, dataset: NIHDataset, labels: Sequence[str]) -> list[Report]:
    """The reports of ``path``; a missing column, an unknown image or label, or a duplicate is a DataError
    naming the file and the row (row 1 is the header)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the reports file ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: row 1: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})")
    out: list[Report] = []
    seen: dict[tuple[str, str], int] = {}
    for i, rec in enumerate(reader, start=2):
        values = {c: (rec.get(c) or "").strip() for c in COLUMNS}
        where = f"{path}: row {i}"
        for c in ("image", "label", "reporter"):
            if not values[c]:
                raise DataError(f"{where}: empty {c}")
        report = Report(values["image"], values["label"], values["reporter"], values["note"], i)
        _check(report, dataset, labels, where)
        key = (report.image, report.label)
        if key in seen:
            raise DataError(f"{where}: duplicate report of {report.image} / {report.label} (first in row {seen[key]})")
        seen[key] = i
        out.append(report)
    if not out:
        raise DataError(f"{path}: no reports (only a header)")
    return out


def reports_from_args(images: Sequence[str], label: str, dataset: NIHDataset, labels: Sequence[str],
                      reporter: str, note: str = "") -> list[Report]:
    """The reports of ``correct --image NAME ... --label L`` (a bad one is a usage error naming it)."""
    out = []
    for image in dict.fromkeys(images):
        report = Report(image, label, reporter, note, 0)
        try:
            _check(report, dataset, labels, f"--image {image} --label {label}")
        except DataError as exc:
            raise UsageError(str(exc)) from None
        out.append(report)
    return out


def _channels_needed(w: np.ndarray, b: float, feats: np.ndarray, baseline: np.ndarray, tau: float) -> int | None:
    """Fewest mean-ablated channels (largest attribution first) that bring every row below ``tau``."""
    logits = feats.astype(np.float64) @ w + b
    attribution = (feats.astype(np.float64) - baseline) * w
    order = np.argsort(-attribution.sum(axis=0), kind="stable")
    cum = logits[:, None] - np.cumsum(attribution[:, order], axis=1)
    below = np.flatnonzero((cum < tau).all(axis=0))
    return int(below[0]) + 1 if len(below) else None


class ReportedMonitor:
    """Facts of the reports still predicted positive under a model (the monitors' call signature)."""

    name = NAME

    def __init__(self, reports: Sequence[Report], bundle: Bundle, data: FeatureSet) -> None:
        self.reports = list(reports)
        index = {n: i for i, n in enumerate(data.image_names)}
        missing = [r.image for r in self.reports if r.image not in index]
        if missing:
            raise DataError(f"reported image {missing[0]!r} has no features (unreadable, skipped?)")
        names = list(dict.fromkeys(r.image for r in self.reports))
        self._features = data.subset(np.array([index[n] for n in names]))
        self._backbone = {k: v.clone() for k, v in bundle.model.state_dict().items() if not k.startswith("classifier.")}

    def _same_backbone(self, bundle: Bundle) -> bool:
        state = {k: v for k, v in bundle.model.state_dict().items() if not k.startswith("classifier.")}
        return set(state) == set(self._backbone) and all(torch.equal(state[k], v) for k, v in self._backbone.items())

    def _rows(self, bundle: Bundle, data: FeatureSet, images: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(features, logits) of ``images`` under ``bundle``: from ``data`` when it has them all, else stored."""
        index = {n: i for i, n in enumerate(data.image_names)}
        if all(n in index for n in images):
            rows = np.array([index[n] for n in images])
            return data.features[rows], data.logits[rows]
        if not self._same_backbone(bundle):
            return None
        stored = {n: i for i, n in enumerate(self._features.image_names)}
        feats = self._features.features[np.array([stored[n] for n in images])]
        return feats, head_logits(bundle, feats)

    def __call__(self, bundle: Bundle, data: FeatureSet, parent: Bundle | None = None,
                 parent_data: FeatureSet | None = None, *, only: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None) -> list[IssueFact]:
        if only is not None and NAME not in only:
            return []
        by_label: dict[str, list[Report]] = {}
        for r in self.reports:
            if labels is None or r.label in labels:
                by_label.setdefault(r.label, []).append(r)
        facts = []
        for label, reports in sorted(by_label.items()):
            fact = self._fact(bundle, data, label, reports)
            if fact is not None:
                facts.append(fact)
        return facts

    def _fact(self, bundle: Bundle, data: FeatureSet, label: str, reports: list[Report]) -> IssueFact | None:
        images = [r.image for r in reports]
        rows = self._rows(bundle, data, images)
        k = bundle.labels.index(label)
        thr = float(bundle.meta.thresholds[k])
        if rows is None:
            return IssueFact(kind="cannot_assess", monitor=NAME, label=label, severity="info",
                             message=f"reported image(s) of {label} cannot be re-scored: the backbone changed and "
                                     "they are not in this data", evidence={"skipped": [NAME]})
        feats, logits = rows
        probs = sigmoid(logits[:, k].astype(np.float64))
        positive = probs >= thr
        if not positive.any():
            return None
        head = classifier_layer(bundle)
        w = head.weight.detach().cpu().to(torch.float64)[k].numpy()
        b = float(head.bias.detach().cpu()[k]) if head.bias is not None else 0.0
        y = data.labels[:, truth_index(label)].astype(bool)
        tp = y & (sigmoid(data.logits[:, k].astype(np.float64)) >= thr)
        baseline = data.features[tp].astype(np.float64).mean(axis=0) if tp.any() else np.zeros(len(w))
        needed = _channels_needed(w, b, feats[positive], baseline, logit(thr))
        who = sorted({r.reporter for r in reports})
        measured: dict[str, Any] = {"n_reported": len(reports), "n_still_positive": int(positive.sum()),
                                    "max_prob": float(probs.max()), "threshold": thr}
        if needed is not None:
            measured["n_channels_needed"] = needed
        reference: dict[str, Any] = {"threshold": thr}
        auc = auroc(y.astype(int), data.logits[:, k])
        ref_auc = (bundle.meta.reference_metrics.get(label) or {}).get("auroc")
        if np.isfinite(auc) and isinstance(ref_auc, (int, float)):  # the threshold rule reads the ranking
            measured["auroc"], reference["auroc"] = float(auc), float(ref_auc)
        evidence = {"reports": [{**r.to_json(), "prob": float(p)} for r, p in zip(reports, probs, strict=True)],
                    "member_ids": [n for n, pos in zip(images, positive, strict=True) if pos],
                    "baseline": f"mean over {int(tp.sum())} true positives of {label} in the data"}
        return IssueFact(kind="reported_fp", monitor=NAME, label=label, severity="high",
                         message=(f"{int(positive.sum())} of {len(reports)} image(s) reported as not {label} by "
                                  f"{', '.join(who)} still predicted {label} (max probability {probs.max():.3f} >= "
                                  f"threshold {thr:.3f})"),
                         measured=measured, reference=reference, threshold={}, evidence=evidence)


def with_reports(base: Any, reported: ReportedMonitor, *, policy_monitors: bool = True) -> Any:
    """A monitor function: ``base``'s facts (unless ``policy_monitors`` is false) plus the reports'."""

    def monitor(bundle: Bundle, data: FeatureSet, parent: Bundle | None = None,
                parent_data: FeatureSet | None = None, *, only: Sequence[str] | None = None,
                labels: Sequence[str] | None = None) -> list[IssueFact]:
        facts: list[IssueFact] = []
        rest = None if only is None else [n for n in only if n != NAME]
        if policy_monitors and (rest is None or rest):
            facts += base(bundle, data, parent, parent_data, only=rest, labels=labels)
        return facts + reported(bundle, data, only=only, labels=labels)

    return monitor
