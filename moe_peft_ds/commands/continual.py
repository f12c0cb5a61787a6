r"""Learn tasks one after another with MixLoRA's dynamic experts, and measure forgetting against
baselines that forget.

For each task in order (``dynamic``): every MixLoRA layer gets --experts-per-task fresh LoRA
experts and router rows; all earlier experts are frozen, and the earlier router rows too unless
--train-old-router; the new experts and router rows train on the task (plus --replay-size
samples of each earlier task, and a KL penalty keeping the router's distribution on earlier
tasks' samples where it was, --kl-coef); rarely routed experts are pruned (--prune-threshold)
and near-duplicates merged (--merge-threshold); the model is evaluated on every task seen so
far and the whole pool is saved, each expert's task in adapter_config.json.

    python launch/continual.py --model tiny-llama --task mood=data/mood.jsonl --task parity=data/parity.jsonl \
        --experts-per-task 2 --kl-coef 1 --replay-size 16 --output-dir out/continual
    deepspeed --num_gpus 2 launch/continual.py ... --deepspeed_config ds_configs/zero2_fp32.json [--ep-size 2]

--strategies also runs the baselines, on the same tasks, data and steps: ``lora`` (one LoRA
adapter, every FFN and the same attention targets, fine-tuned on each task in turn) and
``mixlora`` (a fixed MixLoRA of experts-per-task x tasks experts trained on each task in turn,
nothing frozen); neither replays nor uses the KL penalty. Each strategy writes
<output-dir>/<strategy>/: stage_<i>_<task>/ (the adapter after task i), metrics.json (the
accuracy matrix, average accuracy, forgetting, backward transfer, adapter parameters after each
stage, pool changes, losses) and accuracy_vs_params.png; <output-dir>/summary.json and
accuracy_vs_params.png compare the strategies.

Accuracy is teacher-forced exact match on each task's held-out samples (the last
--eval-samples of its training split after a seeded shuffle, never trained on): a sample counts
when the most likely next token is right at every response token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

from moe_peft_ds import MixLoRAConfig, apply_mixlora, save_adapter
from moe_peft_ds.cli import (
    DATA_HELP,
    add_model_data_args,
    check_output_dir,
    check_positive,
    data_format,
    init_distributed,
    run_cli,
)
from moe_peft_ds.config import ATTENTION_TARGETS, AUX_LOSS_POOLINGS, MIXLORA_METHODS, ROUTINGS, ConfigError
from moe_peft_ds.continual import (
    adapter_parameters,
    continual_metrics,
    expert_usage,
    grow_experts,
    merge_experts,
    prune_experts,
    router_kl,
    router_targets,
)
from moe_peft_ds.data import calibration_batches, load_examples, make_loader, make_train_loader, resolve_data
from moe_peft_ds.dispatch import deepspeed_expert_group
from moe_peft_ds.ds_config import load_deepspeed_config
from moe_peft_ds.evaluate import exact_match
from moe_peft_ds.mixlora import routing_counts
from moe_peft_ds.models import DTYPES, load_model, load_tokenizer
from moe_peft_ds.parallel import place_mixlora_experts, plan_placements, shard_experts
from moe_peft_ds.placement import PLACEMENTS
from moe_peft_ds.train import train, train_deepspeed

STRATEGIES = ("dynamic", "lora", "mixlora")
PLACEMENT_SAMPLES = 256  # training samples whose routing a balanced placement spreads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model, tasks, output")
    add_model_data_args(io, data=False)
    io.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the base model (default fp32)")
    io.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=DATA",
        help=f"a task, in training order (repeat the flag; names unique); DATA: {DATA_HELP}",
    )
    io.add_argument(
        "--eval-samples", type=int, default=100, help="held-out samples per task, never trained on (default 100)"
    )
    io.add_argument("--train-samples", type=int, default=None, help="use at most this many training samples per task")
    io.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        default=["dynamic"],
        help="dynamic (the method), lora and mixlora (the baselines); default dynamic",
    )
    m = p.add_argument_group("experts")
    m.add_argument(
        "--method", default="mixlora", choices=MIXLORA_METHODS, help="LoRA or DoRA experts (default mixlora)"
    )
    m.add_argument("--experts-per-task", type=int, default=2, help="experts added to every FFN per task (default 2)")
    m.add_argument("--top-k", type=int, default=2, help="experts per token; at most --experts-per-task (default 2)")
    m.add_argument("--routing", default="topk", choices=ROUTINGS, help="routing strategy (default topk)")
    m.add_argument("--lora-r", type=int, default=8, help="rank of every expert (default 8)")
    m.add_argument("--lora-alpha", type=float, default=16.0, help="alpha of every expert (default 16)")
    m.add_argument(
        "--attention-lora",
        nargs="*",
        default=[],
        choices=ATTENTION_TARGETS,
        metavar="PROJ",
        help="plain LoRA on these attention projections too (trained in the first task only for dynamic; "
        "default none)",
    )
    m.add_argument(
        "--router-aux-loss-coef", type=float, default=0.01, help="load-balancing loss coefficient (default 0.01)"
    )
    m.add_argument(
        "--router-aux-loss-pooling",
        default="pooled",
        choices=AUX_LOSS_POOLINGS,
        help="pooled: one balancing loss over all layers' tokens (default); per_layer_sum: each layer's, summed",
    )
    c = p.add_argument_group("router protection and pool management (dynamic)")
    c.add_argument("--train-old-router", action="store_true", help="keep training the earlier experts' router rows")
    c.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="weight of KL(router before the task || router now) on earlier tasks' samples (default 0: off)",
    )
    c.add_argument(
        "--kl-samples", type=int, default=16, help="samples per earlier task the KL penalty uses (default 16)"
    )
    c.add_argument(
        "--replay-size",
        type=int,
        default=0,
        help="samples of each earlier task mixed into the current task's training (default 0: none)",
    )
    c.add_argument(
        "--prune-threshold",
        type=float,
        default=0.0,
        help="after each task, remove experts whose routed share (mean over layers, on --profile-samples "
        "of every task so far) is below this (default 0: never)",
    )
    c.add_argument(
        "--merge-threshold",
        type=float,
        default=0.0,
        help="after each task, merge experts whose updates' cosine similarity is at least this (default 0: never)",
    )
    c.add_argument(
        "--profile-samples", type=int, default=64, help="samples per task for pruning's usage profile (default 64)"
    )
    t = p.add_argument_group("training")
    t.add_argument("--steps-per-task", type=int, default=100, help="optimizer steps per task (default 100)")
    t.add_argument("--batch-size", type=int, default=8, help="samples per step and rank (default 8)")
    t.add_argument("--max-length", type=int, default=128, help="tokens per sample after truncation (default 128)")
    t.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate of each task, warmup then cosine (default 2e-3)"
    )
    t.add_argument(
        "--seed", type=int, default=0, help="seed for initialisation, shuffling, the held-out split and replay"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    t.add_argument("--overwrite", action="store_true", help="allow writing into an output dir that holds a run")
    d = p.add_argument_group("distributed (under the deepspeed launcher)")
    d.add_argument(
        "--deepspeed_config",
        default=None,
        help="a ZeRO-0/1/2 preset from ds_configs/; every task trains under deepspeed.initialize (data parallel)",
    )
    d.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="expert parallelism: split every FFN's LoRA experts over groups of this many ranks (each rank "
        "holds an equal share of every task's experts; --experts-per-task must be a multiple). Needs "
        "--deepspeed_config; the lora baseline (one expert) stays data parallel (default 1)",
    )
    d.add_argument(
        "--expert-placement",
        choices=PLACEMENTS,
        default="contiguous",
        help="with --ep-size > 1, which LoRA experts each rank holds from each task on: contiguous (every task's "
        "experts in equal slices by id) or balanced (the routers' loads on the task's first "
        f"{PLACEMENT_SAMPLES} training samples spread evenly, each task's experts still split equally) "
        "(default contiguous)",
    )
    d.add_argument(
        "--dist-timeout",
        type=int,
        default=1800,
        help="seconds a collective may wait for the other ranks; a rank that stops or dies ends the whole job "
        "within it (default 1800)",
    )
    d.add_argument(
        "--local_rank", type=int, default=None, help="set by the deepspeed launcher; do not pass it yourself"
    )
    return p.parse_args(argv)


def parse_tasks(specs: list[str]) -> list[tuple[str, str]]:
    """``["name=data", ...]`` -> ``[(name, data)]``, checked: at least one, names unique and present."""
    if not specs:
        raise ConfigError("no tasks: pass --task NAME=DATA at least once, in training order")
    tasks = []
    for spec in specs:
        name, sep, data = spec.partition("=")
        if not sep or not name or not data:
            raise ConfigError(f"--task {spec!r}: expected NAME=DATA, e.g. mood=data/mood.jsonl")
        tasks.append((name, data))
    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique: {names}")
    return tasks


def check_args(args) -> list[tuple[str, str]]:
    """Validate every flag and that every task's data exists, before any model is loaded."""
    tasks = parse_tasks(args.task)
    check_positive(
        experts_per_task=args.experts_per_task,
        top_k=args.top_k,
        eval_samples=args.eval_samples,
        steps_per_task=args.steps_per_task,
        batch_size=args.batch_size,
        max_length=args.max_length,
        kl_samples=args.kl_samples,
        profile_samples=args.profile_samples,
        dist_timeout=args.dist_timeout,
        ep_size=args.ep_size,
        lr=args.lr,
    )
    if args.top_k > args.experts_per_task:
        raise ConfigError(
            f"--top-k {args.top_k} must be at most --experts-per-task {args.experts_per_task} "
            "(the first task has only those experts)"
        )
    for flag in ("kl_coef", "replay_size", "prune_threshold", "merge_threshold"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 0")
    if args.merge_threshold > 1:
        raise ConfigError(f"--merge-threshold {args.merge_threshold} is a cosine similarity, at most 1")
    if args.train_samples is not None:
        check_positive(train_samples=args.train_samples)
    if args.ep_size > 1 and args.deepspeed_config is None:
        raise ConfigError("--ep-size > 1 needs --deepspeed_config (run under the deepspeed launcher)")
    if args.expert_placement == "balanced" and args.ep_size == 1:
        raise ConfigError("--expert-placement places experts on expert-parallel ranks; it needs --ep-size > 1")
    if args.experts_per_task % args.ep_size:
        raise ConfigError(
            f"--experts-per-task {args.experts_per_task} must be a multiple of --ep-size {args.ep_size}: "
            "every rank holds an equal share of each task's experts"
        )
    args.ds_config = None
    if args.deepspeed_config is not None:
        args.ds_config = load_deepspeed_config(args.deepspeed_config, args.batch_size, args.ep_size)
        if args.ds_config["zero_optimization"].get("stage", 0) == 3:
            raise ConfigError(
                "continual learning adds parameters between tasks, which ZeRO-3 partitions once; "
                "use a ZeRO-0/1/2 preset"
            )
    for _, data in tasks:
        resolve_data(data, args.train_split)
    out = Path(args.output_dir)
    check_output_dir(out)
    if any((out / s / "metrics.json").exists() for s in args.strategies) and not args.overwrite:
        raise ConfigError(f"{out} already holds a continual run; pass --overwrite or choose another --output-dir")
    return tasks


def split_task(examples: list[dict], n_eval: int, n_train: int | None, seed: int, name: str):
    """``(train, held_out)``: a seeded shuffle, the last ``n_eval`` held out."""
    if len(examples) <= n_eval:
        raise ConfigError(f"task {name!r} has {len(examples)} samples; it needs more than --eval-samples {n_eval}")
    order = random.Random(f"{seed}:{name}").sample(examples, len(examples))
    train = order[:-n_eval]
    return train[:n_train] if n_train else train, order[-n_eval:]


def adapter_config(args, strategy: str, num_tasks: int, first_task: str) -> MixLoRAConfig:
    experts = {"dynamic": args.experts_per_task, "lora": 1, "mixlora": args.experts_per_task * num_tasks}[strategy]
    return MixLoRAConfig(
        method=args.method,
        r=args.lora_r,
        alpha=args.lora_alpha,
        num_experts=experts,
        top_k=1 if strategy == "lora" else args.top_k,
        routing="topk" if strategy == "lora" else args.routing,
        attention_targets=list(args.attention_lora),
        router_aux_loss_coef=args.router_aux_loss_coef,
        router_aux_loss_pooling=args.router_aux_loss_pooling,
        expert_tasks=[first_task] * experts if strategy == "dynamic" else [],
        base_model=args.model,
    )


def kl_penalty(model, batches: list[dict], coef: float):
    """The router-KL term for training: cycles over the earlier tasks' KL batches, whose targets
    are taken now (before the pool grows)."""
    pairs = itertools.cycle(list(zip(batches, router_targets(model, batches))))
    return lambda: coef * router_kl(model, *next(pairs))


def manage_pool(args, model, tokenizer, profile: list[dict], log) -> dict:
    """Prune, then merge, as the flags ask; what changed."""
    changes = {}
    if args.prune_threshold > 0:
        usage = expert_usage(model, make_loader(profile, tokenizer, args.batch_size))
        changes["pruned"] = prune_experts(model, usage, args.prune_threshold)
    if args.merge_threshold > 0:
        changes["merged"] = merge_experts(model, args.merge_threshold)
    if changes:
        log(
            f"pool: {changes}; {model.moe_peft_config.num_experts} experts, tasks {model.moe_peft_config.expert_tasks}"
        )
    return changes


def run_strategy(args, strategy: str, tasks, data, rank: int, world: int, log) -> dict:
    """Train ``strategy`` over the task sequence; returns its metrics (also written to metrics.json)."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.tokenizer)
    out = Path(args.output_dir) / strategy
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "strategy": strategy,
        "tasks": [n for n, _ in tasks],
        "accuracy": [],
        "exact_match_detail": [],
        "adapter_parameters": [],
        "pool_changes": [],
        "losses": [],
        "experts": [],
    }
    seen = []
    for i, (name, _) in enumerate(tasks):
        train_ex, _ = data[name]
        protect = strategy == "dynamic" and i > 0
        extra = None
        if protect and args.kl_coef > 0:
            kl_batches = [
                b for n in seen for b in make_loader(data[n][0][: args.kl_samples], tokenizer, args.batch_size)
            ]
            extra = kl_penalty(model, kl_batches, args.kl_coef)
        if i == 0:
            apply_mixlora(model, adapter_config(args, strategy, len(tasks), name))
            if args.ep_size > 1 and strategy != "lora":
                shard_experts(model, deepspeed_expert_group(args.ep_size))
        elif strategy == "dynamic":
            grow_experts(model, args.experts_per_task, name, args.train_old_router)
        balance = args.expert_placement == "balanced" and args.ep_size > 1 and strategy != "lora"
        if balance:
            place_balanced(args, model, train_ex, tokenizer, rank, world)
        replay = [x for n in seen for x in data[n][0][: args.replay_size]] if protect else []
        loader = make_train_loader(train_ex + replay, tokenizer, args.batch_size, args.seed + i, rank, world)
        kw = dict(progress=not args.no_progress and rank == 0, extra_loss=extra)
        if args.deepspeed_config is None:
            losses = train(model, loader, args.steps_per_task, args.lr, **kw)
        else:
            losses = train_deepspeed(
                model, loader, args.steps_per_task, args.lr, dict(args.ds_config), release=True, **kw
            )
        seen.append(name)
        changes = {}
        if strategy == "dynamic":
            changes = manage_pool(
                args, model, tokenizer, [x for n in seen for x in data[n][0][: args.profile_samples]], log
            )
            if balance and changes:  # pruning or merging re-split the pool by id
                place_balanced(args, model, train_ex, tokenizer, rank, world)
        scores = {n: exact_match(model, make_loader(data[n][1], tokenizer, args.batch_size)) for n in seen}
        record["accuracy"].append([scores[n]["exact_match"] for n in seen])
        record["exact_match_detail"].append(scores)
        record["adapter_parameters"].append(adapter_parameters(model))
        record["pool_changes"].append(changes)
        record["losses"].append(losses)
        record["experts"].append(model.moe_peft_config.num_experts)
        save_adapter(model, out / f"stage_{i}_{name}")
        log(
            f"[{strategy}] after {name}: "
            + ", ".join(f"{n} {scores[n]['exact_match']:.3f}" for n in seen)
            + f"; adapter parameters {record['adapter_parameters'][-1]}"
        )
    record["metrics"] = continual_metrics(record["accuracy"])
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def place_balanced(args, model, examples, tokenizer, rank, world) -> None:
    """Spread the MixLoRA routers' loads on ``examples`` (the task's first training samples) over
    the expert-parallel ranks, each task's experts still split equally (every rank calls this)."""
    calib = calibration_batches(examples[:PLACEMENT_SAMPLES], tokenizer, args.batch_size, rank, world)
    counts = routing_counts(model, calib)
    place_mixlora_experts(model, plan_placements(model, counts, args.ep_size, "balanced", model.moe_peft_config))


