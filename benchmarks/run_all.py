"""Run every benchmark of the project and write one report.

Each benchmark runs in its own process (one after the other, so they never share the
machine), writes its ``<name>.json`` and ``<name>.md`` to ``--results-dir``, and this script
then writes ``REPORT.md`` beside the results directory: the machine and date, every
benchmark's table, and PNG plots (the sieve study's loss curves and accuracy against
trainable parameters; the MixLoRA study's loss curves and accuracy against parameters; the
demo model's routing heatmaps). ``results/run_all.json`` records the date, machine, command
and duration of the run behind each result, and every ``<!-- results:NAME -->`` block of the
``docs/results.md`` is rewritten from them, so each number the docs quote comes from a results file.

    python benchmarks/run_all.py            # full: benchmarks/results/*.json, benchmarks/REPORT.md and docs/results.md's
                                            # result blocks (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # smoke sizes (a few minutes), e.g. into a scratch directory:
    python benchmarks/run_all.py --quick --results-dir /tmp/bench/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
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
    "demo_train": ("demo_train.py", ["--quick"], [], "file"),
    "sieve_study": ("sieve_study.py", ["--quick"], [], "file"),
    "mixlora_study": ("mixlora_study.py", ["--quick"], [], "file"),
    "continual_study": ("continual_study.py", ["--quick"], [], "file"),
    "load_memory": ("load_memory.py", ["--quick"], [], "file"),
    "plans": ("plans.py", ["--quick"], [], "file"),
    "mixed_batch": ("mixed_batch.py", ["--quick"], [], "file"),
    "placement": ("placement.py", ["--quick"], [], "file"),
    "drift_study": ("drift_study.py", ["--quick"], [], "file"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark at its smoke size")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=HERE / "results",
        help="where the JSON/MD/PNG results go (default benchmarks/results)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        default=None,
        help="run these benchmarks only (the report covers all results present)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rewrite the report (and the docs/results.md blocks) from the results present",
    )
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="page whose <!-- results:NAME --> blocks are rewritten from the results (default: the project's "
        "docs/results.md for a full run into benchmarks/results; none for --quick or another --results-dir)",
    )
    args = p.parse_args(argv)
    if args.readme is None and not args.quick and args.results_dir.resolve() == (HERE / "results").resolve():
        args.readme = ROOT / "docs" / "results.md"  # smoke or scratch numbers never reach the docs unless asked
    return args


def run_benchmark(name: str, quick: bool, results: Path) -> dict:
    script, quick_flags, full_flags, output = BENCHMARKS[name]
    out = ["--output-dir", str(results)] if output == "dir" else ["--output", str(results / f"{name}.json")]
    cmd = [sys.executable, str(HERE / script), *(quick_flags if quick else full_flags), *out]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {"seconds": round(time.time() - start, 1), "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_curves(ax, runs: list[dict], key: str, title: str) -> None:
    """One line per ``run[key]``: the training loss, mean over the runs (seeds) that share it."""
    for name in dict.fromkeys(r[key] for r in runs):
        curves = [r["losses"] for r in runs if r[key] == name]
        ax.plot([sum(step) / len(step) for step in zip(*curves)], label=name, linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)


def _accuracy_vs_params(
    ax, points: dict[str, dict[str, tuple[float, float, float]]], xlabel: str = "trainable parameters"
) -> None:
    """``points[series][label] = (params, mean accuracy, std)``, log-scale parameters."""
    for series, rows in points.items():
        xs, ys, errs = zip(*rows.values())
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=series)
        for (x, y, _), label in zip(rows.values(), rows):
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (mean +- std over seeds)")
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path.name


def plot_sieve_study(result: dict, results: Path) -> list[str]:
    """Loss curves (mean over seeds) per task, and accuracy against trainable parameters."""
    plt = _pyplot()
    tasks, configs = result["settings"]["tasks"], result["settings"]["configs"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _loss_curves(ax, [r for r in result["runs"] if r["task"] == task], "config", task)
    names = [_save(fig, results / "sieve_study_loss.png")]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _accuracy_vs_params(
        ax,
        {
            task: {
                c: (
                    result["table"][task][c]["trainable_params"],
                    result["table"][task][c]["accuracy"]["mean"],
                    result["table"][task][c]["accuracy"]["std"],
                )
                for c in configs
            }
            for task in tasks
        },
    )
    names.append(_save(fig, results / "sieve_study_accuracy.png"))
    plt.close("all")
    return names


def plot_mixlora_study(result: dict, results: Path) -> list[str]:
    """Loss curves and mean accuracy over tasks against steps (means over seeds) per method, and
    accuracy against trainable parameters."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    _loss_curves(axes[0], result["runs"], "method", "multi-task training loss")
    for method, row in result["table"].items():
        by_step = row["mean_accuracy_by_step"]
        axes[1].plot([int(k) for k in by_step], list(by_step.values()), marker="o", label=method)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out accuracy, mean over tasks and seeds")
    axes[1].legend(fontsize=7)
    _accuracy_vs_params(
        axes[2],
        {
            "mean over tasks": {
                m: (row["trainable_params"], row["mean_accuracy"]["mean"], row["mean_accuracy"]["std"])
                for m, row in result["table"].items()
            }
        },
    )
    names = [_save(fig, results / "mixlora_study.png")]
    plt.close("all")
    return names


