"""Render ``bench/results/*.json`` into ``bench/RESULTS.md``: one Markdown section per benchmark.

Why a renderer instead of pasting numbers: every figure in RESULTS.md comes from a JSON that a
bench script wrote, next to the command that produced it, the machine, the commit and -- where the
paper publishes one -- the paper's reference figure. A benchmark that has not run says so (with
the command to run it); a JSON with missing keys renders dashes instead of failing.

    python bench/render_results.py [--results bench/results] [--out bench/RESULTS.md]

``bench/run_all`` calls this after running the benchmarks (``--render-only`` to re-render).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from render_backtest import section_backtest  # noqa: E402
from render_compress import PAPER_COMPRESSION, section_compress  # noqa: E402
from render_correct import section_correct  # noqa: E402
from render_format import DASH, _num, arrow, fmt, fmt_params, fmt_pct, fmt_s, get, median, table  # noqa: E402, F401

from benches import BENCHES, REPO, RESULTS, RESULTS_MD, Bench, display_path  # noqa: E402
from engine.core.storage import atomic_write_text  # noqa: E402

__all__ = ["MANIFEST", "PAPER_COMPRESSION", "PAPER_COST_MATRIX", "git_revision", "machine_info", "main", "render",
           "render_text"]

#: Written by run_all beside the JSONs: per benchmark, the command, exit status, wall time, commit.
MANIFEST = "_runs.json"

#: The paper's cost matrix: wall time per treatment (bench_interventions measures the first three).
PAPER_COST_MATRIX: tuple[tuple[str, str, str], ...] = (
    ("threshold", "Threshold recalibration", "< 1 s"),
    ("zeroing", "Channel zeroing", "< 5 s"),
    ("partial_retrain", "Partial (classifier) retraining", "85 s"),
    ("f_reopt", "Re-optimisation (f_reopt)", "minutes"),
    ("augmentation", "Augmentation fine-tuning", "hours"),
    ("full_retrain", "Full retraining", "hours"),
)

# --------------------------------------------------------------------------------------------
# Machine and commit


def machine_info() -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo), core count and torch version, without importing torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 -- a header field, never a reason to fail
        torch_version = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch_version, "python": platform.python_version()}


def git_revision(repo: Path = REPO) -> str:
    """``git rev-parse --short HEAD`` plus " (dirty)" when tracked or new files changed (results excluded)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    changed = [ln[3:] for ln in status.splitlines() if ln.strip()]
    changed = [p for p in changed if not (p.startswith("bench/results") or p.startswith("bench/RESULTS.md"))]
    return head + (" (dirty)" if changed else "")


# --------------------------------------------------------------------------------------------
# Per-benchmark sections. Each takes the JSON and returns Markdown lines; missing keys give dashes.


def _environment_note(data: dict[str, Any]) -> str | None:
    env = data.get("environment") or data.get("machine")
    if not isinstance(env, dict):
        return None
    bits = []
    threads = env.get("cpu_threads", env.get("torch_threads"))
    if threads is not None:
        bits.append(f"torch threads {threads}")
    if env.get("torch"):
        bits.append(f"torch {env['torch']}")
    cpus = env.get("cpu_count", env.get("cpus"))
    if cpus is not None:
        bits.append(f"{cpus} CPUs")
    return "Environment recorded by the script: " + ", ".join(bits) + "." if bits else None


_SPEED_KEY = re.compile(r"^(evaluate|train)_(\d+)px_batch(\d+)_images_per_s$")


def section_foundation_speed(data: dict[str, Any]) -> list[str]:
    rows = []
    for key, value in data.items():
        m = _SPEED_KEY.match(key)
        if m:
            rows.append((m.group(1), f"{m.group(2)} px", m.group(3), fmt(value, ",.0f")))
    lines = [f"Model: `{data.get('preset', 'densenet121')}` (random weights; speed does not depend on them). "
             "Median of the script's `--repeats`.", ""]
    if not rows:
        return lines + ["(no figures in the JSON)"]
    return lines + table(("Pass", "Image size", "Batch", "Images / s"), rows)


