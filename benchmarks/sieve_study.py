"""MoE-Sieve quality study on the bundled demo MoE (tiny-mixtral: 4 layers x 16 experts, top-2).

For every task of ``benchmarks/testbed.py`` and every seed, one process fine-tunes side by
side (configurations interleaved within a seed, so machine noise hits all alike):

- ``all``: LoRA on every expert (the baseline the paper compares with),
- ``top25`` (the sieve: top-k by routed-token counts, 25% of the experts per layer),
  ``top12.5``, ``top50``,
- ``coverage``: per layer the fewest experts reaching ``--coverage`` of the routed tokens (ESFT),
- ``random25``: 25% per layer at random (seeded per run),
- ``greedy25``: the same total budget spent greedily over layers.

The routing profile comes from the task's training split only (never the eval split); the
model, data, seeds and every hyper-parameter are fixed and recorded. Each run reports the
held-out multiple-choice accuracy (log-likelihood of each option), trainable parameters,
adapter bytes and the median time of a training step. The summary gives mean +- std over
seeds per task and configuration, and, against the paper's claims, the accuracy difference
to ``all`` in points and the parameter and step-time ratios.

    python benchmarks/sieve_study.py            # 3 tasks x 3 seeds x 7 configurations (~35 min on 2 cores)
    python benchmarks/sieve_study.py --quick    # 1 task, 1 seed, 2 configurations (seconds)

Writes ``benchmarks/results/sieve_study.json`` and ``sieve_study.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402
from testbed import TASK_NAMES, fine_tune, held_out_accuracy, mean_std, profiled_task, study_machine  # noqa: E402

from moe_peft_ds import AdapterConfig, all_experts_selection, apply_sieve_lora, select_experts  # noqa: E402
from moe_peft_ds.checkpoint import adapter_nbytes  # noqa: E402
from moe_peft_ds.models import load_model  # noqa: E402
from moe_peft_ds.train import count_trainable  # noqa: E402

CONFIGS = ("all", "top25", "top12.5", "top50", "coverage", "random25", "greedy25")
# operator is left out by default: at this size and budget no configuration learns it (chance level)
DEFAULTS = dict(
    tasks=["mood", "parity", "more_or_fewer"],
    seeds=[0, 1, 2],
    configs=list(CONFIGS),
    steps=240,
    eval_every=80,
    batch_size=16,
    lr=3e-3,
    n_train=1000,
    n_eval=200,
    calibration=256,
)
QUICK = dict(
    tasks=["parity"],
    seeds=[0],
    configs=["all", "top25"],
    steps=4,
    eval_every=2,
    batch_size=8,
    lr=3e-3,
    n_train=64,
    n_eval=16,
    calibration=32,
)
CLAIMS = {  # the MoE-Sieve paper's claims, as this study checks them
    "top25 within 1 pp of all": "accuracy top25 - all, in points, |x| <= 1",
    "random about 2.5 pp worse than top25": "accuracy random25 - top25, in points, about -2.5",
    "greedy no better than top-k": "accuracy greedy25 - top25, in points, <= 0",
    "70-73% fewer trainable parameters": "1 - params top25/all in [0.70, 0.73]",
    "up to 50% less training time": "1 - step time top25/all, up to 0.5",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: one task, one seed, two configurations, a few steps"
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES,
        default=None,
        help=f"tasks, of {' '.join(TASK_NAMES)} (default {' '.join(DEFAULTS['tasks'])})",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds; each gives every configuration one run (default 0 1 2)",
    )
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=None, help="configurations (default all seven)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also evaluate after every this many steps: accuracy against "
        f"steps, how fast each configuration learns (default {DEFAULTS['eval_every']})",
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per step (default {DEFAULTS['batch_size']})")
    p.add_argument(
        "--lr", type=float, default=None, help=f"AdamW learning rate, every configuration (default {DEFAULTS['lr']})"
    )
    p.add_argument(
        "--n-train", type=int, default=None, help=f"training pairs per task (default {DEFAULTS['n_train']})"
    )
    p.add_argument(
        "--n-eval",
        type=int,
        default=None,
        help=f"held-out multiple-choice items per task (default {DEFAULTS['n_eval']})",
    )
    p.add_argument(
        "--calibration", type=int, default=None, help="training samples profiled for the selection (default 256)"
    )
    p.add_argument(
        "--coverage", type=float, default=0.5, help="routed-token share for the coverage policy (default 0.5)"
    )
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "sieve_study.json"), help="result JSON path"
    )
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    if args.eval_every < 1:
        p.error(f"--eval-every {args.eval_every} must be >= 1")
    return args


def selections(model, profile, config: str, seed: int, coverage: float) -> dict[int, list[int]]:
    if config == "all":
        return all_experts_selection(model)
    policy, fraction = {
        "top25": ("topk", 0.25),
        "top12.5": ("topk", 0.125),
        "top50": ("topk", 0.5),
        "coverage": ("coverage", None),
        "random25": ("random", 0.25),
        "greedy25": ("greedy", 0.25),
    }[config]
    if policy == "coverage":
        return select_experts(profile, policy="coverage", fraction=None, coverage=coverage)
    return select_experts(profile, policy=policy, fraction=fraction, seed=seed)


def run_one(base, tokenizer, train_examples, items, selection, config: str, seed: int, args) -> dict:
    """Fine-tune one configuration from the frozen base and evaluate it on the held-out items."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_sieve_lora(
        model,
        selection,
        AdapterConfig(method="lora" if config == "all" else "sieve", r=args.lora_r, alpha=args.lora_alpha),
    )
    run = fine_tune(
        model,
        tokenizer,
        train_examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        evaluate=lambda: held_out_accuracy(model, tokenizer, items),
        eval_every=args.eval_every,
    )
    return {
        "accuracy": run["evals"][args.steps],
        "accuracy_by_step": run["evals"],
        "trainable_params": count_trainable(model),
        "adapter_bytes": adapter_nbytes(model),
        "step_time_s": run["step_time_s"],
        "losses": run["losses"],
        "experts_per_layer": statistics.mean(len(v) for v in selection.values()),
    }


