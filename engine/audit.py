"""Tamper-evident, append-only audit trail (SQLite + a SHA-256 hash chain).

Why SQLite: one file, transactions that survive ``kill -9`` (WAL, ``synchronous=FULL``), and
readable by a regulator with stock tools. Why a hash chain: every record stores
``record_hash = sha256(prev_hash + canonical_json(record without record_hash))``, so editing,
deleting or reordering any record breaks the chain at a place :meth:`AuditStore.verify` names.

What is detected, and how:

* **edited** record: its stored hash no longer matches its content (named by seq and run id);
  a record edited *and* re-hashed breaks the next record's ``prev_hash`` link (or, for the last
  record, the head row below).
* **deleted** record: a gap in the sequence numbers plus a broken link.
* **reordered** records: a row whose content hashes correctly only under another sequence number.
* **tail truncation**: the ``audit_head`` table holds the last seq and hash and is updated in the
  same transaction as each append; deleting the last records without also rewriting the head is
  reported. Someone able to rewrite the whole chain *and* the head from scratch can forge a
  consistent store: publish the head hash (``audit verify`` prints it) somewhere else and pass it
  back with ``expect_head`` to close that gap.
* Triggers make the ``records`` table refuse ``UPDATE``/``DELETE`` (accidents fail loudly);
  their absence is reported too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import AuditError
from engine.core.storage import canonical_json, sha256_bytes

__all__ = [
    "GENESIS_HASH",
    "RECORD_KINDS",
    "AuditRecord",
    "VerifyReport",
    "AuditStore",
    "to_jsonable",
    "record_hash",
    "open_store",
    "resolve_run",
    "run_instances",
]

#: ``prev_hash`` of the first record.
GENESIS_HASH = "0" * 64
#: Record kinds the triage loop writes (others are accepted; this list documents the vocabulary).
RECORD_KINDS = (
    "run_started",
    "facts",
    "decision",
    "approval",
    "intervention_applied",
    "verification",
    "outcome",
    "run_finished",
)
_SCHEMA_VERSION = "1"
_HASHED_FIELDS = ("seq", "run_id", "time", "tool_version", "kind", "payload", "prev_hash")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    time TEXT NOT NULL,
    tool_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    record_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_run ON records(run_id);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    record_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only: DELETE refused'); END;
"""
_TRIGGERS = ("records_no_update", "records_no_delete")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from numpy scalars/arrays, pydantic models, dataclasses, paths, tuples and sets.

    Non-finite floats become ``None`` (canonical JSON forbids NaN; "not assessable" is not a number).
    Mapping keys become strings; sets are sorted so the bytes are stable.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):  # pydantic
        return to_jsonable(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "_asdict"):  # NamedTuple
        return to_jsonable(obj._asdict())
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=lambda v: canonical_json(v))
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in an audit record: {obj!r:.80}")


