r"""Evaluate a base model, and the base model with an adapter, on multiple-choice tasks.

    python launch/evaluate.py --model tiny-mixtral --adapter out/sieve-demo --tasks arc_easy piqa \
        --source fixtures --output-dir out/eval
    deepspeed --num_gpus 2 launch/evaluate.py --model ... --adapter ... --tasks arc_easy --output-dir out/eval

Tasks: arc_easy, arc_challenge, boolq, openbookqa, piqa, siqa, hellaswag, winogrande, read in
their Hugging Face hub schemas (--source hub), from the bundled fixtures (--source fixtures,
a few items per task, for trying it out), or from a local directory with <task>.jsonl files.
Each option is scored by log-likelihood (acc), length-normalised log-likelihood (acc_norm)
and the next-token logit of its letter (acc_letter); accuracies come with a 95% Wilson
interval. Under the deepspeed launcher the items are split over the ranks and the scores
gathered, and rank 0 writes <output-dir>/eval_results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moe_peft_ds.checkpoint import load_adapter, read_adapter
from moe_peft_ds.cli import check_output_dir, check_positive, run_cli, start_process_group
from moe_peft_ds.config import ConfigError
from moe_peft_ds.evaluate import METRICS, accuracy, score_distributed
from moe_peft_ds.models import DTYPES, PRESETS, load_model
from moe_peft_ds.tasks import TASKS, get_task, load_items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help=f"Hugging Face model id or local path, or a bundled preset: {', '.join(PRESETS)}",
    )
    p.add_argument(
        "--tokenizer", default=None, help="a tokenizer other than the model's own (checked against the model)"
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="an adapter directory (any method of this project); the base model "
        "is evaluated first, then with the adapter (default: base only)",
    )
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help=f"one or more of {sorted(TASKS)}")
    p.add_argument(
        "--source", default="hub", help="hub (default), fixtures (bundled items), or a directory of <task>.jsonl"
    )
    p.add_argument("--split", default=None, help="the split to evaluate (default: each task's usual eval split)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task (default all)")
    p.add_argument(
        "--shots",
        type=int,
        default=0,
        help="solved examples in front of each prompt, from the task's few-shot split (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the model (default fp32)")
    p.add_argument("--output-dir", required=True, help="where eval_results.json is written")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dist-timeout",
        type=int,
        default=1800,
        help="under the deepspeed launcher: seconds a collective may wait for the other ranks; a stopped or "
        "dead rank ends the run within it (default 1800)",
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help="set by the deepspeed launcher; do not pass it yourself"
    )
    return p.parse_args(argv)


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Under the deepspeed launcher: the process group (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    return start_process_group(timeout_s)


def evaluate(model, tokenizer, tasks: dict, args, rank: int, world: int, label: str) -> dict:
    results = {}
    for name, (items, pool) in tasks.items():
        scores = score_distributed(
            model,
            tokenizer,
            items,
            rank,
            world,
            pool=pool,
            shots=args.shots,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.no_progress and rank == 0,
            desc=f"{label} {name}",
        )
        results[name] = accuracy(scores)
    return results


def table(results: dict) -> str:
    runs = list(results)
    head = "| task | metric | " + " | ".join(runs) + (" | delta |" if len(runs) == 2 else " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task in results[runs[0]]:
        for metric in METRICS:
            values = [results[r][task][metric] for r in runs]
            cells = [f"{v['accuracy']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] (n={v['n']})" for v in values]
            delta = f" | {values[1]['accuracy'] - values[0]['accuracy']:+.3f}" if len(runs) == 2 else ""
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + delta + " |")
    return "\n".join(lines)


def run(args) -> int:
    check_positive(
        batch_size=args.batch_size,
        dist_timeout=args.dist_timeout,
        **({"limit": args.limit} if args.limit is not None else {}),
    )
    if args.shots < 0:
        raise ConfigError(f"--shots={args.shots} must be >= 0")
    for name in args.tasks:
        get_task(name)  # an unknown task fails before the model is loaded
    if args.adapter:
        read_adapter(args.adapter)  # a bad adapter fails now, not after the base model was scored
    check_output_dir(Path(args.output_dir))
    tasks = {}
    for name in args.tasks:
        pool = load_items(name, args.source, get_task(name).few_shot_split) if args.shots else None
        tasks[name] = (load_items(name, args.source, args.split, args.limit), pool)
    rank, world = init_distributed(args.dist_timeout)
    model, tokenizer = load_model(args.model, args.dtype, args.tokenizer)
    results = {"base": evaluate(model, tokenizer, tasks, args, rank, world, "base")}
    if args.adapter:
        load_adapter(model, args.adapter)
        results["adapter"] = evaluate(model, tokenizer, tasks, args, rank, world, "adapter")
    if rank == 0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "adapter": args.adapter,
            "shots": args.shots,
            "source": args.source,
            "world_size": world,
            "results": results,
        }
        (out / "eval_results.json").write_text(json.dumps(record, indent=1) + "\n")
        print(table(results))
        print(f"written to {out / 'eval_results.json'}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