def summarise(runs: list[dict], tasks: list[str], configs: list[str]) -> dict:
    """Per task and configuration: mean/std of accuracy over seeds, and the mean cost figures."""
    table = {}
    for task in tasks:
        for config in configs:
            mine = [r for r in runs if r["task"] == task and r["config"] == config]
            table.setdefault(task, {})[config] = {
                "accuracy": mean_std([r["accuracy"] for r in mine]),
                "accuracy_by_step": {
                    k: statistics.mean(r["accuracy_by_step"][k] for r in mine) for k in mine[0]["accuracy_by_step"]
                },
                "seed_variance": statistics.pvariance([r["accuracy"] for r in mine]) if len(mine) > 1 else 0.0,
                **{
                    k: statistics.mean(r[k] for r in mine)
                    for k in ("trainable_params", "adapter_bytes", "step_time_s", "experts_per_layer")
                },
            }
    return table


def claims(table: dict, tasks: list[str], configs: list[str]) -> dict:
    """The paper's claims against this study's numbers, averaged over tasks."""

    def mean_over_tasks(config, key="accuracy"):
        return statistics.mean(
            table[t][config][key]["mean"] if key == "accuracy" else table[t][config][key] for t in tasks
        )

    found = {}
    if {"all", "top25"} <= set(configs):
        found["top25 - all (pp)"] = 100 * (mean_over_tasks("top25") - mean_over_tasks("all"))
        found["1 - params top25/all"] = 1 - mean_over_tasks("top25", "trainable_params") / mean_over_tasks(
            "all", "trainable_params"
        )
        found["1 - adapter bytes top25/all"] = 1 - mean_over_tasks("top25", "adapter_bytes") / mean_over_tasks(
            "all", "adapter_bytes"
        )
        found["1 - step time top25/all"] = 1 - mean_over_tasks("top25", "step_time_s") / mean_over_tasks(
            "all", "step_time_s"
        )
    if {"random25", "top25"} <= set(configs):
        found["random25 - top25 (pp)"] = 100 * (mean_over_tasks("random25") - mean_over_tasks("top25"))
    if {"greedy25", "top25"} <= set(configs):
        found["greedy25 - top25 (pp)"] = 100 * (mean_over_tasks("greedy25") - mean_over_tasks("top25"))
    return found


