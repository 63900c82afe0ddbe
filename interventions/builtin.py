"""Imports the built-in intervention modules so that their ``@register`` decorators run."""

from __future__ import annotations

import importlib

#: Built-in plugin modules; a module that is not there yet is skipped.
BUILTIN_MODULES = (
    "interventions.threshold",
    "interventions.zeroing",
    "interventions.partial_retrain",
    "interventions.f_reopt",
    "interventions.augmentation",
    "interventions.full_retrain",
)

for _name in BUILTIN_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # only a missing module itself is tolerated, not its imports
        if exc.name != _name:
            raise