def record_hash(fields: Mapping[str, Any]) -> str:
    """``sha256(prev_hash + canonical_json(record without record_hash))`` (hex)."""
    body = {k: fields[k] for k in _HASHED_FIELDS}
    return sha256_bytes(str(fields["prev_hash"]).encode() + canonical_json(body))


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One stored record. ``payload`` is the decoded JSON object."""

    seq: int
    run_id: str
    time: str
    tool_version: str
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    record_hash: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`AuditStore.verify`: ``ok`` or a list of named problems."""

    ok: bool
    n_records: int
    problems: list[str]
    head_seq: int | None = None
    head_hash: str | None = None


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class AuditStore:
    """An append-only audit store in one SQLite file. Open one per process; it is cheap."""

    def __init__(self, path: str | Path, *, tool_version: str | None = None, create: bool = True) -> None:
        self.path = Path(path)
        if tool_version is None:
            from model.bundle import TOOL_VERSION

            tool_version = TOOL_VERSION
        self.tool_version = tool_version
        if self.path.exists() and not self.path.is_file():
            raise AuditError(f"{self.path}: audit store path exists and is not a file")
        if not create and not self.path.is_file():
            raise AuditError(f"{self.path}: audit store does not exist")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if not self._has_table("records"):
                if not create:
                    raise AuditError(f"{self.path}: not an audit store (no 'records' table)")
                with self._transaction():
                    for statement in _split_sql(_SCHEMA):
                        self._conn.execute(statement)
                    self._conn.execute(
                        "INSERT OR IGNORE INTO audit_meta(key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
                    )
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"{self.path}: not a readable audit store ({exc})") from exc

    # -- plumbing -----------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _has_table(self, name: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        return row is not None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- writing ------------------------------------------------------------------------------
    def append(self, run_id: str, kind: str, payload: Mapping[str, Any]) -> AuditRecord:
        """Append one record in its own durable transaction; returns it with its hash.

        Refuses to extend a chain whose head row does not match its last record (run
        ``audit verify`` to see why) rather than bury tampering under new records.
        """
        if not run_id or not isinstance(run_id, str):
            raise AuditError(f"The 'run_id' parameter must be a non-empty string. Got {run_id!r} instead.")
        if not kind or not isinstance(kind, str):
            raise AuditError(f"The 'kind' parameter must be a non-empty string. Got {kind!r} instead.")
        body = to_jsonable(dict(payload))
        payload_text = canonical_json(body).decode()
        try:
            with self._transaction():
                head = self._conn.execute("SELECT seq, record_hash FROM audit_head WHERE id = 1").fetchone()
                last = self._conn.execute(
                    "SELECT seq, record_hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                if head is None and last is not None or head is not None and (last is None or tuple(last) != tuple(head)):
                    raise AuditError(
                        f"{self.path}: the audit head {tuple(head) if head else None} does not match the last record "
                        f"{tuple(last) if last else None}; the store was altered — run `cli.py audit verify` "
                        "before appending")
                seq = 1 if head is None else int(head[0]) + 1
                prev = GENESIS_HASH if head is None else str(head[1])
                fields = dict(seq=seq, run_id=run_id, time=_utc_now(), tool_version=self.tool_version, kind=kind,
                              payload=body, prev_hash=prev)
                digest = record_hash(fields)
                self._conn.execute(
                    "INSERT INTO records(seq, run_id, time, tool_version, kind, payload, prev_hash, record_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, run_id, fields["time"], self.tool_version, kind, payload_text, prev, digest),
                )
                self._conn.execute(
                    "INSERT INTO audit_head(id, seq, record_hash) VALUES (1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, record_hash = excluded.record_hash",
                    (seq, digest),
                )
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"{self.path}: cannot append a {kind!r} record ({exc})") from exc
        return AuditRecord(seq, run_id, fields["time"], self.tool_version, kind, body, prev, digest)

    # -- reading ------------------------------------------------------------------------------
    def _rows(self, run_id: str | None = None) -> list[tuple]:
        sql = "SELECT seq, run_id, time, tool_version, kind, payload, prev_hash, record_hash FROM records"
        try:
            if run_id is None:
                return self._conn.execute(sql + " ORDER BY seq").fetchall()
            return self._conn.execute(sql + " WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"{self.path}: cannot read the audit records ({exc})") from exc

    def records(self, run_id: str | None = None) -> list[AuditRecord]:
        """Records in sequence order (all, or one run's). Undecodable payloads raise AuditError."""
        out = []
        for row in self._rows(run_id):
            try:
                payload = json.loads(row[5])
            except (json.JSONDecodeError, TypeError) as exc:
                raise AuditError(f"{self.path}: record {row[0]} (run {row[1]}) has an unreadable payload ({exc}); "
                                 "run `cli.py audit verify`") from exc
            out.append(AuditRecord(int(row[0]), row[1], row[2], row[3], row[4], payload, row[6], row[7]))
        return out

    def run_ids(self) -> list[str]:
        """Run ids in order of first appearance."""
        rows = self._conn.execute("SELECT run_id, MIN(seq) AS first FROM records GROUP BY run_id ORDER BY first")
        return [r[0] for r in rows.fetchall()]

    def head(self) -> tuple[int, str] | None:
        row = self._conn.execute("SELECT seq, record_hash FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def observations(self) -> list[dict[str, Any]]:
        """Empirical cost data for ``policy revise``: one row per attempted intervention.

        ``{intervention, wall_time_s, outcome}`` where outcome is ``accepted``, ``rejected`` or
        ``error``, from the ``intervention_applied`` and ``verification`` records of every run.
        """
        attempts: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        order: list[tuple[str, int, str, int]] = []
        instance: dict[str, int] = {}  # the same deterministic run id may be run more than once
        for rec in self.records():
            p = rec.payload
            if rec.kind == "run_started":
                instance[rec.run_id] = instance.get(rec.run_id, 0) + 1
                continue
            if rec.kind not in ("intervention_applied", "verification") or "intervention" not in p:
                continue
            key = (rec.run_id, instance.get(rec.run_id, 0), str(p.get("fact_id")), int(p.get("attempt", 0)))
            if rec.kind == "intervention_applied":
                if key not in attempts:
                    order.append(key)
                attempts[key] = {
                    "intervention": p["intervention"],
                    "wall_time_s": p.get("wall_time_s"),
                    "outcome": "error" if p.get("status") == "error" else "unverified",
                }
            elif key in attempts and attempts[key]["outcome"] == "unverified":
                attempts[key]["outcome"] = "accepted" if p.get("passed") else "rejected"
        return [attempts[k] for k in order]

    # -- verification -------------------------------------------------------------------------
    def verify(self, *, expect_head: str | None = None) -> VerifyReport:
        """Walk the chain; every problem names the record (seq and run id) and what is wrong."""
        problems: list[str] = []
        try:
            rows = self._rows()
            head = self._conn.execute("SELECT seq, record_hash FROM audit_head WHERE id = 1").fetchone()
            triggers = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        except (sqlite3.DatabaseError, AuditError) as exc:
            return VerifyReport(False, 0, [f"{self.path}: store unreadable ({exc})"])
        for name in _TRIGGERS:
            if name not in triggers:
                problems.append(f"append-only trigger {name!r} is missing — the table was opened for edits")

        decoded: list[dict[str, Any] | None] = []
        for row in rows:
            fields = dict(zip(("seq", "run_id", "time", "tool_version", "kind", "payload", "prev_hash", "record_hash"), row))
            try:
                fields["payload"] = json.loads(fields["payload"])
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                fields["payload"] = None
            decoded.append(fields)

        seqs = [int(f["seq"]) for f in decoded]
        own_hash_ok: list[bool] = []
        for f in decoded:
            own_hash_ok.append(f["payload"] is not None and _hash_matches(f, int(f["seq"])))

        prev_hash = GENESIS_HASH
        expected_seq = 1
        for i, f in enumerate(decoded):
            seq = int(f["seq"])
            who = f"record {seq} (run {str(f['run_id'])[:16]})"
            if seq > expected_seq:
                missing = f"records {expected_seq}–{seq - 1}" if seq - expected_seq > 1 else f"record {expected_seq}"
                problems.append(f"{missing} missing — deleted (the chain jumps to record {seq})")
            if f["payload"] is None:
                problems.append(f"{who}: payload is not valid JSON — edited")
            elif not own_hash_ok[i]:
                moved_from = _other_seq_matching(f, seqs, seq)
                if moved_from is not None:
                    problems.append(f"record {seq} out of order: it holds the content of record {moved_from} "
                                    f"(run {str(f['run_id'])[:16]}) — reordered")
                else:
                    problems.append(f"{who}: hash mismatch — edited")
            elif f["prev_hash"] != prev_hash and seq == expected_seq:
                problems.append(f"{who}: prev_hash does not match record {seq - 1}'s hash — record {seq - 1} was "
                                "edited and re-hashed, or the chain was rewritten")
            prev_hash = str(f["record_hash"])
            expected_seq = seq + 1

        n = len(decoded)
        head_seq = head_hash = None
        if head is None:
            if n:
                problems.append(f"audit head row is missing although {n} record(s) exist — head deleted")
        else:
            head_seq, head_hash = int(head[0]), str(head[1])
            last_seq = seqs[-1] if seqs else 0
            if head_seq > last_seq:
                gone = f"records {last_seq + 1}–{head_seq}" if head_seq - last_seq > 1 else f"record {head_seq}"
                problems.append(f"{gone} missing — deleted from the end (the head says the chain ends at record "
                                f"{head_seq})")
            elif head_seq < last_seq:
                problems.append(f"records after {head_seq} are not covered by the audit head (it ends at record "
                                f"{head_seq}, the table at {last_seq}) — appended outside the store or head rewound")
            elif decoded and head_hash != decoded[-1]["record_hash"]:
                problems.append(f"record {last_seq} (run {str(decoded[-1]['run_id'])[:16]}): hash differs from the "
                                "audit head — edited and re-hashed")
        if expect_head is not None and head_hash != expect_head:
            problems.append(f"audit head hash is {head_hash}, expected {expect_head} — the chain was rewritten or "
                            "truncated since that hash was published")
        return VerifyReport(not problems, n, problems, head_seq, head_hash)

    def export_jsonl(self, path: str | Path) -> Path:
        """Write every record (with its hashes) as one canonical JSON object per line, atomically."""
        from engine.core.storage import atomic_write_bytes

        lines = [canonical_json(rec.to_dict()) for rec in self.records()]
        return atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))


