"""Plan the memory of a training layout before launching it: per rank, from the model's config alone.

Prints, per rank: the frozen base weights (experts and the rest), adapter parameters, their
gradients and optimizer states, an activation estimate, the peak while loading (each rank reads
only its experts) and the all-to-all bytes per step; with --gpu-memory, also the smallest layout
(fewest ranks, then the smallest EP degree and ZeRO stage) whose ranks fit. Parameter and state
counts are exact (the model is built on the meta device); activations and all-to-all traffic are
estimates. Host memory needs the Python/torch runtime on top (about 0.6 GiB per process on CPU).

    python launch/plan.py --model tiny-mixtral --world-size 2 --ep-size 2
    python launch/plan.py --model benchmarks/configs/qwen3-30b-a3b.json --world-size 8 --ep-size 8 \\
        --zero 2 --dtype bf16 --lora-r 16 --batch-size 4 --max-length 2048 --gpu-memory 80
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_peft_ds.cli import check_positive, run_cli
from moe_peft_ds.config import ATTENTION_TARGETS, ConfigError, SieveConfig
from moe_peft_ds.memory_plan import DTYPE_BYTES, ESTIMATED, Layout, ModelShapes, Run, plan, smallest_fit
from moe_peft_ds.models import resolve_model

GIB = 2**30
ROWS = (
    ("base_experts", "base weights: experts"),
    ("base_other", "base weights: the rest"),
    ("adapters", "adapter parameters"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations (estimate)"),
    ("total", "total"),
    ("peak_at_load", "peak while loading, on the GPU"),
    ("host_peak_at_load", "peak while loading, host (+ runtime)"),
    ("all_to_all_per_step", "all-to-all per step (estimate)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="a config.json, a model directory holding one, a preset (tiny-mixtral) or a hub id already in the cache",
    )
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the job (default 1)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel degree, dividing --world-size (default 1)")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2), help="ZeRO stage (default 2)")
    p.add_argument(
        "--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="the frozen base's dtype (default bf16)"
    )
    p.add_argument(
        "--method",
        default="sieve",
        choices=("sieve", "lora"),
        help="sieve: LoRA on the selected experts; lora: on all",
    )
    p.add_argument("--sieve-fraction", type=float, default=0.25, help="share of experts per layer (default 0.25)")
    p.add_argument("--sieve-k", type=int, default=None, help="experts per layer (overrides --sieve-fraction)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--use-dora", action="store_true", help="DoRA: a magnitude vector per expert tensor too")
    p.add_argument(
        "--attention-lora",
        nargs="*",
        default=[],
        choices=ATTENTION_TARGETS,
        metavar="PROJ",
        help=f"plain LoRA on these attention projections too, any of {ATTENTION_TARGETS} (default none)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step (default 1)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        metavar="R",
        help="with --ep-size > 1: R more expert slots per rank and MoE layer holding copies of hot experts, as "
        "train --redundant-experts (their frozen weights count here; default 0)",
    )
    p.add_argument(
        "--gpu-memory", type=float, default=None, help="GiB per GPU: also print the smallest layout that fits"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def read_config(spec: str):
    """A transformers config from a config.json, a directory, a preset or a cached hub id; one line if none."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or "model_type" not in raw:
                raise ConfigError(f"--model {spec}: not a transformers config.json (no model_type)")
            return AutoConfig.for_model(**raw)
        return AutoConfig.from_pretrained(resolve_model(spec))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--model {spec}: no readable config ({str(err).splitlines()[0]})") from None


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps them >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def layout_table(shapes: ModelShapes, layout: Layout, need: dict, run: Run) -> str:
    head = (
        f"{shapes.model_type}: {shapes.moe_layers} MoE layers x {shapes.num_experts} experts (top-{shapes.top_k}), "
        f"{shapes.expert_params + shapes.other_params:,} parameters ({shapes.expert_params:,} in experts)\n"
        f"layout: {layout.world} rank(s), EP={layout.ep}, ZeRO-{layout.zero}; base {run.dtype}, adapters fp32, "
        f"{run.method} r={run.r}, batch {run.batch_size} x {run.max_length} tokens"
        f"{', activation checkpointing' if run.activation_checkpointing else ''}\n"
        f"adapter parameters: {need['adapter_params']:,} on this rank at most, {need['adapter_params_all_ranks']:,} "
        "in the whole adapter\n\n| per rank | bytes |\n|---|---:|\n"
    )
    return head + "".join(f"| {label} | {size(need[key])} |\n" for key, label in ROWS)


def run(args) -> int:
    check_positive(
        world_size=args.world_size,
        ep_size=args.ep_size,
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if args.redundant_experts < 0:
        raise ConfigError(f"--redundant-experts={args.redundant_experts} must be >= 0")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory {args.gpu_memory} must be > 0 (GiB)")
    sieve = SieveConfig(fraction=args.sieve_fraction, k=args.sieve_k)
    shapes = ModelShapes.of(read_config(args.model))
    sieve.per_layer_budget(shapes.num_experts)  # a --sieve-k above the experts fails here
    spec = Run(
        args.dtype,
        args.method,
        sieve,
        args.lora_r,
        args.use_dora,
        tuple(args.attention_lora),
        args.batch_size,
        args.max_length,
        args.activation_checkpointing,
        args.redundant_experts,
    )
    missing = sorted(set(spec.attention_targets) - set(shapes.attention_lora))
    if missing:
        raise ConfigError(
            f"--attention-lora {missing}: not attention projections of this model {sorted(shapes.attention_lora)}"
        )
    layout = Layout(args.world_size, args.ep_size, args.zero)
    need = plan(shapes, layout, spec)
    fit = smallest_fit(shapes, spec, int(args.gpu_memory * GIB)) if args.gpu_memory else None
    if args.json:
        result = {"model": args.model, "shapes": vars(shapes), "layout": vars(layout), "per_rank_bytes": need}
        if args.gpu_memory:
            result["smallest_fit"] = None if fit is None else {"layout": vars(fit[0]), "per_rank_bytes": fit[1]}
        print(json.dumps({**result, "estimated": ESTIMATED}, indent=1))
        return 0
    print(layout_table(shapes, layout, need, spec))
    if args.gpu_memory:
        if fit is None:
            print(f"no layout up to 4096 ranks fits {args.gpu_memory:g} GiB per rank")
        else:
            (small, small_need) = fit
            print(
                f"smallest layout within {args.gpu_memory:g} GiB per rank: {small.world} rank(s), EP={small.ep}, "
                f"ZeRO-{small.zero} ({size(small_need['total'])} per rank)"
            )
    print("estimated: " + "; ".join(f"{k}: {v}" for k, v in ESTIMATED.items()))
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