def section_foundation_auroc(data: dict[str, Any]) -> list[str]:
    ci = data.get("ci95") if isinstance(data.get("ci95"), list) else []
    lines = table(
        ("Model", "Train images", "Test images", "Epochs run / max", "Train time", "Mean AUROC", "95 % CI",
         "Labels with positives"),
        [(data.get("preset", "densenet121"), fmt(data.get("train_images"), ",.0f"),
          fmt(data.get("test_images"), ",.0f"),
          f"{fmt(data.get('epochs_run'), '.0f')} / {fmt(data.get('epochs'), '.0f')}", fmt_s(data.get("train_seconds")),
          fmt(data.get("mean_auroc")), f"{fmt(get(ci, 0))} – {fmt(get(ci, 1))}" if ci else DASH,
          fmt(data.get("labels_with_positives"), ".0f"))])
    per = data.get("per_label_auroc")
    if isinstance(per, dict) and per:
        names = list(per)
        half = (len(names) + 1) // 2
        rows = []
        for i in range(half):  # two label columns side by side keep the table short
            right = names[i + half] if i + half < len(names) else None
            rows.append((names[i], fmt(per[names[i]]), right or "", fmt(per[right]) if right else ""))
        lines += ["", "Per-label AUROC on the test split:", ""]
        lines += table(("Label", "AUROC", "Label", "AUROC"), rows, align="lrlr")
    return lines


