"""``cli.py demo``: the whole story on embedded phantom data, with cached steps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

import engine.commands.audit as audit_command
import engine.commands.compress as compress_command
import engine.commands.inject as inject_command
import engine.commands.report as report_command
import engine.commands.train as train_command
import engine.commands.triage as triage_command
from engine.commands.common import check_out_folder
from engine.commands.dispatch import build_parser, run_command_line
from engine.console import console, progress_task
from engine.demo import FULL, QUICK, DemoConfig, Step, decision_code_digest, file_digest, run_step
from engine.core.storage import atomic_write_json
from model.data.faults import parse_fault

#: The commands the demo runs, as a user would type them.
_DEMO_COMMANDS = (compress_command, inject_command, train_command, triage_command, audit_command, report_command)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on embedded phantom data: phantoms -> train -> evaluate -> ... (cached)",
        description="Generate phantoms, train a DenseNet, evaluate it, and run the later stages that are "
        "installed. Steps are cached by content: a second run reuses data and models.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small and fast ({QUICK.n_phantoms} images, {QUICK.image_size} px, '{QUICK.preset}' "
                   "model): what CI smoke-tests")
    p.set_defaults(func=run)


def _announce(name: str, reused: bool, seconds: float) -> None:
    state = "[dim]reused[/]" if reused else f"done in {seconds:.1f} s"
    console.print(f"[bold cyan]▸ {name}[/] {state}")


def run(args: argparse.Namespace) -> int:
    cfg: DemoConfig = QUICK if args.quick else FULL
    out: Path = check_out_folder(args.out)
    stamps = out / ".stamps"
    summary: dict[str, Any] = {"config": cfg.__dict__, "outputs": {}}
    started = time.perf_counter()

    from model.data.phantom import generate_phantoms

    data = out / "data" / "phantoms"

    def make_phantoms() -> dict:
        if data.exists():
            import shutil

            shutil.rmtree(data)
        with progress_task("phantoms", total=cfg.n_phantoms) as progress:
            generate_phantoms(data, cfg.n_phantoms, size=cfg.image_size, seed=cfg.seed, progress=progress)
        return {}

    t = time.perf_counter()
    reused, _ = run_step(Step("phantoms", (data / "Data_Entry_2017_v2020.csv",),
                              {"n": cfg.n_phantoms, "size": cfg.image_size, "seed": cfg.seed}), stamps, make_phantoms)
    _announce(f"phantoms: {cfg.n_phantoms} images at {cfg.image_size} px → {data}", reused, time.perf_counter() - t)
    summary["outputs"]["phantoms"] = str(data)

    from model.bundle import load_bundle, save_bundle
    from model.data import load_nih_dataset
    from model.train import train_bundle

    model_path = out / "models" / "model.safetensors"

    def train() -> dict:
        with progress_task(f"training {cfg.preset}") as progress:
            bundle, report = train_bundle(load_nih_dataset(data, "train_val"), preset=cfg.preset,
                                          image_size=cfg.image_size, epochs=cfg.epochs, seed=cfg.seed,
                                          progress=progress)
        save_bundle(bundle, model_path)
        return {"val_mean_auroc": report["val_mean_auroc"], "epochs_run": report["epochs_run"]}

    t = time.perf_counter()
    reused, info = run_step(Step("train", (model_path,), {"data": file_digest(data), "preset": cfg.preset,
                                                          "epochs": cfg.epochs, "seed": cfg.seed}), stamps, train)
    _announce(f"train {cfg.preset}: validation mean AUROC {info['val_mean_auroc']:.3f} → {model_path}", reused,
              time.perf_counter() - t)
    summary["outputs"]["model"] = str(model_path)

    from model.evaluate import evaluate_bundle

    eval_path = out / "reports" / "evaluate.json"

    def evaluate() -> dict:
        result = evaluate_bundle(load_bundle(model_path), load_nih_dataset(data, "test"), n_boot=300)
        atomic_write_json(eval_path, result)
        return result["summary"]

    t = time.perf_counter()
    reused, info = run_step(Step("evaluate", (eval_path,), {"model": file_digest(model_path)}), stamps, evaluate)
    mean = ("n/a" if info["mean_auroc"] is None else f"{info['mean_auroc']:.3f}")
    ci = (f"95% CI {info['mean_auroc_ci_low']:.3f}–{info['mean_auroc_ci_high']:.3f}"
          if info["mean_auroc_ci_low"] is not None else f"95% CI n/a: {info.get('mean_auroc_ci_low_reason')}")
    _announce(f"evaluate on the test split: mean AUROC {mean} ({ci}) → {eval_path}", reused, time.perf_counter() - t)
    summary["outputs"]["evaluation"] = str(eval_path)

    _print_summary(_later_stages(cfg, out, data, model_path, stamps, summary), summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    console.print(f"Finished in {summary['seconds']:.1f} s. Summary: {out / 'summary.json'}")
    return 0


def _print_summary(stages: list[tuple[str, ...]], summary: dict[str, Any]) -> None:
    """The triage table and where every output is."""
    console.print()
    table = Table(title="demo summary")
    for col in ("scenario", "model", "policy", "issues found", "decision", "outcome", "exit"):
        table.add_column(col)
    for row in stages:
        table.add_row(*row)
    console.print(table)
    paths = Table(title="where everything is")
    paths.add_column("what")
    paths.add_column("where")
    for key, value in summary["outputs"].items():
        paths.add_row(key, value)
    console.print(paths)


def _cli(argv: list[str]) -> int:
    """Run one CLI command in-process (the demo is the commands a user would type)."""
    console.print(f"[dim]$ python cli.py {' '.join(argv)}[/]")
    return run_command_line(build_parser(_DEMO_COMMANDS), argv)


def _checked(argv: list[str], ok: tuple[int, ...] = (0,)) -> int:
    from engine.core.errors import TriageError

    code = _cli(argv)
    if code not in ok:
        raise TriageError(f"demo step failed: `python cli.py {' '.join(argv)}` exited {code}")
    return code


def _decision_summary(run_dir: Path) -> tuple[str, str, str]:
    """(issues, decisions, outcome) in words from a run's decision.json."""
    import json

    path = run_dir / "decision.json"
    if not path.is_file():
        return ("?", "?", "no decision.json")
    record = json.loads(path.read_text())
    facts = record.get("facts", [])
    issues = sorted({f"{f.get('kind')}:{f.get('label') or '-'}" for f in facts
                     if f.get("kind") not in ("prevalence_shift", "input_drift", "cannot_assess")})
    chosen = [f"{t.get('label') or '-'}: {t.get('intervention') or 'none'} ({t.get('outcome')})"
              for t in record.get("treatments", [])]
    shown = ", ".join(issues[:4]) + (f" (+{len(issues) - 4})" if len(issues) > 4 else "")
    decided = "; ".join(chosen[:3]) + (f" (+{len(chosen) - 3})" if len(chosen) > 3 else "") or "none"
    return (shown or "none", decided, str(record.get("outcome", "?")))


