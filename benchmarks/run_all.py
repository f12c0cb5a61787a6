"""Run every benchmark of the project and write one report.

Each benchmark runs in its own process (one after the other, so they never share the
machine), writes its ``<name>.json`` and ``<name>.md`` to ``--results-dir``, and this script
then writes ``REPORT.md`` beside the results directory: the machine and date, every
benchmark's table, and PNG plots (the sieve study's loss curves and accuracy against
trainable parameters; the demo model's routing heatmaps).

    python benchmarks/run_all.py            # full: benchmarks/results/*.json + benchmarks/REPORT.md (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # smoke sizes (a few minutes), e.g. into a scratch directory:
    python benchmarks/run_all.py --quick --results-dir /tmp/bench/results
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

# name -> (script, flags for --quick, flags for the full run, how the output is named)
BENCHMARKS = {
    "step_time": ("step_time.py", ["--quick", "--steps", "2", "--warmup", "0", "--no-memory"], [], "file"),
    "ep_dispatch": ("ep_dispatch.py", ["--quick"], [], "file"),
    "mixlora": ("mixlora.py", ["--quick"], [], "file"),
    "demo_routing": ("demo_routing.py", ["--calibration-samples", "32"], [], "dir"),
    "sieve_study": ("sieve_study.py", ["--quick"], [], "file"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark at its smoke size")
    p.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON/MD/PNG results go (default benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run these benchmarks only (the report covers all results present)")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite the report from the results present")
    return p.parse_args(argv)


def run_benchmark(name: str, quick: bool, results: Path) -> dict:
    script, quick_flags, full_flags, output = BENCHMARKS[name]
    out = ["--output-dir", str(results)] if output == "dir" else ["--output", str(results / f"{name}.json")]
    cmd = [sys.executable, str(HERE / script), *(quick_flags if quick else full_flags), *out]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {"seconds": round(time.time() - start, 1), "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}


def plot_sieve_study(result: dict, results: Path) -> list[str]:
    """Loss curves (mean over seeds) per task, and accuracy against trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, configs = result["settings"]["tasks"], result["settings"]["configs"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for config in configs:
            curves = [r["losses"] for r in result["runs"] if r["task"] == task and r["config"] == config]
            mean = [sum(step) / len(step) for step in zip(*curves)]
            ax.plot(mean, label=config, linewidth=1)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "sieve_study_loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task in tasks:
        rows = result["table"][task]
        xs = [rows[c]["trainable_params"] for c in configs]
        ys = [rows[c]["accuracy"]["mean"] for c in configs]
        errs = [rows[c]["accuracy"]["std"] for c in configs]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=task)
        for x, y, c in zip(xs, ys, configs):
            ax.annotate(c, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out accuracy (mean +- std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "sieve_study_accuracy.png", dpi=100)
    plt.close(fig)
    return ["sieve_study_loss.png", "sieve_study_accuracy.png"]


def write_report(results: Path, runs: dict, quick: bool) -> Path:
    """``REPORT.md`` next to ``results``: every result present, with its table and plots."""
    report = results.parent / "REPORT.md"
    rel = results.name
    lines = ["# Benchmark report", "",
             f"Written by `benchmarks/run_all.py{' --quick' if quick else ''}` on {_dt.date.today().isoformat()}, "
             f"{platform.platform()}, {platform.processor() or platform.machine()}, python {platform.python_version()}.",
             "Each section is the table its benchmark wrote (its JSON holds every number, the machine and the date).", ""]
    for name in BENCHMARKS:
        md = results / f"{name}.md"
        if not md.exists():
            continue
        lines += [f"## {name}", ""]
        if name in runs:
            lines += [f"`python {runs[name]['command']}` ({runs[name]['seconds']} s)", ""]
        body = md.read_text().splitlines()
        lines += [line for line in body if not line.startswith("# ")] + [""]
        if name == "sieve_study":
            for png in plot_sieve_study(json.loads((results / f"{name}.json").read_text()), results):
                lines += [f"![{png}]({rel}/{png})", ""]
        if name == "demo_routing":
            lines += [f"![{p.name}]({rel}/{p.name})" for p in sorted(results.glob("demo_routing_*.png"))] + [""]
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    if not args.report_only:
        for name in args.only or BENCHMARKS:
            print(f"running {name} ...", flush=True)
            runs[name] = run_benchmark(name, args.quick, args.results_dir)
    report = write_report(args.results_dir, runs, args.quick)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
