"""MixLoRA / MixDoRA quality study on the bundled dense demo model (tiny-llama: 4 layers, hidden 64,
FFN 256, pretrained on the same corpus as tiny-mixtral by ``launch/build_demo_model.py --arch llama``).

Multi-task training: one adapter per run learns the mix of the testbed tasks
(``benchmarks/testbed.py``: their training pairs shuffled together) and is evaluated on each
task's held-out multiple-choice items. Four methods at matched trainable-parameter budgets:

- ``mixlora``: ``--experts`` LoRA experts of rank ``--r`` per FFN, top-``--top-k`` routing,
  load-balancing loss, LoRA of rank ``--r`` on attention (the paper's layout),
- ``mixdora``: the same with DoRA experts and DoRA attention,
- ``lora`` / ``dora``: one adapter on every linear (attention and FFN) whose rank is chosen so
  that its trainable-parameter count is the closest to ``mixlora``'s (a plain LoRA adapter on a
  dense model is MixLoRA with one expert; tested equal to PEFT's LoRA and DoRA).

And a sweep of MixLoRA's router settings (``--sweep``, on by default): the balancing-loss
coefficient (0, 0.001 as the reference's default, 0.01 as the paper's) with top-k and with
dynamic (top-p 0.8) routing, each on the same seeds; ``mixlora`` itself is the top-k / 0.01 cell.
The loss is pooled over the layers (``router_aux_loss_pooling="pooled"``, the default).

For every seed the four run one after the other in one process on the same batches. Each run
reports the held-out accuracy per task, trainable parameters, the peak memory one training step
adds (RSS high-water mark over the step; CPU, approximate) and the median time of a step. The
summary gives mean +- std over seeds and, against the MixLoRA paper's claims, the accuracy
differences in points and the memory and step-time ratios. Nothing is chosen on the eval split:
the hyper-parameters are fixed, the same for every method, and recorded.

    python benchmarks/mixlora_study.py            # 4 tasks x 3 seeds x (4 methods + 5 sweep cells) (~20 min on 2 cores)
    python benchmarks/mixlora_study.py --quick    # 1 task, 1 seed, a few steps (seconds)

Writes ``benchmarks/results/mixlora_study.json`` and ``mixlora_study.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402
from testbed import TASK_NAMES, fine_tune, held_out_accuracy, mean_std, study_machine, task_pairs  # noqa: E402

from moe_peft_ds import MixLoRAConfig, apply_mixlora  # noqa: E402
from moe_peft_ds.data import encode  # noqa: E402
from moe_peft_ds.models import load_model  # noqa: E402
from moe_peft_ds.train import count_trainable  # noqa: E402

METHODS = ("lora", "dora", "mixlora", "mixdora")
SWEEP = {  # name -> MixLoRA router settings; "mixlora" is routing topk, coefficient 0.01
    f"mixlora[{routing},aux={coef:g}]": dict(routing=routing, router_aux_loss_coef=coef)
    for routing in ("topk", "dynamic")
    for coef in (0.0, 0.001, 0.01)
    if (routing, coef) != ("topk", 0.01)
}
DEFAULTS = dict(
    tasks=list(TASK_NAMES),
    seeds=[0, 1, 2],
    methods=list(METHODS),
    steps=300,
    eval_every=100,
    batch_size=16,
    lr=2e-3,
    n_train=1000,
    n_eval=200,
)
QUICK = dict(
    tasks=["parity"],
    seeds=[0],
    methods=list(METHODS),
    steps=4,
    eval_every=2,
    batch_size=8,
    lr=2e-3,
    n_train=64,
    n_eval=16,
)
CLAIMS = {  # the MixLoRA paper and the seed notes, as this study checks them
    "mixlora - lora (pp)": "paper: MixLoRA about 9 pp above PEFT baselines in multi-task training (at a larger budget)",
    "mixdora - dora (pp)": "paper: MixDoRA above DoRA",
    "dora - lora (pp)": "notes: DoRA generally above LoRA",
    "peak memory mixlora/lora": "notes (Mistral-7B): about 1.0 (55.8 vs 55.2 GB), at 6x the parameters",
    "step time mixlora/lora": "MixLoRA routes every token through top-k experts: slower than LoRA",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: one task, one seed, a few steps")
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES,
        default=None,
        help=f"tasks trained together, of {' '.join(TASK_NAMES)} (default {' '.join(DEFAULTS['tasks'])})",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds; each gives every method one run (default 0 1 2)"
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods (default all four)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also evaluate after every this many steps: accuracy against "
        f"steps, how fast each method learns (default {DEFAULTS['eval_every']})",
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per step (default {DEFAULTS['batch_size']})")
    p.add_argument(
        "--lr", type=float, default=None, help=f"AdamW learning rate, every method (default {DEFAULTS['lr']})"
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
    p.add_argument("--experts", type=int, default=8, help="MixLoRA experts per FFN (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="MixLoRA experts per token (default 2)")
    p.add_argument(
        "--r",
        type=int,
        default=4,
        help="MixLoRA rank of every expert and of attention LoRA (default 4); "
        "LoRA/DoRA get the rank that matches MixLoRA's trainable parameters",
    )
    p.add_argument("--alpha-over-r", type=float, default=2.0, help="alpha = this x rank, every method (default 2)")
    p.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also run the router sweep {list(SWEEP)} (default: on, off with --quick)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "mixlora_study.json"), help="result JSON path"
    )
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    if args.sweep is None:
        args.sweep = not args.quick
    if args.eval_every < 1:
        p.error(f"--eval-every {args.eval_every} must be >= 1")
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k {args.top_k} must be in [1, --experts {args.experts}]")
    return args


def method_config(method: str, rank: int, args) -> MixLoRAConfig:
    mixture = method.startswith("mix")
    dora = method in ("dora", "mixdora")  # the sweep's cells are MixLoRA
    return MixLoRAConfig(
        method="mixdora" if dora else "mixlora",
        r=rank,
        alpha=args.alpha_over_r * rank,
        num_experts=args.experts if mixture else 1,
        top_k=args.top_k if mixture else 1,
        **SWEEP.get(method, {}),
    )


def trainable_with(base, method: str, rank: int, args) -> int:
    return count_trainable(apply_mixlora(copy.deepcopy(base), method_config(method, rank, args)))


def matched_ranks(base, args) -> dict[str, int]:
    """The rank of every method: MixLoRA's is ``--r``; LoRA/DoRA's makes its trainable-parameter
    count closest to MixLoRA's (counts are linear in the rank, so two probes suffice)."""
    ranks = {"mixlora": args.r, "mixdora": args.r}
    hidden = base.config.hidden_size
    for plain, mixture in (("lora", "mixlora"), ("dora", "mixdora")):
        target = trainable_with(base, mixture, args.r, args)
        one, two = trainable_with(base, plain, 1, args), trainable_with(base, plain, 2, args)
        ranks[plain] = min(hidden, max(1, round((target - one) / (two - one)) + 1))
    return ranks


