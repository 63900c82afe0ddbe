"""Faults a scheduled audit meets: SIGTERM mid-triage, a full disk, an unwritable cache.

Each leaves the store valid and no half-written file, and says what happened in one line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pattern_bundle, write_pattern_dataset

from engine.audit import AuditStore
from engine.core import storage
from engine.core.errors import StorageError
from model.bundle import save_bundle
from model.data import load_nih_dataset
from model.features import extract_features

REPO = Path(__file__).resolve().parents[1]


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ops")
    data = write_pattern_dataset(tmp / "ds", n=120)
    bundle = pattern_bundle(load_nih_dataset(data))
    save_bundle(bundle, tmp / "m.safetensors")
    return tmp, data, bundle


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(world, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, bundle = world
    target = tmp_path / "model.safetensors"
    save_bundle(bundle, target)
    before = target.read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(StorageError, match=r"model\.safetensors: cannot write \(No space left on device\); nothing "
                                           r"was written and the previous file, if any, is intact"):
        save_bundle(bundle.with_meta(notes={"edited": True}), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_a_command_on_a_full_disk_exits_1_with_the_path(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main

    tmp, data, _ = world
    _disk_full(monkeypatch)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tmp / "m.safetensors"), "--data", str(data), "--split", "all",
                 "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "eval.json: cannot write" in err and "Traceback" not in err and not out.exists()


def test_an_unwritable_cache_runs_without_it_and_says_so(world, monkeypatch: pytest.MonkeyPatch) -> None:
    _, data, bundle = world
    _disk_full(monkeypatch)
    with pytest.warns(RuntimeWarning, match="feature cache not written, running without it"):
        fs = extract_features(bundle, load_nih_dataset(data))
    assert len(fs) == 120


_SLOW_TRIAGE = """
import sys, time
sys.path.insert(0, {repo!r})
import engine.triage.run as run_module
real = run_module.default_monitor_fn
def slow(policy):
    monitor = real(policy)
    def wrapped(*args, **kwargs):
        print("monitoring", flush=True)
        time.sleep(60)
        return monitor(*args, **kwargs)
    return wrapped