def section_monitors(data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    timing = data.get("timing")
    if isinstance(timing, dict):
        lines += [f"**Suite time** on {fmt(timing.get('rows'), ',.0f')} cached samples × "
                  f"{fmt(timing.get('features'), '.0f')}-d features, {fmt(timing.get('labels'), '.0f')} labels "
                  f"(median of {fmt(timing.get('repeats'), '.0f')}; no backbone):", ""]
        monitors = list(dict.fromkeys([*get(timing, "clean", "per_monitor_median_s", default={}),
                                       *get(timing, "faulted", "per_monitor_median_s", default={})]))
        rows = [(m, fmt_s(get(timing, "clean", "per_monitor_median_s", m)),
                 fmt_s(get(timing, "faulted", "per_monitor_median_s", m))) for m in monitors]
        rows.append(("**whole suite**", fmt_s(get(timing, "clean", "median_s")),
                     fmt_s(get(timing, "faulted", "median_s"))))
        lines += table(("Monitor", "Clean", "Faulted"), rows)
        facts = get(timing, "faulted", "facts", default=[])
        if facts:
            lines += ["", f"Facts on the faulted set ({len(facts)}): " + ", ".join(f"`{f}`" for f in facts)]
    else:
        lines += ["Suite timing: not in this JSON (`--skip-timing`)."]
    det = data.get("detection")
    if isinstance(det, dict):
        s = det.get("settings") or {}
        lines += ["", f"**Detection on phantoms**: {fmt(s.get('scenarios'), '.0f')} scenario(s) per fault, "
                      f"`{s.get('preset', '?')}` at {fmt(s.get('size'), '.0f')} px, {fmt(s.get('epochs'), '.0f')} "
                      f"epoch(s), {fmt(s.get('n_train'), '.0f')} training / {fmt(s.get('n_eval'), '.0f')} "
                      f"evaluation phantoms; {fmt_s(det.get('seconds'))} in all.", ""]
        rows = []
        for fam in ("clean-trained", "shortcut-trained"):
            r = det.get(fam)
            if not isinstance(r, dict):
                continue
            model = r.get("model") or {}
            rows.append((fam, "model: validation mean AUROC", fmt(model.get("val_mean_auroc")),
                         f"trained in {fmt_s(model.get('seconds'))}"))
            for key, values in r.items():
                if key in ("model", "details") or not isinstance(values, list):
                    continue
                hits = sum(bool(v) for v in values)
                what = "false alarms on clean data" if key == "clean_false_alarm" else f"detected {key}"
                rows.append((fam, what, f"{hits}/{len(values)}", ""))
        lines += table(("Model", "Measure", "Rate", "Note"), rows, align="llrl") if rows else ["(no families)"]
        lines += _null_level_lines(det.get("null_level"))
    else:
        lines += ["", "Detection: not in this JSON (`--skip-detection`)."]
    return lines


def _null_level_lines(level: Any) -> list[str]:
    """Part 3 of the monitors bench: how often calibration_drift's operating-point null is exceeded on clean data."""
    if not isinstance(level, dict):
        return []
    lines = ["", f"**Operating-point null on clean data** (calibration_drift): the clean-trained model on "
                 f"{fmt(level.get('population'), ',.0f')} new phantoms; per label {fmt(level.get('draws_per_label'), '.0f')} "
                 f"draws of a {fmt(level.get('reference_n'), '.0f')}-image reference (its Youden threshold deployed) "
                 f"and a {fmt(level.get('audit_n'), '.0f')}-image audit drawn apart; share of draws whose J loss exceeds "
                 f"the null's 95 % quantile (nominal 5 %), labels pooled; {fmt_s(level.get('seconds'))}.", ""]
    names = {"replica": "samples judged on independent bootstrap replicas of the audit (the monitor's)",
             "own_curve": "samples judged on the audit's own J curve (naive)"}
    rows = []
    for key, what in names.items():
        v = get(level, "pooled", key, default={}) or {}
        rows.append((what, f"{fmt(v.get('exceeded'), '.0f')}/{fmt(v.get('draws'), '.0f')}", fmt_pct(v.get("rate")),
                     f"{fmt_pct(v.get('ci_low'))} – {fmt_pct(v.get('ci_high'))}"))
    return lines + table(("Null", "Exceeded", "Rate", "95 % CI (Wilson)"), rows, align="lrrr")


def section_decide(data: dict[str, Any]) -> list[str]:
    lines = table(
        ("Policy", "Facts", "Candidates", "First call (registers ruleset)", "Median per call", "Median per fact",
         "Min / max per call", "Repeats"),
        [(f"{data.get('policy', DASH)} ({str(data.get('policy_hash', ''))[:12]})", fmt(data.get("facts"), ".0f"),
          fmt(data.get("candidates"), ".0f"), fmt_s(data.get("first_call_s")), fmt_s(data.get("median_call_s")),
          fmt_s(data.get("median_per_fact_s")),
          f"{fmt_s(data.get('min_call_s'))} / {fmt_s(data.get('max_call_s'))}", fmt(data.get("repeats"), ".0f"))])
    choices = data.get("choices")
    if isinstance(choices, dict) and choices:
        lines += ["", "Chosen treatments: " + ", ".join(f"{k} {v}" for k, v in choices.items())]
    return lines


def section_triage(data: dict[str, Any]) -> list[str]:
    lines = [f"{fmt(data.get('n'), ',.0f')} cached samples, DenseNet121-sized head (1,024 × 14), torch threads "
             f"{data.get('threads', DASH)}; outcome of the last run: `{data.get('outcome', DASH)}`.", ""]
    rows = []
    for key, what in (("monitors_s", "run_monitors (all rows)"), ("decide_one_issue_s", "decide, one issue"),
                      ("decide_batch_s", "decide, all issues at once"), ("triage_s", "run_triage end to end")):
        values = data.get(key) if isinstance(data.get(key), list) else []
        nums = [x for x in (_num(v) for v in values) if x is not None]
        rows.append((what, fmt_s(median(values)), fmt_s(min(nums)) if nums else DASH,
                     fmt_s(max(nums)) if nums else DASH, len(values)))
    lines += table(("Step", "Median", "Min", "Max", "n"), rows)
    stages = data.get("stages_s")
    if isinstance(stages, dict) and stages:
        lines += ["", "Stages of the last run: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in stages.items())]
    return lines


def _scenario_times(data: dict[str, Any], name: str) -> str:
    out = []
    for scenario in ("shortcut", "scanner_shift", "recall_collapse"):
        t = get(data, scenario, "results", name, "wall_time_s_median")
        if _num(t) is not None:
            out.append(f"{fmt_s(t)} ({scenario})")
    return "; ".join(out) or DASH


def section_interventions(data: dict[str, Any]) -> list[str]:
    ht = data.get("head_timing") if isinstance(data.get("head_timing"), dict) else {}
    s = data.get("settings") or {}
    lines = [f"Scenario models: `{s.get('preset', '?')}` at {fmt(s.get('size'), '.0f')} px, {fmt(s.get('n'), '.0f')} "
             f"phantoms, {fmt(s.get('epochs'), '.0f')} epochs; classifier-level medians of "
             f"{fmt(s.get('repeats'), '.0f')} runs; total {fmt_s(data.get('total_wall_time_s'))}.", "",
             f"**Cost matrix** (head timing: synthetic pooled features at DenseNet121's head size, "
             f"{fmt(ht.get('rows_fit'), ',.0f')} FIT rows × {fmt(ht.get('features'), '.0f')} features):", ""]
    rows = []
    for key, title, paper in PAPER_COST_MATRIX:
        head = fmt_s(get(ht, key, "wall_time_s_median"))
        if key == "partial_retrain" and _num(get(ht, "partial_retrain(scope all)", "wall_time_s_median")) is not None:
            head += f"; all labels {fmt_s(get(ht, 'partial_retrain(scope all)', 'wall_time_s_median'))}"
        rows.append((title, paper, head, _scenario_times(data, key)))
    lines += table(("Treatment", "Paper", "Measured: head size", "Measured: scenarios (median wall)"), rows,
                   align="llll")
    lines += ["", "f_reopt is not exercised by bench_interventions.py (it needs a compressed model and its parent).",
              "", "**Effect on the VERIFY half** (target label at its threshold; before → after):", ""]
    rows = []
    for scenario in ("shortcut", "scanner_shift", "recall_collapse"):
        sc = data.get(scenario)
        if not isinstance(sc, dict):
            continue
        order = [k for k, _, _ in PAPER_COST_MATRIX]
        results = dict(sorted((sc.get("results") or {}).items(),
                              key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        for cap, row in (sc.get("zeroing_channel_sweep") or {}).items():
            results[f"zeroing (cap {cap})"] = row
        if not results:
            rows.append((scenario, sc.get("label", DASH), DASH, DASH, DASH, DASH, DASH, DASH, DASH, DASH,
                         "no fact to treat" + (f" (facts: {', '.join(sc['facts'])})" if sc.get("facts") else "")))
        for name, r in results.items():
            if not isinstance(r, dict):
                continue
            if not r.get("applicable", True) or "refused" in r:
                why = r.get("reason") or r.get("refused") or ""
                rows.append((scenario, sc.get("label", DASH), name, DASH, DASH, DASH, DASH, DASH, DASH, DASH,
                             ("not applicable: " if "reason" in r else "refused: ") + str(why)[:140]))
                continue
            b, a = r.get("before") or {}, r.get("after") or {}
            cl = r.get("cluster_fp")
            col = r.get("collateral") or {}
            note = "others bit-identical" if col.get("other_logits_bit_identical") else ""
            if scenario == "shortcut" and sc.get("fact_source") and name == "zeroing":
                note = "; ".join(filter(None, [note, f"fact: {sc['fact_source']}"]))
            rows.append((scenario, sc.get("label", DASH), name, fmt_s(r.get("wall_time_s_median")),
                         arrow(fmt(b.get("auroc")), fmt(a.get("auroc"))),
                         arrow(fmt(b.get("sensitivity"), ".2f"), fmt(a.get("sensitivity"), ".2f")),
                         arrow(fmt(b.get("specificity"), ".2f"), fmt(a.get("specificity"), ".2f")),
                         arrow(fmt(b.get("f1"), ".2f"), fmt(a.get("f1"), ".2f")),
                         f"{arrow(fmt(b.get('fp'), '.0f'), fmt(a.get('fp'), '.0f'))}"
                         + (f" (cluster {cl.get('before')} → {cl.get('after')})" if isinstance(cl, dict) else ""),
                         fmt(col.get("max_other_auroc_drop"), "+.4f"), note))
    lines += table(("Scenario", "Label", "Treatment", "Wall", "AUROC", "Sens.", "Spec.", "F1", "FP",
                    "Max other AUROC drop", "Note"), rows, align="lllrrrrrrrl") if rows else ["(no scenarios)"]
    op = data.get("operating_point")
    if isinstance(op, dict) and op:
        lines += ["", "**Operating point** (macro over labels with positives on VERIFY):", ""]
        rows = [("paper", "partial retraining vs threshold 0.5", DASH, DASH, "×1.6", "×7", "85 s")]
        for ds, r in op.items():
            if not isinstance(r, dict):
                continue
            for key, what in (("threshold_0.5", "threshold 0.5"), ("youden_thresholds", "Youden thresholds (FIT)"),
                              ("partial_retrain", "partial retraining, all labels")):
                m = r.get(key)
                if not isinstance(m, dict):
                    continue
                if "refused" in m:
                    rows.append((ds, what, "refused: " + str(m["refused"])[:100], "", "", "", ""))
                    continue
                wall = m.get("wall_time_s_median", m.get("wall_time_s"))
                rows.append((ds, what, fmt(m.get("macro_f1")), fmt(m.get("macro_recall")),
                             fmt(m.get("f1_ratio_vs_0.5"), ".2f", "×") if key != "threshold_0.5" else "1×",
                             fmt(m.get("recall_ratio_vs_0.5"), ".2f", "×") if key != "threshold_0.5" else "1×",
                             fmt_s(wall) if wall is not None else DASH))
        lines += table(("Data", "Setting", "Macro F1", "Macro recall", "F1 vs 0.5", "Recall vs 0.5", "Wall"), rows,
                       align="llrrrrr")
    return lines


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "foundation_speed": section_foundation_speed,
    "foundation_auroc-phantom": section_foundation_auroc,
    "foundation_auroc-nih": section_foundation_auroc,
    "monitors": section_monitors,
    "decide": section_decide,
    "triage": section_triage,
    "interventions": section_interventions,
    "compress": section_compress,
    "backtest": section_backtest,
    "correct": section_correct,
}


# --------------------------------------------------------------------------------------------
# Assembly


def _load_manifest(results_dir: Path) -> dict[str, Any]:
    try:
        runs = json.loads((results_dir / MANIFEST).read_text()).get("runs")
    except (OSError, ValueError, AttributeError):
        return {}
    return runs if isinstance(runs, dict) else {}


def _file_time(path: Path) -> tuple[str, datetime]:
    """When the JSON was written, and how that is known: its commit time ("committed") while it
    matches the last commit that changed it (a checkout resets every file's mtime, so the mtime
    would date the clone), else its mtime ("written")."""
    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        committed = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=path.parent,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        changed, committed = "", ""
    if committed and not changed:
        return "committed", datetime.fromtimestamp(int(committed), timezone.utc)
    return "written", datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


#: A run_all record without the JSON's hash is taken for the run that wrote the JSON when the JSON
#: dates from at most this long after the run ended (a commit follows a run within hours).
_LEGACY_RECORD_SLACK_S = 24 * 3600


def _record_wrote(run: dict[str, Any], path: Path, written: datetime) -> bool:
    """Whether a successful run_all record is the run that wrote this JSON (not one before a re-run
    by hand): by the JSON's hash where the record has one, else by the dates (``written``: the
    JSON's, from :func:`_file_time`)."""
    digest = run.get("json_sha256")
    if digest:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    try:
        started = datetime.strptime(str(run.get("started")), "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc)
    except ValueError:
        return True
    age = (written - started).total_seconds()
    return age <= float(run.get("wall_s") or 0) + _LEGACY_RECORD_SLACK_S


def _status_words(run: dict[str, Any]) -> str:
    status = str(run.get("status", "failed"))
    return {"timeout": "timed out", "no-json": "wrote no JSON"}.get(status, status)


def _provenance(bench: Bench, path: Path, data: dict[str, Any] | None, run: dict[str, Any] | None) -> list[str]:
    how, when = _file_time(path) if path.is_file() else ("", None)
    if run and run.get("status", "ok") == "ok" and when is not None and not _record_wrote(run, path, when):
        run = None  # the JSON was re-run by hand after that record: its command and commit say nothing of it
    if run and run.get("command"):
        lines = [f"Command: `{run['command']}`", ""]
    else:
        lines = [f"Command: `{bench.command(path)}` (the standard settings; no run_all record for this JSON, "
                 "so the settings it ran with may differ)", ""]
    bits = []
    if when is not None:
        bits.append(f"JSON `{display_path(path)}` {how} {_stamp(when)}")
        date = get(data, "environment", "date")
        if date:
            bits.append(f"dated {date} by the script")
    if run:
        status = "ok" if run.get("exit_code") == 0 and run.get("status", "ok") == "ok" else \
            f"{_status_words(run)} (exit {run.get('exit_code')})"
        bits.append(f"run_all: {status} in {fmt_s(run.get('wall_s'))}, started {run.get('started', '?')}, "
                    f"commit {run.get('commit', '?')}, threads {run.get('threads', '?')}")
    if bits:
        lines += ["Provenance: " + "; ".join(bits) + ".", ""]
    if run and run.get("quick"):
        lines += ["> **Smoke run** (`run_all --quick`): smallest settings, to check the script — not a result.", ""]
    if run and run.get("status", "ok") != "ok" and path.is_file():
        lines += [f"> **The last run failed** ({_status_words(run)}); the figures below are from an earlier run.", ""]
    if data is not None:
        note = _environment_note(data)
        if note:
            lines += [note, ""]
    return lines


def _section(bench: Bench, results_dir: Path, runs: dict[str, Any]) -> list[str]:
    path = results_dir / f"{bench.name}.json"
    run = runs.get(bench.name) if isinstance(runs.get(bench.name), dict) else None
    lines = [f"## {bench.title}", ""]
    if not path.is_file():
        lines += ["**Not run.**" + (f" The last attempt {_status_words(run)} "
                                    f"(exit {run.get('exit_code')}, {run.get('started', '?')})."
                                    if run and run.get("status", "ok") != "ok" else ""),
                  "", f"Run it with `python bench/run_all --only {bench.name}` or directly:", "",
                  f"    {bench.command()}", ""]
        return lines
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    except (OSError, ValueError) as exc:
        return lines + _provenance(bench, path, None, run) + [f"**Unreadable JSON**: {exc}", ""]
    lines += _provenance(bench, path, data, run)
    try:
        lines += SECTIONS[bench.name](data)
    except Exception as exc:  # noqa: BLE001 -- one odd JSON must not take the whole page down
        lines += [f"**Could not render this JSON** ({type(exc).__name__}: {exc}); its keys: "
                  + ", ".join(f"`{k}`" for k in data)]
    return lines + [""]


def render_text(results_dir: Path = RESULTS, *, now: datetime | None = None) -> str:
    """RESULTS.md's text for the JSONs in ``results_dir``."""
    results_dir = Path(results_dir)
    runs = _load_manifest(results_dir)
    m = machine_info()
    now = now or datetime.now(timezone.utc)
    threads = sorted({str(r.get("threads")) for r in runs.values() if isinstance(r, dict) and "threads" in r})
    present = [b for b in BENCHES if (results_dir / f"{b.name}.json").is_file()]
    lines = [
        "# Benchmark results", "",
        f"Generated {now.strftime('%Y-%m-%d %H:%M UTC')} by `python bench/render_results.py` from "
        f"`{display_path(results_dir)}/*.json` ({len(present)} of {len(BENCHES)} benchmarks have results). "
        "Re-run everything with `python bench/run_all`; see each section for its command.", "",
        *table(("", ""), [
            ("Machine", f"{m['cpu']}, {m['cores']} cores (where this file was rendered; each section's "
                        "provenance dates its run)"),
            ("Software", f"torch {m['torch']}, Python {m['python']}"),
            ("Threads", (", ".join(threads) + " (run_all --threads)") if threads
             else "see each section (no run_all manifest)"),
            ("Commit", git_revision()),
        ], align="ll"), "",
        "Contents: " + " · ".join(f"[{b.name}](#{_anchor(b.title)})" for b in BENCHES), "",
    ]
    for bench in BENCHES:
        lines += _section(bench, results_dir, runs)
    known = {f"{b.name}.json" for b in BENCHES} | {MANIFEST}
    other = sorted(p.name for p in results_dir.glob("*.json") if p.name not in known)
    if other:
        lines += ["## Other result files", "", "Not rendered (no section for them): "
                  + ", ".join(f"`{n}`" for n in other), ""]
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render(results_dir: Path = RESULTS, out: Path = RESULTS_MD, *, now: datetime | None = None) -> Path:
    """Write RESULTS.md for ``results_dir`` to ``out`` atomically; returns ``out``."""
    return atomic_write_text(out, render_text(results_dir, now=now))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of JSONs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_MD, help="Markdown to write (default: %(default)s)")
    args = parser.parse_args(argv)
    out = render(args.results, args.out)
    print(f"Wrote {display_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
