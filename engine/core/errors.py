"""One family of user-facing errors, and the exit codes the CLI maps them to.

Library code raises a subclass of :class:`TriageError` for every *expected* failure (bad input
file, malformed policy, tampered audit record ...). The CLI prints its message without a
traceback and exits with :data:`EXIT_ERROR`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "TriageError",
    "DataError",
    "BundleError",
    "PolicyError",
    "AuditError",
    "InterventionError",
    "UsageError",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_NEEDS_APPROVAL",
    "EXIT_UNTREATED",
]

#: Healthy, or treated and verified.
EXIT_OK = 0
#: An expected error (bad input, failed check); the message says what and where.
EXIT_ERROR = 1
#: Wrong command-line usage (argparse's convention).
EXIT_USAGE = 2
#: Issues remain whose treatment needs a human's ``--approve`` (scheduled audits alert on it).
EXIT_NEEDS_APPROVAL = 3
#: Issues remain untreated: every candidate failed verification, none applies, or the budget ran out.
EXIT_UNTREATED = 4
#: Stopped by SIGTERM (128 + 15, as a shell reports it); the run is recorded as interrupted.
EXIT_TERMINATED = 143


class TriageError(Exception):
    """Base class of every expected, user-facing failure."""


class DataError(TriageError):
    """A dataset file, row or image is missing, malformed or unsafe."""


class BundleError(TriageError):
    """A model bundle or checkpoint cannot be read or does not match the architecture."""


class PolicyError(TriageError):
    """A policy file is malformed; the message names the file and the key path."""


class AuditError(TriageError):
    """The audit store is unreadable or its hash chain does not verify."""


class InterventionError(TriageError):
    """An intervention cannot be applied to this model or data."""


class RulesEngineUnavailable(TriageError):
    """The durable-rules engine cannot load on this interpreter; the message gives the rebuild command."""


class StorageError(TriageError):
    """A file could not be written (disk full, read-only folder); the previous file is intact."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. systemd's stop timeout) turned into an interruption, so runs close their records."""


class UsageError(TriageError):
    """A command-line value that cannot work (an ``--out`` folder that is a file ...): exit status 2.

    For checks argparse cannot make because they look at the file system; raised before any work.
    """
