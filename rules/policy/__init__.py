"""The treatment policy: schema (:mod:`rules.policy.schema`) and monitor thresholds
(:mod:`rules.policy.monitors`).

``from rules.policy import Policy, load_policy`` is the public way in; modules inside this
package import each other by their full module path, never through this file.
"""

from rules.policy.monitors import MonitorConfig
from rules.policy.schema import *  # noqa: F403 - the schema's __all__ is this package's API
from rules.policy.schema import __all__ as _schema_all

__all__ = ["MonitorConfig", *_schema_all]