def _compress_step(cfg: DemoConfig, data: Path, model_path: Path, compressed: Path, reports: Path, stamps: Path,
                   summary: dict[str, Any]) -> None:
    def compress() -> dict:
        _checked(["compress", "--model", str(model_path), "--data", str(data), "--out", str(compressed),
                  "--target-reduction", "0.5", "--seed", str(cfg.seed),
                  "--report", str(reports / "compression.json")])
        return {}

    t = time.perf_counter()
    reused, _ = run_step(Step("compress", (compressed,), {"model": file_digest(model_path)}), stamps, compress)
    _announce(f"compress to half the parameters → {compressed}", reused, time.perf_counter() - t)
    summary["outputs"]["compressed model"] = str(compressed)
    summary["outputs"]["compression report"] = str(reports / "compression.json")


def _inject_steps(cfg: DemoConfig, data: Path, faults: Path, stamps: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """One faulty copy of the data per scenario; returns {scenario: folder}."""
    import shutil

    scenarios = {"scanner_shift": "scanner_shift", "blur": "blur", "shortcut": "shortcut:Pneumothorax"}
    fault_dirs = {}
    for name, spec in scenarios.items():
        target = faults / name

        def inject(target: Path = target, spec: str = spec) -> dict:
            if target.exists():
                shutil.rmtree(target)
            _checked(["inject", "--data", str(data), "--fault", spec, "--out", str(target), "--seed", str(cfg.seed)])
            return {}

        t = time.perf_counter()
        reused, _ = run_step(Step(f"inject_{name}", (target / "fault.json",),
                                  {"data": file_digest(data), "spec": spec, "seed": cfg.seed,
                                   # resolved parameters: a changed default re-injects
                                   "params": parse_fault(spec).params}), stamps, inject)
        _announce(f"inject {spec} → {target}", reused, time.perf_counter() - t)
        fault_dirs[name] = target
        summary["outputs"][f"fault {name}"] = str(target)
    return fault_dirs


def _train_shortcut_step(cfg: DemoConfig, shortcut_data: Path, shortcut_model: Path, stamps: Path,
                         summary: dict[str, Any]) -> None:
    """The shortcut scenario is a model that learned the tube on the site's own training data."""
    def train_shortcut() -> dict:
        return {"exit": _checked(["train", "--data", str(shortcut_data), "--out", str(shortcut_model),
                                  "--arch", cfg.preset, "--image-size", str(cfg.image_size),
                                  "--epochs", str(cfg.epochs), "--seed", str(cfg.seed)])}

    t = time.perf_counter()
    reused, _ = run_step(Step("train_shortcut", (shortcut_model,),
                              {"data": file_digest(shortcut_data), "preset": cfg.preset,
                               "epochs": cfg.epochs, "seed": cfg.seed}), stamps, train_shortcut)
    _announce(f"train on the shortcut-contaminated training split → {shortcut_model}", reused,
              time.perf_counter() - t)
    summary["outputs"]["shortcut model"] = str(shortcut_model)


def _triage_step(cfg: DemoConfig, scenario: str, model: Path, dataset: Path, policy: Path, extra: list[str],
                 runs: Path, reports: Path, audit: Path, code_hash: str, stamps: Path,
                 summary: dict[str, Any]) -> tuple[str, ...]:
    """Triage one scenario under one policy, then its regulator report; returns its summary row."""
    import shutil

    run_dir = runs / f"{scenario}-{policy.stem}"

    def triage() -> dict:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        code = _checked(["triage", "--model", str(model), "--data", str(dataset), "--policy", str(policy),
                         "--out", str(run_dir), "--audit", str(audit), "--seed", str(cfg.seed), *extra],
                        ok=(0, 3, 4))
        return {"exit": code}

    t = time.perf_counter()
    reused, info = run_step(Step(f"triage_{run_dir.name}", (run_dir / "decision.json",),
                                 {"model": file_digest(model), "data": file_digest(dataset),
                                  "policy": file_digest(policy), "seed": cfg.seed, "code": code_hash}),
                            stamps, triage)
    _announce(f"triage {scenario} with {policy.name} → {run_dir}", reused, time.perf_counter() - t)
    issues, decided, outcome = _decision_summary(run_dir)
    row = (scenario, model.stem, policy.stem, issues, decided, outcome, str(info.get("exit")))
    summary["outputs"][f"run {run_dir.name}"] = str(run_dir)

    report_file = reports / f"run-{run_dir.name}.html"

    def run_report() -> dict:
        _checked(["audit", "report", str(run_dir), "--audit", str(audit), "--out", str(report_file)])
        return {}

    run_step(Step(f"run_report_{run_dir.name}", (report_file,),
                  {"run": file_digest(run_dir / "decision.json")}), stamps, run_report)
    summary["outputs"][f"regulator report {run_dir.name}"] = str(report_file)
    return row


def _clinical_reports_step(data: Path, compressed: Path, clinical: Path, stamps: Path) -> int:
    """Clinical reports for the first three test images with a finding; returns how many."""
    import shutil

    from model.data import load_nih_dataset

    test = load_nih_dataset(data, "test")
    positives = [i for i in range(len(test)) if test.labels[i].any()][:3]
    images = [str(test.image_path(i)) for i in positives]

    def clinical_reports() -> dict:
        if clinical.exists():
            shutil.rmtree(clinical)
        argv = ["report", "--model", str(compressed), "--out", str(clinical)]
        for image in images:
            argv += ["--image", image]
        _checked(argv)
        return {}

    t = time.perf_counter()
    reused, _ = run_step(Step("clinical_reports", (clinical,), {"model": file_digest(compressed), "images": images}),
                         stamps, clinical_reports)
    _announce(f"clinical reports for {len(images)} test images → {clinical}", reused, time.perf_counter() - t)
    return len(images)


def _later_stages(cfg: DemoConfig, out: Path, data: Path, model_path: Path, stamps: Path,
                  summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """compress -> inject faults -> triage each -> reports. Returns the summary table rows."""
    policies = Path(__file__).resolve().parents[2] / "policies"
    default_policy, cheap_policy = policies / "default.yaml", policies / "cheap_retraining.yaml"
    models, faults, runs, reports = out / "models", out / "data", out / "runs", out / "reports"
    audit = out / "audit.db"

    compressed = models / "compressed.safetensors"
    _compress_step(cfg, data, model_path, compressed, reports, stamps, summary)
    fault_dirs = _inject_steps(cfg, data, faults, stamps, summary)
    shortcut_model = models / "shortcut_model.safetensors"
    _train_shortcut_step(cfg, fault_dirs["shortcut"], shortcut_model, stamps, summary)

    triages = [
        ("scanner_shift", compressed, fault_dirs["scanner_shift"], default_policy, ["--parent", str(model_path)]),
        ("blur", compressed, fault_dirs["blur"], default_policy, ["--parent", str(model_path)]),
        ("shortcut", shortcut_model, fault_dirs["shortcut"], default_policy, []),
        # The same scenario under a site's policy where classifier retraining is the cheapest fix
        # and a new operating point costs more: it retrains where the default re-thresholds.
        ("scanner_shift", compressed, fault_dirs["scanner_shift"], cheap_policy, ["--parent", str(model_path)]),
    ]
    code_hash = decision_code_digest()
    rows = [_triage_step(cfg, scenario, model, dataset, policy, extra, runs, reports, audit, code_hash, stamps, summary)
            for scenario, model, dataset, policy, extra in triages]

    clinical = reports / "clinical"
    _clinical_reports_step(data, compressed, clinical, stamps)
    summary["outputs"]["clinical reports"] = str(clinical)
    summary["outputs"]["audit trail"] = str(audit)
    _checked(["audit", "verify", "--audit", str(audit)])
    summary["triage"] = [dict(zip(("scenario", "model", "policy", "issues", "decision", "outcome", "exit"), r))
                         for r in rows]
    return rows