def plot_continual_study(result: dict, results: Path) -> list[str]:
    """Final average accuracy against total adapter parameters, per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _accuracy_vs_params(
        ax,
        {
            "after the last task": {
                v: (
                    row["adapter_parameters"]["total"],
                    row["final_average_accuracy"]["mean"],
                    row["final_average_accuracy"]["std"],
                )
                for v, row in result["table"].items()
            }
        },
        xlabel="adapter parameters (total)",
    )
    names = [_save(fig, results / "continual_study.png")]
    plt.close("all")
    return names


def own_plot(name: str):
    """A benchmark that draws its own ``<name>.png`` beside its results."""
    return lambda result, results: [f"{name}.png"] if (results / f"{name}.png").exists() else []


PLOTS = {
    "sieve_study": plot_sieve_study,
    "mixlora_study": plot_mixlora_study,
    "continual_study": plot_continual_study,
    "drift_study": own_plot("drift_study"),
}


def machine() -> str:
    import torch

    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def record_runs(results: Path, runs: dict, quick: bool) -> dict:
    """``run_all.json``: for every benchmark, the date, command and duration of the run that wrote
    its results, and the machine (kept across ``--only`` runs)."""
    path = results / "run_all.json"
    record = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
    today = _dt.date.today().isoformat()
    for name, run in runs.items():
        record["benchmarks"][name] = {**run, "date": today, "quick": quick, "machine": machine()}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _body(results: Path, name: str) -> list[str]:
    """The benchmark's own markdown, its title line (and the blank lines after it) left out."""
    lines = [line for line in (results / f"{name}.md").read_text().splitlines() if not line.startswith("# ")]
    while lines and not lines[0].strip():
        lines.pop(0)
    return lines


def readme_block(results: Path, name: str) -> str:
    """What docs/results.md shows for ``name``: where the numbers come from, then the benchmark's tables."""
    run = (
        json.loads((results / "run_all.json").read_text())["benchmarks"].get(name)
        if (results / "run_all.json").exists()
        else None
    )
    if run is None:
        source = f"From `benchmarks/results/{name}.json`, **not written by `run_all.py`** (run it to refresh)."
    else:
        source = (
            f"From `benchmarks/results/{name}.json`, written by `python benchmarks/run_all.py{' --quick' if run['quick'] else ''}` "
            f"on {run['date']} ({run['machine']}; `python {run['command']}`, {run['seconds']:.0f} s)."
        )
    return "\n".join([source, "", *_body(results, name)]).rstrip() + "\n"


README_BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def update_readme(readme: Path, results: Path) -> list[str]:
    """Rewrite every ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block of ``readme`` from
    the results present; returns the names rewritten."""
    names = []

    def fill(match):
        names.append(match.group(2))
        return match.group(1) + readme_block(results, match.group(2)) + match.group(4)

    readme.write_text(README_BLOCK.sub(fill, readme.read_text()))
    return names


def write_report(results: Path, runs: dict, quick: bool) -> Path:
    """``REPORT.md`` next to ``results``: every result present, with its table and plots."""
    report = results.parent / "REPORT.md"
    rel = results.name
    lines = [
        "# Benchmark report",
        "",
        f"Written by `benchmarks/run_all.py{' --quick' if quick else ''}` on {_dt.date.today().isoformat()}, {machine()}.",
        "Each section is the table its benchmark wrote (its JSON holds every number, the machine and the date); "
        "`results/run_all.json` records the run that wrote it.",
        "",
    ]
    for name in BENCHMARKS:
        if not (results / f"{name}.md").exists():
            continue
        lines += [f"## {name}", ""]
        if name in runs:
            lines += [f"`python {runs[name]['command']}` ({runs[name]['seconds']} s)", ""]
        lines += _body(results, name) + [""]
        if name in PLOTS:
            for png in PLOTS[name](json.loads((results / f"{name}.json").read_text()), results):
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
    recorded = record_runs(args.results_dir, runs, args.quick)["benchmarks"]  # earlier runs' too (--only)
    report = write_report(args.results_dir, recorded, args.quick)
    print(f"wrote {report}")
    if args.readme is not None:
        print(f"docs/results.md blocks rewritten: {update_readme(args.readme, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
