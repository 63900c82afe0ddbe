"""Reading a policy: from a mapping, YAML text or a file, into a validated :class:`~rules.policy.schema.Policy`.

Every failure is a :class:`~engine.core.errors.PolicyError` whose message names the source and the
key path (``policies/x.yaml: ==> At key: costs ==> At key: zeroing: ...``); YAML with duplicate keys
is refused (``engine.core.validation.parse_yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.errors import PolicyError
from engine.core.validation import format_validation_error, parse_yaml
from rules.policy.schema import Policy

__all__ = ["policy_from_dict", "parse_policy", "load_policy"]


def policy_from_dict(data: Any, source: str = "<policy>") -> Policy:
    """Validate a mapping (as read from YAML) into a :class:`Policy`; errors name ``source`` and the key path."""
    if not isinstance(data, Mapping):
        what = "an empty document" if data is None else f"a {type(data).__name__}"
        raise PolicyError(f"{source}: expected a mapping at the top level (name, costs, treatments ...), got {what}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise PolicyError(f"{source}: top-level keys must be strings, got {bad_keys[0]!r}")
    try:
        return Policy.model_validate(dict(data))
    except ValidationError as exc:
        raise PolicyError(format_validation_error(exc, source, Policy)) from None


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse YAML text into a validated :class:`Policy`."""
    return policy_from_dict(parse_yaml(text, source), source)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file (``yaml.safe_load`` semantics, duplicate keys refused)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{source}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{source}: cannot read the policy file ({exc})") from None
    policy = parse_policy(text, source)
    policy._source_path = path
    return policy
