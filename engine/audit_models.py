"""Do the model files the audit names still hold the models it recorded?

A run records the hash of the model it audited (with its path, ``run_started``) and of the treated
bundle it wrote (``run_finished``). A bundle edited in place afterwards would still be served under
its old name while the audit vouches for other weights; ``audit verify`` re-hashes every file the
store names (the latest record per path: a later run may legitimately rewrite a run folder's
model) and names each mismatch. A file that no longer exists is noted, not failed: deleting a
model is not passing off another one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.audit import AuditStore
from engine.core.errors import BundleError
from engine.core.storage import sha256_file
from model.bundle import load_bundle

__all__ = ["ModelFileReport", "check_model_files"]


@dataclass
class ModelFileReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _recorded(store: AuditStore) -> dict[str, tuple[str, str, str]]:
    """path -> (hash, run id, what) from the latest record naming it."""
    latest: dict[str, tuple[str, str, str]] = {}
    for rec in store.records():
        p = rec.payload
        if rec.kind == "run_started":
            pairs = [(p.get("model_path"), p.get("model_hash"), "audited model"),
                     (p.get("parent_path"), p.get("parent_hash"), "parent model")]
        elif rec.kind == "run_finished" and p.get("status") == "ok":
            pairs = [(p.get("model_path"), p.get("model_hash_after"), "treated model")]
        else:
            continue
        for path, digest, what in pairs:
            if path and digest:
                latest[str(path)] = (str(digest), rec.run_id, what)
    return latest


def _content_hash(path: Path) -> str | None:
    """The bundle's content hash when its bytes differ from ours (another writer, same content)."""
    try:
        return load_bundle(path).content_hash()
    except BundleError:
        return None


def check_model_files(store: AuditStore) -> ModelFileReport:
    report = ModelFileReport()
    for path_text, (digest, run_id, what) in sorted(_recorded(store).items()):
        path = Path(path_text)
        if not path.is_file():
            report.notes.append(f"{what} {path} of run {run_id} no longer exists")
            continue
        report.checked += 1
        now = sha256_file(path)
        if now != digest and _content_hash(path) != digest:
            report.problems.append(f"{what} {path} changed since run {run_id} recorded it (recorded hash "
                                   f"{digest[:16]}…, the file now {now[:16]}…): edited in place?")
    return report
