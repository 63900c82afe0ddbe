"""What a backtest runs: scenarios (model, labelled dataset, fault, seed), from flags or a YAML file.

A scenario is the unit a backtest judges: one model audited on one dataset after one fault (or
none: a clean control), under one seed that draws the audit/holdout split and the fault's fresh
randomness. Its :func:`scenario_key` is a content hash (model file, dataset manifest, fault, seed,
holdout share), so a killed backtest resumes by key and an edited scenario is run again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.core.errors import DataError
from engine.core.storage import canonical_json, sha256_bytes, sha256_file
from engine.core.validation import format_validation_error, parse_yaml
from model.data.faults import parse_fault

__all__ = ["CLEAN", "Scenario", "fault_kind", "load_scenarios", "scenario_key", "scenarios_from_flags"]

#: The fault name of a clean control (no fault injected).
CLEAN = "clean"


@dataclass(frozen=True)
class Scenario:
    """One (model, dataset, fault, seed); ``fault`` None is a clean control."""

    name: str
    model: Path
    data: Path
    split: str
    fault: str | None
    seed: int
    holdout_fraction: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"], d["data"] = str(self.model), str(self.data)
        return d


def fault_kind(fault: str | None) -> str:
    """The fault's family (``shortcut:Effusion`` -> ``shortcut``), ``clean`` for a control."""
    return CLEAN if fault is None else parse_fault(fault).name


def scenario_key(scenario: Scenario, manifest_hash: str) -> str:
    """Content hash of what decides the scenario's outcome (the name is a label, not part of it)."""
    ident = {
        "model_sha256": sha256_file(scenario.model),
        "data_manifest": manifest_hash,
        "split": scenario.split,
        "fault": scenario.fault,
        "seed": scenario.seed,
        "holdout_fraction": scenario.holdout_fraction,
    }
    return sha256_bytes(canonical_json(ident))[:16]


def _name(model_tag: str, fault: str | None, seed: int) -> str:
    return f"{model_tag}:{fault or CLEAN}:s{seed}"


def scenarios_from_flags(model: Path, data: Path, split: str, faults: Sequence[str], seeds: int, *,
                         shortcut_model: Path | None = None, holdout_fraction: float = 0.5,
                         first_seed: int = 0) -> list[Scenario]:
    """The shorthand: every fault (and a clean control per model) under seeds ``first_seed .. +seeds-1``.

    A ``shortcut:LABEL`` fault is audited on ``shortcut_model`` when given (the model that learned
    the shortcut), which then gets its own clean controls too.
    """
    for spec in faults:
        if spec != CLEAN:
            parse_fault(spec)  # a bad spec is refused before anything runs
    out: list[Scenario] = []
    models = {model}
    for seed in range(first_seed, first_seed + seeds):
        for spec in faults:
            fault = None if spec == CLEAN else spec
            m = shortcut_model if shortcut_model is not None and fault_kind(fault) == "shortcut" else model
            models.add(m)
            out.append(Scenario(_name(m.stem, fault, seed), m, data, split, fault, seed, holdout_fraction))
        for m in sorted(models, key=str):
            out.append(Scenario(_name(m.stem, None, seed), m, data, split, None, seed, holdout_fraction))
    return _unique(out)


def _unique(scenarios: Iterable[Scenario]) -> list[Scenario]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for s in scenarios:
        ident = (str(s.model), str(s.data), s.split, s.fault, s.seed, s.holdout_fraction)
        if ident not in seen:
            seen.add(ident)
            out.append(s)
    return out


class _ScenarioEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    model: str
    data: str
    split: str = "test"
    faults: list[str] = Field(min_length=1)
    seeds: int = Field(3, ge=1, le=1000)
    first_seed: int = Field(0, ge=0)
    holdout_fraction: float = Field(0.5, gt=0.0, lt=1.0)

    @field_validator("faults")
    @classmethod
    def _faults_parse(cls, value: list[str]) -> list[str]:
        for spec in value:
            if spec != CLEAN:
                parse_fault(spec)
        return value


class _ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    scenarios: list[_ScenarioEntry] = Field(min_length=1)


def load_scenarios(path: Path) -> list[Scenario]:
    """Scenarios from a YAML file: ``scenarios: [{model, data, faults, seeds, split?, name?, ...}]``.

    Paths are relative to the file. Each entry gets a clean control per seed beside its faults; a
    shortcut entry names the model that learned the shortcut as its ``model``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the scenarios file ({exc.strerror})") from None
    raw = parse_yaml(text, str(path), DataError)
    try:
        spec = _ScenarioFile.model_validate(raw)
    except ValidationError as exc:
        raise DataError(format_validation_error(exc, str(path), _ScenarioFile)) from None
    base = path.parent
    out: list[Scenario] = []
    for entry in spec.scenarios:
        model, data = (base / entry.model), (base / entry.data)
        for p, what in ((model, "model"), (data, "data")):
            if not p.exists():
                raise DataError(f"{path}: {what} {p} does not exist")
        found = scenarios_from_flags(model, data, entry.split, entry.faults, entry.seeds,
                                     holdout_fraction=entry.holdout_fraction, first_seed=entry.first_seed)
        if entry.name:
            found = [Scenario(f"{entry.name}:{s.fault or CLEAN}:s{s.seed}", s.model, s.data, s.split, s.fault,
                              s.seed, s.holdout_fraction) for s in found]
        out.extend(found)
    return _unique(out)
