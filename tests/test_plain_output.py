"""A scheduled audit's log is not a terminal: wide tables become plain, unwrapped lines there.

The commands run as subprocesses with stdout to a pipe (as cron runs them); with ``TTY_COMPATIBLE=1``
(rich's switch) they keep the rich table, as wide as ``COLUMNS`` says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pattern_bundle, write_pattern_dataset

from model.bundle import save_bundle
from model.data import load_nih_dataset
from model.labels import CHEXNET_LABELS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"
BOX = re.compile("[\u2500-\u257f]")  # rich's box-drawing characters


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A dataset, a model whose Effusion logits drifted (+2.5), and a folder for the runs."""
    tmp = tmp_path_factory.mktemp("plain")
    data = write_pattern_dataset(tmp / "ds")
    bundle = pattern_bundle(load_nih_dataset(data)).copy()
    with torch.no_grad():
        bundle.model.classifier.bias[CHEXNET_LABELS.index("Effusion")] += 2.5
    save_bundle(bundle, tmp / "m.safetensors")
    return tmp, data, tmp / "m.safetensors"


def _cli(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TTY_COMPATIBLE", "FORCE_COLOR")}
    full = {**base, "PYTHONPATH": str(ROOT), "CXR_TRIAGE_CACHE": str(cache), **env}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=300)


def _triage(world: tuple[Path, Path, Path], name: str, **env: str) -> subprocess.CompletedProcess[str]:
    tmp, data, model = world
    return _cli(["triage", "--model", str(model), "--data", str(data), "--policy", str(DEFAULT),
                 "--out", str(tmp / name)], tmp / "cache", **env)


def _no_word_broken(out: str, words: list[str]) -> None:
    """Every word that should appear does, whole, on one line (a wrapped line would split or move it)."""
    for w in words:
        assert any(w in line for line in out.splitlines()), w


def test_triage_to_a_pipe_prints_one_plain_line_per_issue(world) -> None:
    proc = _triage(world, "plain", COLUMNS="60")
    assert proc.returncode in (0, 3, 4), proc.stderr
    out = proc.stdout
    assert not BOX.search(out)
    decision = json.loads((world[0] / "plain" / "decision.json").read_text())
    treatments = decision["treatments"]
    assert treatments
    issue_lines = [line for line in out.splitlines() if line.startswith("issue ")]
    assert len(issue_lines) == len(treatments)
    for tr, line in zip(treatments, issue_lines, strict=True):
        steps = [f"{a['chosen']['intervention']} -> {a['result']}" for a in tr["attempts"] if a.get("chosen")]
        assert line.startswith(f"issue {tr['kind']} {tr['label'] or 'model'} ")
        assert f"decision {', '.join(steps)};" in line and line.endswith(f"outcome {tr['outcome']}")
    # the closing lines are whole too, wider than COLUMNS=60 when they need to be
    _no_word_broken(out, [f"wrote {world[0] / 'plain' / 'decision.json'}", f"outcome: {decision['outcome']}",
                          f"audit: {world[0] / 'audit.db'}"])
    assert max(len(line) for line in out.splitlines()) > 60


def test_forced_terminal_keeps_the_table_as_wide_as_columns(world) -> None:
    narrow = _triage(world, "tty80", TTY_COMPATIBLE="1", COLUMNS="80").stdout
    wide = _triage(world, "tty200", TTY_COMPATIBLE="1", COLUMNS="200").stdout
    assert BOX.search(narrow) and BOX.search(wide)
    strip = re.compile(r"\x1b\[[0-9;]*m")
    widths = [max(len(strip.sub("", line)) for line in text.splitlines()) for text in (narrow, wide)]
    assert widths[0] <= 80 < widths[1] <= 200
    assert not any(line.startswith("issue ") for line in strip.sub("", wide).splitlines())


def test_policy_replay_to_a_pipe_is_plain(world) -> None:
    tmp, _, _ = world
    db = tmp / "audit.db"
    if not db.is_file():
        _triage(world, "for_replay")
    proc = _cli(["policy", "replay", "--audit", str(db), "--policy", str(DEFAULT)], tmp / "cache")
    assert proc.returncode == 0, proc.stderr
    assert not BOX.search(proc.stdout)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("issue ") and "done then:" in line for line in lines)
    assert any(line.startswith("  candidate ") and "proposed by propose:" in line for line in lines)


def test_backtest_rates_to_a_pipe_are_plain(capsys: pytest.CaptureFixture[str]) -> None:
    from engine.commands.backtest import _render

    rate = {"k": 1, "n": 4, "low": 0.05, "high": 0.7}
    row = {"n": 4, "healed": rate, "harmed": rate, "escalated": rate, "changed": rate, "mean_cost": 1.5}
    doc = {"summary": {"fault_kinds": ["blur", "clean"], "contenders": ["default", "always_threshold"],
                       "by_fault": {k: {"default": row, "always_threshold": row} for k in ("blur", "clean")},
                       "errors": []},
           "targets": [{"policy": "default", "checks": [{"target": "harm rate upper bound <= 10 %", "met": False}]}]}
    _render(doc)
    out = capsys.readouterr().out
    assert not BOX.search(out)
    lines = [line for line in out.splitlines() if line.startswith("fault ")]
    assert len(lines) == 4
    assert "fault blur contender always_threshold: n 4; healed 1/4 [5%-70%];" in out
    assert "default: not met: harm rate upper bound <= 10 %" in out
