"""bench/render_results.py and bench/run_all: figures reach RESULTS.md, gaps say "not run", failures are reported.

No real benchmark runs here: the renderer reads synthetic JSONs shaped like the bench scripts'
output, and run_all runs three throw-away scripts standing in for benchmarks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import benches  # noqa: E402
import render_results as rr  # noqa: E402


def _load_run_all():
    loader = SourceFileLoader("bench_run_all", str(BENCH / "run_all"))
    spec = importlib.util.spec_from_loader("bench_run_all", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


run_all = _load_run_all()


def _write(folder: Path, name: str, obj) -> None:
    (folder / f"{name}.json").write_text(json.dumps(obj))


def _sections(text: str) -> dict[str, str]:
    """Section body by title (the text between one '## ' heading and the next)."""
    out = {}
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        out[title.strip()] = body
    return out


def _title(name: str) -> str:
    return benches.get_bench(name).title


def _synthetic_results(folder: Path) -> None:
    _write(folder, "foundation_speed", {"evaluate_64px_batch64_images_per_s": 1234.4,
                                        "environment": {"date": "2031-02-03", "cpu_threads": 1}})
    _write(folder, "foundation_auroc-phantom", {
        "train_images": 3276, "test_images": 724, "epochs": 8, "epochs_run": 7, "train_seconds": 380.9,
        "mean_auroc": 0.8123, "ci95": [0.7991, 0.8517], "labels_with_positives": 14,
        "per_label_auroc": {"Atelectasis": 0.7482, "Cardiomegaly": 0.9623, "Hernia": None}})
    _write(folder, "decide", {"policy": "default", "policy_hash": "abcdef0123456789", "facts": 100, "candidates": 250,
                              "first_call_s": 0.0131, "median_call_s": 0.0456, "median_per_fact_s": 0.000456,
                              "min_call_s": 0.04, "max_call_s": 0.05, "repeats": 15, "choices": {"threshold": 40}})
    _write(folder, "triage", {"n": 2000, "threads": 1, "monitors_s": [0.5, 0.7, 0.6], "decide_one_issue_s": [0.002],
                              "decide_batch_s": [0.004], "triage_s": [3.25, 3.75], "stages_s": {"monitor": 0.4},
                              "outcome": "treated"})
    _write(folder, "interventions", {
        "settings": {"preset": "small", "size": 64, "n": 1000, "epochs": 8, "repeats": 3},
        "head_timing": {"rows_fit": 1000, "features": 1024, "threshold": {"wall_time_s_median": 0.0421},
                        "zeroing": {"wall_time_s_median": 1.75}, "partial_retrain": {"wall_time_s_median": 12.5}},
        "shortcut": {"label": "Pneumothorax", "fact_source": "fp_cluster monitor", "results": {
            "zeroing": {"applicable": True, "wall_time_s_median": 0.5,
                        "before": {"auroc": 0.901, "sensitivity": 0.8, "specificity": 0.7, "f1": 0.5, "fp": 40},
                        "after": {"auroc": 0.912, "sensitivity": 0.8, "specificity": 0.9, "f1": 0.6, "fp": 12},
                        "cluster_fp": {"before": 30, "after": 3}, "collateral": {"max_other_auroc_drop": 0.0,
                                                                                  "other_logits_bit_identical": True}},
            "partial_retrain": {"applicable": False, "reason": "too few positives"}}},
        "operating_point": {"nih": {"threshold_0.5": {"macro_f1": 0.111, "macro_recall": 0.222},
                                    "partial_retrain": {"macro_f1": 0.333, "macro_recall": 0.444,
                                                        "f1_ratio_vs_0.5": 3.0, "recall_ratio_vs_0.5": 2.0,
                                                        "wall_time_s_median": 0.2}}},
    })
    _write(folder, "compress", {"threads": 1, "results": [{
        "dataset": "phantom",
        "rows": [{"method": "ours exact", "param_reduction": 0.4321, "flop_reduction": 0.2, "max_abs_dlogit": 3.2e-6,
                  "mean_abs_dlogit": 1e-7, "mean_auroc_delta": 0.0002, "worst_abs_auroc_delta": 0.001,
                  "worst_label": {"label": "Hernia", "positives": 1, "delta": -0.001, "ci_low": -0.01, "ci_high": 0.0},
                  "flip_rate": 0.0012, "meets": True, "seconds": 12.0,
                  "speedup": {"64px_b1": 1.1, "64px_b32": 1.25, "224px_b1": 1.31, "224px_b32": 1.4}}],
        "profile_64px_b1": {"parent": {"ops_per_forward": 850, "ms_per_forward": 9.5, "conv_share": 0.41,
                                       "top": [{"op": "aten::mkldnn_convolution", "share": 0.41, "calls": 120}]}},
        "operator_floor": {"64px_b1": {"parent": {"time_s": 0.012, "floor_s": 0.006, "floor_share": 0.5,
                                                  "arithmetic_s": 0.006, "speedup": 1.0, "arithmetic_speedup": 1.0,
                                                  "needed_arithmetic_speedup_for_1.3": 1.857}}},
        "summary": {"parent_parameters": 6968206, "exact_reduction": 0.4321, "best_reduction_meeting_auroc": 0.4321,
                    "parent_mean_auroc_test": 0.81, "test_images": 724, "calibration_images": 3276}}]})


def test_figures_and_paper_references_reach_the_tables(tmp_path: Path) -> None:
    _synthetic_results(tmp_path)
    now = datetime(2031, 2, 3, 4, 5, tzinfo=timezone.utc)
    out = rr.render(tmp_path, tmp_path / "RESULTS.md", now=now)
    text = out.read_text()
    assert text == rr.render_text(tmp_path, now=now) and "Generated 2031-02-03 04:05 UTC" in text
    s = _sections(text)
    assert "| evaluate | 64 px | 64 | 1,234 |" in s[_title("foundation_speed")]
    auroc = s[_title("foundation_auroc-phantom")]
    assert "0.812" in auroc and "0.799 – 0.852" in auroc and "7 / 8" in auroc and "| Cardiomegaly | 0.962 |" in auroc
    assert "| Hernia | – |" in auroc  # a label without an AUROC renders a dash
    assert "45.6 ms" in s[_title("decide")] and "456 µs" in s[_title("decide")]
    triage = s[_title("triage")]
    assert "| run_monitors (all rows) | 600.0 ms | 500.0 ms | 700.0 ms | 3 |" in triage
    assert "| run_triage end to end | 3.50 s |" in triage
    iv = s[_title("interventions")]
    for paper in ("< 1 s", "< 5 s", "85 s", "minutes", "hours"):
        assert f"| {paper} |" in iv
    assert "| Threshold recalibration | < 1 s | 42.1 ms |" in iv
    assert "| Channel zeroing | < 5 s | 1.75 s | 500.0 ms (shortcut) |" in iv
    assert "0.901 → 0.912" in iv and "40 → 12 (cluster 30 → 3)" in iv
    assert "not applicable: too few positives" in iv
    assert "| nih | partial retraining, all labels | 0.333 | 0.444 | 3.00× | 2.00× |" in iv
    comp = s[_title("compress")]
    assert "6.97M → 3.38M" in comp and "−51.43 %" in comp and "< 5e-6" in comp and "+0.0003" in comp
    assert "16.07 → 15.54" in comp
    assert "| ours exact | 6.97M → 3.96M | −43.21 % | −20.0 % |" in comp and "3.2e-06" in comp and "0.12 %" in comp
    assert "| 0.0010 (Hernia, 1 pos.) | yes | 1.10 | 1.25 | 1.31 | 1.40 |" in comp
    assert "parent: 850 operator calls per forward pass" in comp and "convolutions 41 %" in comp
    assert "| 64 px, batch 1 | parent | 12.00 | 6.00 (50 %) | 6.00 | 1.00 | 1.00 | 1.86 |" in comp
    # the header names the machine and the commit
    assert "| Machine |" in text and "| Commit |" in text and "cores" in text


def test_missing_results_say_not_run_with_the_command(tmp_path: Path) -> None:
    _write(tmp_path, "decide", {"median_call_s": 0.01})
    s = _sections(rr.render_text(tmp_path))
    for b in benches.BENCHES:
        body = s[b.title]
        if b.name == "decide":
            assert "Not run" not in body and "10.0 ms" in body
        else:
            assert "**Not run.**" in body
            assert b.script in body and f"--only {b.name}" in body


@pytest.mark.parametrize("payload", [{}, {"results": "oops", "timing": 3, "head_timing": [], "rows": None,
                                          "shortcut": {"results": {"zeroing": "x"}}, "ci95": "no"}])
def test_odd_or_incomplete_json_renders_dashes_not_errors(tmp_path: Path, payload) -> None:
    for b in benches.BENCHES:
        _write(tmp_path, b.name, payload)
    text = rr.render_text(tmp_path)
    assert "Could not render" not in text and "Not run" not in text
    assert rr.DASH in text


def test_unreadable_json_failed_and_quick_runs_are_flagged(tmp_path: Path) -> None:
    (tmp_path / "triage.json").write_text("{not json")
    _write(tmp_path, "decide", {"median_call_s": 0.01})
    _write(tmp_path, "compress", {"threads": 1, "results": []})
    (tmp_path / rr.MANIFEST).write_text(json.dumps({"runs": {
        "decide": {"command": "python bench/bench_decide.py --facts 3", "status": "failed", "exit_code": 1,
                   "wall_s": 2.0, "started": "2031-01-01 00:00:00 UTC", "commit": "abc1234", "threads": 1},
        "compress": {"command": "python bench/bench_compress.py --quick", "status": "ok", "exit_code": 0,
                     "wall_s": 3.0, "started": "2031-01-01 00:00:00 UTC", "commit": "abc1234", "threads": 1,
                     "quick": True},
        "monitors": {"command": "python bench/bench_monitors.py", "status": "timeout", "exit_code": -9, "wall_s": 9.0,
                     "started": "2031-01-01 00:00:00 UTC", "commit": "abc1234", "threads": 1}}}))
    _write(tmp_path, "stray_extra", {"a": 1})
    text = rr.render_text(tmp_path)
    s = _sections(text)
    assert "Unreadable JSON" in s[_title("triage")]
    decide = s[_title("decide")]
    assert "The last run failed" in decide and "`python bench/bench_decide.py --facts 3`" in decide
    assert "Smoke run" in s[_title("compress")] and "The last run failed" not in s[_title("compress")]
    assert "**Not run.** The last attempt timed out (exit -9" in s[_title("monitors")]
    assert "stray_extra.json" in s["Other result files"]


def test_run_all_help() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "run_all"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--only", "--skip", "--render-only", "--quick"):
        assert flag in proc.stdout


def test_run_all_selection() -> None:
    names = [b.name for b in run_all.select(["foundation", "decide"], ["foundation_speed"])]
    assert names == ["foundation_auroc-phantom", "foundation_auroc-nih", "decide"]
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        run_all.select(["nope"], None)


def test_run_all_reports_a_failure_and_runs_the_rest(tmp_path: Path, monkeypatch, capsys) -> None:
    scripts = {
        "fake_fail": "import sys\nsys.stderr.write('boom: the fake benchmark broke\\n')\nsys.exit(3)\n",
        "fake_nojson": "print('forgot to write the JSON')\n",
        "fake_ok": "import json, sys\nopen(sys.argv[sys.argv.index('--json') + 1], 'w').write(json.dumps({'x': 1}))\n",
    }
    fakes = []
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)
        fakes.append(benches.Bench(name, name, str(tmp_path / f"{name}.py"), threads_flag=False))
    monkeypatch.setattr(benches, "BENCHES", tuple(fakes))
    monkeypatch.setattr(run_all, "BENCHES", tuple(fakes))
    results = tmp_path / "results"
    code = run_all.main(["--results", str(results), "--out", str(tmp_path / "R.md")])
    printed = capsys.readouterr().out
    assert code == 1
    assert "boom: the fake benchmark broke" in printed and "wrote no JSON" in printed
    runs = json.loads((results / "_runs.json").read_text())["runs"]
    assert runs["fake_fail"]["status"] == "failed" and runs["fake_fail"]["exit_code"] == 3
    assert runs["fake_nojson"]["status"] == "no-json"
    assert runs["fake_ok"]["status"] == "ok" and json.loads((results / "fake_ok.json").read_text()) == {"x": 1}
    assert runs["fake_ok"]["json_sha256"] == hashlib.sha256((results / "fake_ok.json").read_bytes()).hexdigest()
    assert "json_sha256" not in runs["fake_fail"]
    assert (tmp_path / "R.md").is_file()


def test_provenance_dates_a_committed_json_by_its_commit_not_its_checkout(tmp_path: Path) -> None:
    """A clone resets every mtime: an unchanged committed JSON is dated by its commit, a changed one by its mtime."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    path = tmp_path / "monitors.json"
    path.write_text("{}")
    env = {**os.environ, "GIT_COMMITTER_DATE": "2026-11-20T10:30:00+00:00",
           "GIT_AUTHOR_DATE": "2026-11-20T10:30:00+00:00"}
    subprocess.run([*git, "add", "monitors.json"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "r"], cwd=tmp_path, check=True, env=env)
    how, when = rr._file_time(path)
    assert (how, rr._stamp(when)) == ("committed", "2026-11-20 10:30 UTC")
    path.write_text('{"changed": 1}')
    assert rr._file_time(path) == ("written", datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))
    untracked = tmp_path / "new.json"
    untracked.write_text("{}")
    assert rr._file_time(untracked)[0] == "written"


