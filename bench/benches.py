"""The benchmark registry shared by ``bench/run_all`` (how to run each script) and
``bench/render_results.py`` (which sections RESULTS.md has, and the command to show for each).

One entry per results file ``bench/results/<name>.json``. ``args`` are the published settings;
``quick_args`` the smallest settings that still exercise every code path of the script (a smoke
test of the script, never a result). Keeping both here means the command printed in RESULTS.md is
the command that ran.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BENCHES", "Bench", "REPO", "RESULTS", "RESULTS_MD", "bench_names", "display_path", "get_bench"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RESULTS_MD = REPO / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Bench:
    """How to run one benchmark script so that it writes ``<results dir>/<name>.json``."""

    name: str
    title: str
    script: str  # relative to the repository root
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    json_flag: str = "--json"
    threads_flag: bool = True  # the script takes --threads N
    workdir_flag: str | None = None  # the script's scratch-folder flag (given a temp folder in quick mode)

    def argv(self, json_path: Path, *, quick: bool = False, threads: int | None = 1,
             workdir: Path | None = None) -> list[str]:
        """Arguments after ``python``: the script, its settings, threads, work folder, JSON output."""
        out = [self.script, *(self.quick_args if quick else self.args)]
        if self.threads_flag and threads is not None:
            out += ["--threads", str(threads)]
        if self.workdir_flag and workdir is not None:
            out += [self.workdir_flag, str(workdir)]
        return out + [self.json_flag, str(json_path)]

    def command(self, json_path: Path | None = None, *, quick: bool = False, threads: int | None = 1,
                workdir: Path | None = None) -> str:
        """The command line as a person would type it from the repository root."""
        json_path = json_path if json_path is not None else RESULTS / f"{self.name}.json"
        argv = self.argv(json_path, quick=quick, threads=threads, workdir=workdir)
        return shlex.join(["python", *(display_path(a) for a in argv)])


def display_path(value: str | Path) -> str:
    """``value`` relative to the repository root when it is a path inside it, else unchanged."""
    text = str(value)
    if not text.startswith("/"):
        return text
    try:
        return str(Path(text).resolve().relative_to(REPO))
    except ValueError:
        return text


BENCHES: tuple[Bench, ...] = (
    Bench("foundation_speed", "Foundation: evaluation and training throughput", "bench/bench_foundation.py",
          args=("speed", "--repeats", "5"),
          quick_args=("speed", "--preset", "tiny", "--repeats", "1")),
    Bench("foundation_auroc-phantom", "Foundation: AUROC on phantoms", "bench/bench_foundation.py",
          args=("auroc-phantom", "--n", "4000", "--epochs", "8"),
          quick_args=("auroc-phantom", "--preset", "tiny", "--n", "200", "--epochs", "1")),
    Bench("foundation_auroc-nih", "Foundation: AUROC on the real NIH sample", "bench/bench_foundation.py",
          args=("auroc-nih", "--epochs", "15"),
          quick_args=("auroc-nih", "--preset", "tiny", "--epochs", "1")),
    Bench("monitors", "Monitors: suite time and detection / false-alarm rates", "bench/bench_monitors.py",
          args=(),
          quick_args=("--rows", "500", "--repeats", "1", "--scenarios", "1", "--n-train", "200", "--n-eval", "120",
                      "--size", "32", "--epochs", "1", "--preset", "tiny", "--null-draws", "5", "--null-population", "300")),
    Bench("decide", "Decision latency (durable-rules)", "bench/bench_decide.py",
          args=("--facts", "100", "--repeats", "15"),
          quick_args=("--facts", "10", "--repeats", "2"), threads_flag=False),
    Bench("triage", "Triage loop on cached features (no backbone)", "bench/bench_triage.py",
          args=("--n", "2000", "--repeats", "5"),
          quick_args=("--n", "300", "--repeats", "1")),
    Bench("interventions", "Interventions: wall time and effect beside the paper's cost matrix",
          "bench/bench_interventions.py",
          # issue 5's scenario: DenseNet121 on 2,000 phantoms (the script's defaults are a 5-minute smaller run)
          args=("--n", "2000", "--preset", "densenet121", "--epochs", "8", "--zeroing-max-channels-sweep", "20", "40", "80"),
          quick_args=("--n", "200", "--size", "32", "--preset", "tiny", "--epochs", "1", "--repeats", "1",
                      "--aug-epochs", "1", "--retrain-epochs", "1", "--zeroing-max-channels-sweep", "--nih-epochs", "1",
                      "--timing-rows", "200"),
          json_flag="--out", workdir_flag="--workdir"),
    Bench("compress", "Compression: ours vs torch-pruning", "bench/bench_compress.py",
          args=("--datasets", "phantom", "nih", "--tolerance-row"),
          quick_args=("--quick",), workdir_flag="--work"),
    Bench("backtest", "Backtest: heal / harm on held-out patients, policies against baselines", "bench/bench_backtest.py",
          args=("--datasets", "phantom", "nih", "--seeds-phantom", "10", "--seeds-nih", "5"),
          quick_args=("--quick", "--datasets", "phantom"), workdir_flag="--work"),
    Bench("correct", "Correcting a reported false positive: zeroing at k = 5 / 10, attribution atomicity",
          "bench/bench_correct.py", args=(), quick_args=("--quick",), workdir_flag="--work"),
)


def bench_names() -> list[str]:
    return [b.name for b in BENCHES]


def get_bench(name: str) -> Bench:
    for b in BENCHES:
        if b.name == name:
            return b
    raise KeyError(f"unknown benchmark {name!r}; expected one of: {', '.join(bench_names())}")
