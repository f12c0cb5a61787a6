"""Continual learning on the bundled dense demo model: how much each strategy forgets.

Three testbed tasks (``benchmarks/testbed.py``: mood, parity, more_or_fewer, in that order)
learned one after another by ``launch/continual.py`` on tiny-llama, every variant in this one
process on the same data, steps and seeds:

- ``lora``: one LoRA adapter fine-tuned on each task in turn (the naive baseline),
- ``mixlora``: a fixed MixLoRA of 2 x 3 experts trained on each task in turn, nothing frozen,
- ``dynamic``: 2 fresh experts per task, earlier experts and router rows frozen, no protection,
- ``dynamic+kl``, ``dynamic+replay``, ``dynamic+kl+replay``: with the router KL penalty on
  earlier tasks' samples and/or replay of earlier tasks' samples.

Accuracy: teacher-forced exact match of the one-word answer (and its end of sequence) on each
task's held-out samples. Reports, per variant (mean +- std over seeds): final average accuracy,
average forgetting, backward transfer and adapter parameters.

    python benchmarks/continual_study.py            # 6 variants x 2 seeds (~6 min on 2 cores)
    python benchmarks/continual_study.py --quick    # a few steps (about a minute)

Writes ``benchmarks/results/continual_study.json`` and ``continual_study.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402
from testbed import mean_std, study_machine, task_pairs  # noqa: E402

from moe_peft_ds.commands.continual import main as continual_main  # noqa: E402

TASKS = ("mood", "parity", "more_or_fewer")
VARIANTS = {  # name -> (strategy, extra flags)
    "lora": ("lora", []),
    "mixlora": ("mixlora", []),
    "dynamic": ("dynamic", []),
    "dynamic+kl": ("dynamic", ["--kl-coef", "1.0"]),
    "dynamic+replay": ("dynamic", ["--replay-size", "32"]),
    "dynamic+kl+replay": ("dynamic", ["--kl-coef", "1.0", "--replay-size", "32"]),
}
DEFAULTS = dict(seeds=[0, 1], steps=150, n_train=600, n_eval=100)
QUICK = dict(seeds=[0], steps=3, n_train=40, n_eval=8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: one seed, a few steps")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per task (default {DEFAULTS['steps']})")
    p.add_argument(
        "--n-train", type=int, default=None, help=f"training samples per task (default {DEFAULTS['n_train']})"
    )
    p.add_argument(
        "--n-eval", type=int, default=None, help=f"held-out samples per task (default {DEFAULTS['n_eval']})"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "continual_study.json"), help="result JSON path"
    )
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    return args


def write_tasks(directory: Path, n: int) -> list[str]:
    """Each task's instruction pairs as ``<task>.jsonl``; ``--task`` flags for the launcher."""
    flags = []
    for task in TASKS:
        pairs, _ = task_pairs(task, seed=0, n_train=n, n_eval=1)
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        flags += ["--task", f"{task}={directory / f'{task}.jsonl'}"]
    return flags


def summarise(runs: list[dict]) -> dict:
    table = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        table[variant] = {
            key: mean_std([r["metrics"][key] for r in mine])
            for key in ("final_average_accuracy", "average_forgetting", "backward_transfer")
        }
        table[variant]["adapter_parameters"] = mine[0]["adapter_parameters"]
        table[variant]["experts"] = mine[0]["experts"]
    return table


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Continual learning study ({result['date']}, {result['machine']})",
        "",
        f"tiny-llama, tasks {' -> '.join(TASKS)} ({s['n_train']} training and {s['n_eval']} held-out samples each), "
        f"{s['steps']} steps x batch 8 per task, lr 2e-3, LoRA r=8, 2 experts per task (top-2), seeds {s['seeds']}; "
        "accuracy = teacher-forced exact match of the answer on held-out samples.",
        "",
        "| variant | final average accuracy | average forgetting | backward transfer | adapter params (trainable / total) | experts per FFN |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in result["table"].items():

        def cell(key):
            return f"{row[key]['mean']:.3f} +- {row[key]['std']:.3f}"

        lines.append(
            f"| {variant} | {cell('final_average_accuracy')} | {cell('average_forgetting')} | {cell('backward_transfer')} | "
            f"{row['adapter_parameters']['trainable']:,} / {row['adapter_parameters']['total']:,} | {row['experts']} |"
        )
    lines += [
        "",
        "Accuracy matrix of the first seed (row: after training that task; columns: tasks so far).",
        "",
        "| variant | " + " | ".join(f"after {t}" for t in TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
    ]
    for variant in VARIANTS:
        run = next(r for r in result["runs"] if r["variant"] == variant)
        lines.append(
            f"| {variant} | " + " | ".join(" / ".join(f"{a:.2f}" for a in row) for row in run["accuracy"]) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task_flags = write_tasks(tmp, args.n_train + args.n_eval)
        for seed in args.seeds:
            for variant, (strategy, extra) in VARIANTS.items():
                out = tmp / f"{variant}-{seed}"
                rc = continual_main(
                    [
                        "--model",
                        "tiny-llama",
                        *task_flags,
                        "--strategies",
                        strategy,
                        *extra,
                        "--eval-samples",
                        str(args.n_eval),
                        "--steps-per-task",
                        str(args.steps),
                        "--seed",
                        str(seed),
                        "--no-progress",
                        "--output-dir",
                        str(out),
                    ]
                )
                if rc != 0:
                    raise RuntimeError(f"{variant} (seed {seed}) failed with exit status {rc}")
                record = json.loads((out / strategy / "metrics.json").read_text())
                runs.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "accuracy": record["accuracy"],
                        "metrics": record["metrics"],
                        "adapter_parameters": record["adapter_parameters"][-1],
                        "experts": record["experts"][-1],
                        "losses": record["losses"],
                    }
                )
                print(
                    f"seed {seed} {variant:18s} final avg acc {record['metrics']['final_average_accuracy']:.3f} "
                    f"forgetting {record['metrics']['average_forgetting']:.3f}",
                    flush=True,
                )
    result = {
        "benchmark": "continual_study",
        "date": _dt.date.today().isoformat(),
        "machine": study_machine(),
        "settings": {
            "tasks": list(TASKS),
            "seeds": args.seeds,
            "steps": args.steps,
            "n_train": args.n_train,
            "n_eval": args.n_eval,
            "variants": {k: [s, *f] for k, (s, f) in VARIANTS.items()},
        },
        "runs": runs,
        "table": summarise(runs),
    }
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