def test_a_json_re_run_by_hand_after_its_run_all_record_drops_that_record(tmp_path: Path) -> None:
    """The record's command and commit describe another run: by the hash where recorded, else by the dates."""
    path = tmp_path / "decide.json"
    path.write_text('{"facts": 100}')
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    now = datetime.now(timezone.utc)
    fresh = {"status": "ok", "started": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "wall_s": 5}
    written = rr._file_time(path)[1]
    assert rr._record_wrote({**fresh, "json_sha256": digest}, path, written)
    assert not rr._record_wrote({**fresh, "json_sha256": "0" * 64}, path, written)
    assert rr._record_wrote(fresh, path, written)  # no hash (older records): dated within a day of the run
    assert not rr._record_wrote({**fresh, "started": "2026-01-01 08:00:00 UTC"}, path, written)
    _write(tmp_path, "_runs", {"runs": {"decide": {**fresh, "started": "2026-01-01 08:00:00 UTC", "exit_code": 0,
                                                   "command": "python bench/bench_decide.py --odd", "commit": "abc"}}})
    text = rr.render_text(tmp_path)
    assert "--odd" not in text and "commit abc" not in text and "no run_all record for this JSON" in text


def test_monitors_null_level_reaches_its_table(tmp_path: Path) -> None:
    level = {"population": 3000, "reference_n": 131, "audit_n": 400, "draws_per_label": 150, "seconds": 52.8,
             "pooled": {"replica": {"exceeded": 54, "draws": 1687, "rate": 0.032, "ci_low": 0.025, "ci_high": 0.042},
                        "own_curve": {"exceeded": 540, "draws": 1687, "rate": 0.32, "ci_low": 0.298, "ci_high": 0.343}}}
    _write(tmp_path, "monitors", {"detection": {"settings": {}, "null_level": level}})
    text = rr.render_text(tmp_path)
    assert "| samples judged on independent bootstrap replicas of the audit (the monitor's) | 54/1687 | 3.2 % |" in text
    assert "| samples judged on the audit's own J curve (naive) | 540/1687 | 32.0 % | 29.8 % – 34.3 % |" in text
    _write(tmp_path, "monitors", {"detection": {"settings": {}}})  # an older JSON: no part 3, no table
    assert "Operating-point null" not in rr.render_text(tmp_path)