def markdown(result: dict) -> str:
    lines = [
        f"# MoE-Sieve quality study ({result['date']}, {result['machine']})",
        "",
        f"tiny-mixtral (4 layers x 16 experts, top-2), {result['settings']['steps']} steps x batch "
        f"{result['settings']['batch_size']}, lr {result['settings']['lr']}, LoRA r={result['settings']['lora_r']}, "
        f"seeds {result['settings']['seeds']}; accuracy = held-out multiple choice (log-likelihood of each answer; "
        "mood, parity and more_or_fewer have 2 answers, operator 3; the testbed is balanced).",
        "",
        "| task | config | experts/layer | accuracy (mean +- std) | trainable params | adapter KB | step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, rows in result["table"].items():
        lines.append(f"| {task} | base (untrained) | - | {result['base_accuracy'][task]:.3f} | - | - | - |")
        for config, row in rows.items():
            acc = row["accuracy"]
            lines.append(
                f"| {task} | {config} | {row['experts_per_layer']:.2f} | {acc['mean']:.3f} +- {acc['std']:.3f} | "
                f"{row['trainable_params']:,.0f} | {row['adapter_bytes'] / 1024:.0f} | {1000 * row['step_time_s']:.1f} |"
            )
    steps = list(next(iter(next(iter(result["table"].values())).values()))["accuracy_by_step"])
    lines += [
        "",
        "Held-out accuracy after each number of steps (mean over seeds): how fast each configuration learns.",
        "",
        "| task | config | " + " | ".join(f"step {k}" for k in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    lines += [
        f"| {task} | {config} | " + " | ".join(f"{row['accuracy_by_step'][k]:.3f}" for k in steps) + " |"
        for task, rows in result["table"].items()
        for config, row in rows.items()
    ]
    lines += [
        "",
        "Routing skew of the base model on each task's training prompts (the sieve's premise): share of routed "
        "tokens the top 25% of experts receive, mean over layers (0.25 = uniform).",
        "",
        "| task | top-25% coverage | normalised entropy |",
        "|---|---|---|",
    ]
    for task, layers in result["routing_skew"].items():
        cov = statistics.mean(v["top_coverage"] for v in layers.values())
        ent = statistics.mean(v["entropy"] for v in layers.values())
        lines.append(f"| {task} | {cov:.3f} | {ent:.3f} |")
    lines += ["", "| claim (paper) | measured here, mean over tasks |", "|---|---|"]
    lines += [f"| {k} | {v:+.3f} |" for k, v in result["claims"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("tiny-mixtral")
    base.requires_grad_(False)
    runs, base_accuracy, profiles = [], {}, {}
    for task in args.tasks:
        examples, items, _, profile = profiled_task(base, tokenizer, task, args.n_train, args.n_eval, args.calibration)
        profiles[task] = profile.skew()
        base_accuracy[task] = held_out_accuracy(base, tokenizer, items)
        for seed in args.seeds:
            for config in args.configs:
                selection = selections(base, profile, config, seed, args.coverage)
                row = run_one(base, tokenizer, examples, items, selection, config, seed, args)
                runs.append({"task": task, "config": config, "seed": seed, **row})
                print(
                    f"{task:14s} seed {seed} {config:9s} acc {row['accuracy']:.3f} params {row['trainable_params']:>8,d} "
                    f"step {1000 * row['step_time_s']:.1f} ms",
                    flush=True,
                )
    table = summarise(runs, args.tasks, args.configs)
    result = {
        "benchmark": "sieve_study",
        "date": _dt.date.today().isoformat(),
        "machine": study_machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "tasks",
                "seeds",
                "configs",
                "steps",
                "eval_every",
                "batch_size",
                "lr",
                "n_train",
                "n_eval",
                "calibration",
                "coverage",
                "lora_r",
                "lora_alpha",
            )
        },
        "paper_claims": CLAIMS,
        "base_accuracy": base_accuracy,
        "routing_skew": profiles,
        "runs": runs,
        "table": table,
        "claims": claims(table, args.tasks, args.configs),
    }
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