def run_one(base, tokenizer, examples, items_by_task, method: str, rank: int, seed: int, args) -> dict:
    """Train one method on the task mix from the frozen base; evaluate it on every task."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_mixlora(model, method_config(method, rank, args))
    run = fine_tune(
        model,
        tokenizer,
        examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        evaluate=lambda: {task: held_out_accuracy(model, tokenizer, items) for task, items in items_by_task.items()},
        eval_every=args.eval_every,
        memory_step=min(2, args.steps - 1),
    )  # optimizer state exists by step 2
    curve = {step: statistics.mean(acc.values()) for step, acc in run["evals"].items()}
    return {
        "accuracy": run["evals"][args.steps],
        "mean_accuracy": curve[args.steps],
        "accuracy_by_step": curve,
        "rank": rank,
        "trainable_params": count_trainable(model),
        "peak_step_memory_bytes": run["peak_step_memory_bytes"],
        "step_time_s": run["step_time_s"],
        "losses": run["losses"],
    }


def summarise(runs: list[dict], tasks: list[str], methods: list[str]) -> dict:
    table = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        peaks = [r["peak_step_memory_bytes"] for r in mine if r["peak_step_memory_bytes"] is not None]
        table[method] = {
            "rank": mine[0]["rank"],
            "mean_accuracy": mean_std([r["mean_accuracy"] for r in mine]),
            "mean_accuracy_by_step": {
                step: statistics.mean(r["accuracy_by_step"][step] for r in mine)
                for step in mine[0]["accuracy_by_step"]
            },
            "accuracy": {t: mean_std([r["accuracy"][t] for r in mine]) for t in tasks},
            "trainable_params": mine[0]["trainable_params"],
            "peak_step_memory_bytes": statistics.median(peaks) if peaks else None,
            "step_time_s": statistics.mean(r["step_time_s"] for r in mine),
        }
    return table


def claims(table: dict) -> dict:
    found = {}
    for a, b in (("mixlora", "lora"), ("mixdora", "dora"), ("dora", "lora")):
        if a in table and b in table:
            found[f"{a} - {b} (pp)"] = 100 * (table[a]["mean_accuracy"]["mean"] - table[b]["mean_accuracy"]["mean"])
    if "mixlora" in table and "lora" in table:
        mem = (table["mixlora"]["peak_step_memory_bytes"], table["lora"]["peak_step_memory_bytes"])
        if None not in mem:
            found["peak memory mixlora/lora"] = mem[0] / mem[1]
        found["step time mixlora/lora"] = table["mixlora"]["step_time_s"] / table["lora"]["step_time_s"]
        found["trainable params mixlora/lora"] = (
            table["mixlora"]["trainable_params"] / table["lora"]["trainable_params"]
        )
    return found


def markdown(result: dict) -> str:
    s = result["settings"]
    tasks = s["tasks"]
    lines = [
        f"# MixLoRA / MixDoRA quality study ({result['date']}, {result['machine']})",
        "",
        f"tiny-llama (dense, 4 layers, hidden 64, FFN 256), one adapter trained on the mix of {', '.join(tasks)}; "
        f"{s['steps']} steps x batch {s['batch_size']}, lr {s['lr']}, alpha = {s['alpha_over_r']} x rank, seeds {s['seeds']}; "
        f"MixLoRA: {s['experts']} experts, top-{s['top_k']}, rank {s['r']} (experts and attention). Accuracy = held-out "
        "multiple choice (log-likelihood of each answer). Peak memory = RSS rise over one training step.",
        "",
        "| method | rank | trainable params | mean accuracy | "
        + " | ".join(tasks)
        + " | peak step memory | step ms |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
        "| base (untrained) | - | - | "
        + f"{statistics.mean(result['base_accuracy'].values()):.3f} | "
        + " | ".join(f"{result['base_accuracy'][t]:.3f}" for t in tasks)
        + " | - | - |",
    ]
    for method, row in result["table"].items():
        mem = row["peak_step_memory_bytes"]
        lines.append(
            f"| {method} | {row['rank']} | {row['trainable_params']:,} | {row['mean_accuracy']['mean']:.3f} +- "
            f"{row['mean_accuracy']['std']:.3f} | "
            + " | ".join(f"{row['accuracy'][t]['mean']:.3f} +- {row['accuracy'][t]['std']:.3f}" for t in tasks)
            + f" | {'n/a' if mem is None else f'{mem / 2**20:.2f} MiB'} | {1000 * row['step_time_s']:.1f} |"
        )
    steps = list(next(iter(result["table"].values()))["mean_accuracy_by_step"])
    lines += [
        "",
        "Mean accuracy over tasks after each number of steps (mean over seeds): how fast each method learns.",
        "",
        "| method | " + " | ".join(f"step {k}" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    lines += [
        f"| {m} | " + " | ".join(f"{row['mean_accuracy_by_step'][k]:.3f}" for k in steps) + " |"
        for m, row in result["table"].items()
    ]
    lines += sweep_table(result["table"])
    lines += ["", "| comparison | measured here | the claim |", "|---|---|---|"]
    lines += [f"| {k} | {v:+.3f} | {result['paper_claims'].get(k, '-')} |" for k, v in result["claims"].items()]
    return "\n".join(lines) + "\n"


def sweep_table(table: dict) -> list[str]:
    """Mean accuracy (+- std over seeds) of MixLoRA per routing and balancing coefficient."""
    cells = {("topk", 0.01): table.get("mixlora")}
    cells.update({(cfg["routing"], cfg["router_aux_loss_coef"]): table.get(name) for name, cfg in SWEEP.items()})
    if not any(row is not None for key, row in cells.items() if key != ("topk", 0.01)):
        return []
    coefs = sorted({c for _, c in cells})
    lines = [
        "",
        "MixLoRA's router sweep: mean accuracy over tasks (+- std over seeds), balancing loss pooled over layers.",
        "",
        "| routing | " + " | ".join(f"aux coef {c:g}" for c in coefs) + " |",
        "|---|" + "---|" * len(coefs),
    ]
    for routing in ("topk", "dynamic"):
        row = [cells.get((routing, c)) for c in coefs]
        lines.append(
            f"| {routing} | "
            + " | ".join(
                "-" if r is None else f"{r['mean_accuracy']['mean']:.3f} +- {r['mean_accuracy']['std']:.3f}"
                for r in row
            )
            + " |"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("tiny-llama")
    base.requires_grad_(False)
    examples, items_by_task = [], {}
    for task in args.tasks:  # the data is fixed; seeds vary initialisation and batch order
        pairs, items_by_task[task] = task_pairs(task, seed=0, n_train=args.n_train, n_eval=args.n_eval)
        examples += [encode(p, tokenizer, 128) for p in pairs]
    random.Random(0).shuffle(examples)
    base_accuracy = {task: held_out_accuracy(base, tokenizer, items) for task, items in items_by_task.items()}
    ranks = matched_ranks(base, args)
    methods = list(args.methods) + (list(SWEEP) if args.sweep else [])
    ranks.update({name: args.r for name in SWEEP})
    runs = []
    for seed in args.seeds:
        for method in methods:
            row = run_one(base, tokenizer, examples, items_by_task, method, ranks[method], seed, args)
            runs.append({"method": method, "seed": seed, **row})
            print(
                f"seed {seed} {method:22s} r={row['rank']:<3d} params {row['trainable_params']:>7,d} acc {row['mean_accuracy']:.3f} "
                f"step {1000 * row['step_time_s']:.1f} ms",
                flush=True,
            )
    table = summarise(runs, args.tasks, methods)
    result = {
        "benchmark": "mixlora_study",
        "date": _dt.date.today().isoformat(),
        "machine": study_machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "tasks",
                "seeds",
                "methods",
                "steps",
                "eval_every",
                "batch_size",
                "lr",
                "n_train",
                "n_eval",
                "experts",
                "top_k",
                "r",
                "alpha_over_r",
                "sweep",
            )
        },
        "router_defaults": {
            k: getattr(MixLoRAConfig(), k)
            for k in (
                "router_aux_loss_coef",
                "router_aux_loss_pooling",
                "top_p",
                "top_p_renormalize",
                "top_p_max_experts",
            )
        },
        "paper_claims": CLAIMS,
        "base_accuracy": base_accuracy,
        "runs": runs,
        "table": table,
        "claims": claims(table),
    }
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