def plot(records: dict[str, dict], path: Path) -> None:
    """Average accuracy over the tasks seen so far against total adapter parameters, after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for strategy, r in records.items():
        xs = [p["total"] for p in r["adapter_parameters"]]
        ax.plot(xs, r["metrics"]["average_accuracy"], marker="o", label=strategy)
        for x, y, task in zip(xs, r["metrics"]["average_accuracy"], r["tasks"]):
            ax.annotate(task, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("adapter parameters (total)")
    ax.set_ylabel("average accuracy, tasks so far")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    tasks = check_args(args)
    rank, world = init_distributed(args.deepspeed_config, args.dist_timeout)
    if world % args.ep_size:
        raise ConfigError(f"--ep-size {args.ep_size} must divide the number of ranks ({world})")
    log = print if rank == 0 else (lambda *a, **k: None)
    tokenizer = load_tokenizer(args.model, args.tokenizer)  # the data's; each strategy loads the model
    data = {}
    for name, spec in tasks:
        examples = load_examples(spec, tokenizer, args.max_length, args.train_split, fmt=data_format(args))
        data[name] = split_task(examples, args.eval_samples, args.train_samples, args.seed, name)
    records = {s: run_strategy(args, s, tasks, data, rank, world, log) for s in args.strategies}
    if rank != 0:
        return 0
    out = Path(args.output_dir)
    summary = {
        s: {**r["metrics"], "adapter_parameters": r["adapter_parameters"][-1], "experts": r["experts"][-1]}
        for s, r in records.items()
    }
    (out / "summary.json").write_text(
        json.dumps({"tasks": [n for n, _ in tasks], "strategies": summary, "args": vars(args)}, indent=1) + "\n"
    )
    for strategy, r in records.items():
        plot({strategy: r}, out / strategy / "accuracy_vs_params.png")
    plot(records, out / "accuracy_vs_params.png")
    for s, m in summary.items():
        print(
            f"{s:8s} final average accuracy {m['final_average_accuracy']:.3f}, average forgetting "
            f"{m['average_forgetting']:.3f}, backward transfer {m['backward_transfer']:+.3f}, "
            f"adapter parameters {m['adapter_parameters']['total']:,} ({m['experts']} experts per FFN)"
        )
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