def run_instances(records: Sequence[Any]) -> list[list[Any]]:
    """One run id's records split at each ``run_started`` (a deterministic run id names every repeat
    of the same run); records before the first ``run_started`` form an instance of their own."""
    out: list[list[Any]] = []
    for rec in records:
        kind = rec["kind"] if isinstance(rec, Mapping) else rec.kind
        if kind == "run_started" or not out:
            out.append([])
        out[-1].append(rec)
    return out


def open_store(path: Path) -> AuditStore:
    """Open an existing store; refuses to create one (a typo must not look like an empty, valid trail)."""
    if not path.is_file():
        raise AuditError(f"{path}: audit store does not exist")
    return AuditStore(path, create=False)


def resolve_run(store: AuditStore, run: str) -> str:
    """A run id from an id, a unique id prefix, or a run folder holding decision.json."""
    candidate = Path(run)
    if (candidate / "decision.json").is_file():
        try:
            return str(json.loads((candidate / "decision.json").read_text())["run_id"])
        except (json.JSONDecodeError, KeyError) as exc:
            raise AuditError(f"{candidate / 'decision.json'}: no run_id in it ({exc})") from exc
    ids = store.run_ids()
    if run in ids:
        return run
    matches = [r for r in ids if r.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AuditError(f"{store.path}: no run {run!r}; known runs: {', '.join(ids[-10:]) or 'none'}")
    raise AuditError(f"{store.path}: run prefix {run!r} is ambiguous: {', '.join(matches)}")


def _hash_matches(fields: Mapping[str, Any], seq: int) -> bool:
    try:
        return record_hash({**fields, "seq": seq}) == fields["record_hash"]
    except (TypeError, ValueError):
        return False


def _other_seq_matching(fields: Mapping[str, Any], seqs: list[int], own: int) -> int | None:
    """The sequence number under which this row's content hashes correctly, if not its own."""
    for seq in seqs:
        if seq != own and _hash_matches(fields, seq):
            return seq
    return None


def _split_sql(script: str) -> list[str]:
    """Statements of the schema script (triggers contain ';' inside BEGIN ... END)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and (not joined.upper().startswith("CREATE TRIGGER") or joined.upper().endswith("END;")):
            out.append(joined)
            current = []
    return out
