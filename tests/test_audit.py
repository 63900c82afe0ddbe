"""The audit store: hash chain, tamper detection that names the record, crash consistency, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli import main
from engine.audit import GENESIS_HASH, AuditStore, record_hash, to_jsonable
from engine.core.errors import AuditError
from model.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]


def _filled(path: Path, n: int = 6, run_id: str = "run-abc") -> Path:
    with AuditStore(path) as store:
        for i in range(1, n + 1):
            store.append(run_id, "facts", {"marker": f"marker-{i:06d}", "value": i / 3, "nested": {"i": i}})
    return path


def _sql(path: Path, *statements: str, params: tuple = ()) -> None:
    """Tamper directly with SQL (dropping the append-only triggers first, as an attacker would)."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS records_no_update")
    conn.execute("DROP TRIGGER IF EXISTS records_no_delete")
    for s in statements:
        conn.execute(s, params if "?" in s else ())
    conn.commit()
    conn.close()


def _problems(path: Path) -> list[str]:
    with AuditStore(path, create=False) as store:
        report = store.verify()
    assert not report.ok
    return [p for p in report.problems if "trigger" not in p]


def test_intact_chain_verifies_and_links(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    with AuditStore(path) as store:
        recs = store.records()
        report = store.verify()
        assert report.ok and report.n_records == 6 and report.problems == []
        assert report.head_seq == 6 and report.head_hash == recs[-1].record_hash
        assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
        assert recs[0].prev_hash == GENESIS_HASH
        for prev, rec in zip(recs, recs[1:]):
            assert rec.prev_hash == prev.record_hash
        for rec in recs:
            assert record_hash(rec.to_dict()) == rec.record_hash
            assert rec.time.endswith("+00:00") and rec.tool_version
        assert store.records("other") == []


def test_sql_update_of_a_payload_is_named(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    _sql(path, "UPDATE records SET payload = replace(payload, 'marker-000003', 'marker-999999') WHERE seq = 3")
    problems = _problems(path)
    assert problems == ["record 3 (run run-abc): hash mismatch — edited"]


def test_one_byte_edit_in_the_sqlite_file_is_named(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    raw = bytearray(path.read_bytes())
    where = raw.find(b"marker-000004")
    assert where > 0 and raw.count(b"marker-000004") == 1
    raw[where + len("marker-00000")] = ord("7")  # one byte: 4 -> 7
    path.write_bytes(bytes(raw))
    assert _problems(path) == ["record 4 (run run-abc): hash mismatch — edited"]
    # The CLI names it too, and exits 1.
    assert main(["audit", "verify", "--audit", str(path)]) == 1


def test_deleted_record_in_the_middle_is_named(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    _sql(path, "DELETE FROM records WHERE seq = 5")
    assert _problems(path) == ["record 5 missing — deleted (the chain jumps to record 6)"]


def test_deleted_tail_is_detected_through_the_head(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    _sql(path, "DELETE FROM records WHERE seq >= 5")
    problems = _problems(path)
    assert problems == ["records 5–6 missing — deleted from the end (the head says the chain ends at record 6)"]


def test_swapped_records_are_named_out_of_order(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    cols = "run_id, time, tool_version, kind, payload, prev_hash, record_hash"
    conn = sqlite3.connect(path)
    rows = {seq: conn.execute(f"SELECT {cols} FROM records WHERE seq = ?", (seq,)).fetchone() for seq in (2, 4)}
    conn.close()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    for target, source in ((2, 4), (4, 2)):
        conn = sqlite3.connect(path)
        conn.execute("DROP TRIGGER IF EXISTS records_no_update")
        conn.execute(f"UPDATE records SET {sets} WHERE seq = ?", (*rows[source], target))
        conn.commit()
        conn.close()
    problems = _problems(path)
    assert "record 2 out of order: it holds the content of record 4 (run run-abc) — reordered" in problems
    assert "record 4 out of order: it holds the content of record 2 (run run-abc) — reordered" in problems


def test_edit_and_rehash_breaks_the_next_link(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db")
    with AuditStore(path) as store:
        rec = store.records()[2].to_dict()
    rec["payload"] = {**rec["payload"], "value": 123.0}
    forged = record_hash(rec)
    from engine.core.storage import canonical_json

    _sql(path, "UPDATE records SET payload = ?, record_hash = ? WHERE seq = 3",
         params=(canonical_json(rec["payload"]).decode(), forged))
    problems = _problems(path)
    assert problems == ["record 4 (run run-abc): prev_hash does not match record 3's hash — record 3 was edited and "
                        "re-hashed, or the chain was rewritten"]


def test_triggers_refuse_edits_and_their_removal_is_reported(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db", n=2)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE records SET kind = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM records WHERE seq = 1")
    conn.close()
    _sql(path)  # drops the triggers, changes nothing else
    with AuditStore(path) as store:
        report = store.verify()
    assert not report.ok and all("trigger" in p for p in report.problems)


def test_append_refuses_a_store_whose_head_does_not_match(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db", n=3)
    _sql(path, "DELETE FROM records WHERE seq = 3")
    with AuditStore(path) as store, pytest.raises(AuditError, match="audit verify"):
        store.append("r", "facts", {})


def test_expect_head_detects_a_rewritten_chain(tmp_path: Path) -> None:
    path = _filled(tmp_path / "a.db", n=3)
    with AuditStore(path) as store:
        head = store.head()
        assert head is not None
        assert store.verify(expect_head=head[1]).ok
        assert not store.verify(expect_head="f" * 64).ok
    assert main(["audit", "verify", "--audit", str(path), "--expect-head", head[1]]) == 0


def test_payloads_are_json_safe(tmp_path: Path) -> None:
    import numpy as np

    assert to_jsonable({"a": float("nan"), "b": np.float32(1.5), "c": (1, 2), "d": {3, 1}, "e": np.arange(2)}) == {
        "a": None, "b": 1.5, "c": [1, 2], "d": [1, 3], "e": [0, 1]}
    with AuditStore(tmp_path / "a.db") as store:
        rec = store.append("r", "facts", {"x": float("inf")})
        assert rec.payload == {"x": None}
        with pytest.raises(TypeError, match="cannot store"):
            store.append("r", "facts", {"x": object()})
        assert store.verify().ok and store.verify().n_records == 1


def test_observations_pair_attempts_with_their_verification(tmp_path: Path) -> None:
    with AuditStore(tmp_path / "a.db") as store:
        for run in ("r1", "r1"):  # the same deterministic run id, run twice
            store.append(run, "run_started", {})
            store.append(run, "intervention_applied", {"fact_id": "f", "attempt": 1, "intervention": "zeroing",
                                                     "status": "ok", "wall_time_s": 0.5})
            store.append(run, "verification", {"fact_id": "f", "attempt": 1, "intervention": "zeroing", "passed": False})
            store.append(run, "intervention_applied", {"fact_id": "f", "attempt": 2, "intervention": "threshold",
                                                     "status": "ok", "wall_time_s": 0.1})
            store.append(run, "verification", {"fact_id": "f", "attempt": 2, "intervention": "threshold", "passed": True})
        store.append("r2", "run_started", {})
        store.append("r2", "intervention_applied", {"fact_id": "g", "attempt": 1, "intervention": "f_reopt",
                                                  "status": "error", "error": "boom"})
        obs = store.observations()
    assert obs == [
        {"intervention": "zeroing", "wall_time_s": 0.5, "outcome": "rejected"},
        {"intervention": "threshold", "wall_time_s": 0.1, "outcome": "accepted"},
    ] * 2 + [{"intervention": "f_reopt", "wall_time_s": None, "outcome": "error"}]


def test_cli_show_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _filled(tmp_path / "a.db", n=3, run_id="0123456789abcdef")
    with AuditStore(path) as store:
        store.append("fedcba9876543210", "run_finished", {"status": "ok", "outcome": "healthy", "exit_code": 0})
    assert main(["audit", "show", "0123", "--audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0123456789abcdef" in out and "fedcba" not in out
    out_file = tmp_path / "x.jsonl"
    assert main(["audit", "export", "--audit", str(path), "--out", str(out_file)]) == 0
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4]
    assert all(record_hash(r) == r["record_hash"] for r in lines)
    assert main(["audit", "show", "nope", "--audit", str(path)]) == 1
    assert main(["audit", "verify", "--audit", str(tmp_path / "missing.db")]) == 1
    assert not (tmp_path / "missing.db").exists()


_CRASH_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from engine.audit import AuditStore
    from model.bundle import new_bundle, save_bundle
    from model.nets import arch_config, build_model

    torch.manual_seed(0)
    cfg = arch_config("tiny")
    bundle = new_bundle(build_model("densenet", cfg), config=cfg, input_size=32)
    store = AuditStore(sys.argv[1])
    i = 0
    while True:
        store.append("crash-run", "intervention_applied", {"i": i, "blob": "x" * 4000})
        save_bundle(bundle.with_meta(notes={"i": i}), sys.argv[2])
        i += 1
        if i == 5:
            print("ready", flush=True)
""")


def test_kill_9_mid_write_leaves_a_valid_store_and_an_intact_model(tmp_path: Path) -> None:
    db, model = tmp_path / "audit.db", tmp_path / "model.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(_CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(model)], stdout=subprocess.PIPE, env=env,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", line
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with AuditStore(db) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.n_records >= 5
        last_i = store.records()[-1].payload["i"]
        store.append("after-crash", "run_started", {})  # the chain continues
        assert store.verify().ok
    loaded = load_bundle(model)
    assert loaded.meta.notes["i"] >= 4 and loaded.meta.notes["i"] in (last_i - 1, last_i)