run_module.default_monitor_fn = slow
from engine.commands.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_triage_exits_promptly_and_records_the_run_as_interrupted(world, tmp_path: Path) -> None:
    tmp, data, _ = world
    script = tmp_path / "slow_triage.py"
    script.write_text(_SLOW_TRIAGE.format(repo=str(REPO)))
    out, db = tmp_path / "run", tmp_path / "audit.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), "triage", "--model", str(tmp / "m.safetensors"), "--data",
                             str(data), "--split", "all", "--policy", str(REPO / "policies" / "default.yaml"),
                             "--out", str(out), "--audit", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the run is inside the triage (its run_started is recorded)
            if b"monitoring" in line:
                break
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and time.perf_counter() - t < 10
    assert b"SIGTERM received" in err and b"Traceback" not in err
    with AuditStore(db) as store:
        assert store.verify().ok
        last = store.records()[-1]
    assert last.kind == "run_finished" and last.payload["status"] == "interrupted"
    assert not (out / "decision.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_store_disk_is_an_audit_error_and_the_chain_stays_valid(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.core.errors import AuditError

    db = tmp_path / "audit.db"
    with AuditStore(db) as store:
        store.append("r1", "run_started", {"i": 1})
        real = store._conn

        class Full:
            def __getattr__(self, name):
                return getattr(real, name)

            def execute(self, sql, *args):
                if sql.startswith("INSERT INTO records"):
                    raise sqlite3.OperationalError("database or disk is full")
                return real.execute(sql, *args)

        monkeypatch.setattr(store, "_conn", Full())
        with pytest.raises(AuditError, match="audit.db: cannot append a 'run_finished' record"):
            store.append("r1", "run_finished", {"i": 2})
        monkeypatch.setattr(store, "_conn", real)
        assert store.verify().ok and len(store.records()) == 1


_APPENDER = """
import sys
sys.path.insert(0, {repo!r})
from engine.audit import AuditStore
with AuditStore(sys.argv[1]) as store:
    for i in range(20):
        store.append("run-" + sys.argv[2], "step", {{"i": i}})
"""


def test_four_runs_appending_to_one_store_at_once_keep_it_valid(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    AuditStore(db).close()
    script = tmp_path / "appender.py"
    script.write_text(_APPENDER.format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(db), str(k)]) for k in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with AuditStore(db) as store:
        report = store.verify()
        assert report.ok, report.problems
        records = store.records()
    assert len(records) == 80 and {r.run_id for r in records} == {f"run-{k}" for k in range(4)}


def test_the_feature_cache_follows_the_data_and_never_serves_an_altered_entry(tmp_path: Path, world) -> None:
    import numpy as np
    from PIL import Image

    from model.features import cache_dir

    _, _, bundle = world
    data = write_pattern_dataset(tmp_path / "ds", n=40)
    first = extract_features(bundle, load_nih_dataset(data))
    # an image replaced in place (same name): other pixels, so other features
    name = first.image_names[0]
    img = tmp_path / "ds" / "images" / name
    Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(img)
    os.utime(img, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = extract_features(bundle, load_nih_dataset(data))
    assert not np.array_equal(second.features[0], first.features[0])
    np.testing.assert_array_equal(second.features[1:], first.features[1:])
    # a CSV row edited (a label changed): another manifest, so the labels served are the new ones
    csv = tmp_path / "ds" / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = "Hernia"
    csv.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    third = extract_features(bundle, load_nih_dataset(data))
    assert third.manifest_hash != second.manifest_hash and third.labels[0].sum() == 1
    # a cache entry altered on disk (one byte of its tensor data) is detected and recomputed
    entries = sorted((cache_dir() / "features").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    newest = entries[-1]
    raw = bytearray(newest.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + header_len])["features"]["data_offsets"]
    raw[8 + header_len + start + 5] ^= 0x40  # a bit of one feature value: still a readable file
    newest.write_bytes(bytes(raw))
    fourth = extract_features(bundle, load_nih_dataset(data))
    np.testing.assert_array_equal(fourth.features, third.features)
    np.testing.assert_array_equal(fourth.logits, third.logits)


def test_a_model_edited_in_place_after_its_audit_is_named_by_audit_verify(world, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main

    _, data, bundle = world
    model = tmp_path / "deployed.safetensors"
    save_bundle(bundle, model)
    db = tmp_path / "audit.db"
    main(["triage", "--model", str(model), "--data", str(data), "--split", "all", "--policy",
          str(REPO / "policies" / "default.yaml"), "--out", str(tmp_path / "run"), "--audit", str(db)])
    assert main(["audit", "verify", "--audit", str(db)]) == 0
    assert "model file(s) named by the records match" in " ".join(capsys.readouterr().out.split())
    thresholds = list(bundle.meta.thresholds)
    thresholds[0] = 0.01  # someone lowers a threshold in the deployed file after the audit
    save_bundle(bundle.with_meta(thresholds=thresholds), model)
    assert main(["audit", "verify", "--audit", str(db)]) == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns off a terminal
    assert "audited model" in out and "changed since run" in out and "edited in place?" in out, out


def test_triage_never_writes_into_the_dataset_folder(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only dataset folder is enough: every write is refused there (root ignores chmod, so the refusal is
    patched in) and the folder's files are unchanged afterwards."""
    import builtins

    from cli import main

    tmp, data, _ = world
    root = str(Path(data).resolve())
    snapshot = {p: p.stat().st_mtime_ns for p in Path(data).rglob("*")}
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(Path(file).resolve()).startswith(root):
            raise PermissionError(errno.EACCES, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(Path(path).resolve()).startswith(root):
            raise PermissionError(errno.EACCES, "Read-only file system", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    code = main(["triage", "--model", str(tmp / "m.safetensors"), "--data", str(data), "--split", "all", "--policy",
                 str(REPO / "policies" / "default.yaml"), "--out", str(tmp_path / "run"), "--audit",
                 str(tmp_path / "audit.db")])
    assert code in (0, 3, 4) and (tmp_path / "run" / "decision.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in Path(data).rglob("*")} == snapshot
