r"""Fine-tune an MoE model with the sieve (LoRA on the most-routed experts) or LoRA/DoRA on all
experts, or a dense model with MixLoRA/MixDoRA (a routed mixture of LoRA experts per FFN).

The recipe, top to bottom: load model and data -> (sieve: profile routing on a calibration
set -> select experts) -> inject adapters -> (shard experts) -> train -> save the adapter
(and the routing profile).

    python launch/train.py --model tiny-mixtral --method sieve --sieve-fraction 0.25 \
        --data demo:arithmetic --output-dir out/sieve-demo
    deepspeed --num_gpus 2 launch/train.py --model tiny-mixtral --data demo:arithmetic \
        --output-dir out/sieve-ep2 --deepspeed_config ds_configs/zero2_fp32.json --ep-size 2
    python launch/train.py --model <dense llama/mistral/qwen/gemma> --method mixlora --num-experts 8 \
        --top-k 2 --data demo:arithmetic --output-dir out/mixlora
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from array import array
from pathlib import Path

import torch

from moe_peft_ds import (
    AdapterConfig,
    SieveConfig,
    all_experts_selection,
    apply_sieve_lora,
    profile_routing,
    save_adapter,
    select_experts,
)
from moe_peft_ds.backends import backend_for
from moe_peft_ds.backends.hf import FusedExpertsWithLoRA
from moe_peft_ds.backends.hf_load import place_loaded_experts
from moe_peft_ds.checkpoint import CONFIG_NAME, adapter_nbytes
from moe_peft_ds.cli import (
    add_model_data_args,
    check_output_dir,
    check_positive,
    data_format,
    init_distributed,
    run_cli,
)
from moe_peft_ds.config import (
    ADAPTER_DTYPES,
    ATTENTION_TARGETS,
    AUX_LOSS_POOLINGS,
    CAPACITY_SCOPES,
    MIXLORA_METHODS,
    POLICIES,
    ROUTINGS,
    STANDARD_ATTENTION,
    ConfigError,
    MixLoRAConfig,
)
from moe_peft_ds.data import calibration_batches, load_examples, make_train_loader, resolve_data
from moe_peft_ds.device import model_device, peak_memory, per_rank
from moe_peft_ds.dispatch import deepspeed_expert_group, expert_parallel_group
from moe_peft_ds.drift import RoutingDrift
from moe_peft_ds.ds_config import load_deepspeed_config
from moe_peft_ds.importing import read_selection_file
from moe_peft_ds.mixlora import apply_mixlora, routing_counts
from moe_peft_ds.models import DTYPES, load_model
from moe_peft_ds.monitor import TrainingMonitor
from moe_peft_ds.parallel import plan_placements, shard_experts
from moe_peft_ds.placement import PLACEMENTS, placement_summary
from moe_peft_ds.profiling import format_skew, plot_heatmap
from moe_peft_ds.resume import check_resume, resolve_resume
from moe_peft_ds.tasks import get_task, load_items
from moe_peft_ds.train import Checkpointing, count_trainable, train, train_deepspeed, train_reselecting


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model, data, output")
    add_model_data_args(io)
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="allow writing into an output dir that already holds an adapter; the previous run's files there "
        "(adapter, profile, heatmap, logs, tensorboard/, best/, checkpoints/) are removed first, unless --resume",
    )
    io.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the base model (default fp32)")
    m = p.add_argument_group("method")
    m.add_argument(
        "--method",
        default="sieve",
        choices=["sieve", "lora", "dora", *MIXLORA_METHODS],
        help="sieve: LoRA on the selected experts only; lora/dora: on all experts (the full-LoRA baseline); "
        "mixlora/mixdora: a dense model's FFNs become routed mixtures of LoRA/DoRA experts",
    )
    m.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    m.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    m.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    m.add_argument("--use-rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    m.add_argument(
        "--use-dora", action="store_true", help="DoRA magnitudes on the adapted experts (implied by --method dora)"
    )
    m.add_argument(
        "--attention-lora",
        nargs="*",
        default=None,
        choices=ATTENTION_TARGETS,
        metavar="PROJ",
        help=f"plain LoRA on these attention projections too, any of {ATTENTION_TARGETS} that the model has "
        "(MLA models: q_a_proj/q_b_proj/kv_a_proj_with_mqa/kv_b_proj/o_proj); the flag alone: none "
        f"(default: none for sieve/lora/dora, {' '.join(STANDARD_ATTENTION)} for mixlora/mixdora)",
    )
    m.add_argument(
        "--shared-expert-lora", action="store_true", help="plain LoRA on shared experts (Qwen2-MoE, DeepSeek)"
    )
    m.add_argument(
        "--adapter-dtype",
        default="float32",
        choices=ADAPTER_DTYPES,
        help="adapter parameters in float32 over a bf16/fp16 base (as PEFT; default), or in the base's dtype. "
        "A DeepSpeed bf16/fp16 config casts every parameter itself (its optimizer keeps fp32 master weights)",
    )
    x = p.add_argument_group("mixlora / mixdora")
    x.add_argument("--num-experts", type=int, default=8, help="LoRA experts per FFN (default 8)")
    x.add_argument("--top-k", type=int, default=2, help="experts per token with --routing topk (default 2)")
    x.add_argument(
        "--routing",
        default="topk",
        choices=ROUTINGS,
        help="topk: softmax top-k, renormalised; dynamic: top-p; switch: top-1 with a capacity (default topk)",
    )
    x.add_argument(
        "--top-p",
        type=float,
        default=0.8,
        help="--routing dynamic: experts in order of probability up to the first at which their cumulative "
        "probability exceeds this; weights are their probabilities (default 0.8, as the MixLoRA reference)",
    )
    x.add_argument(
        "--top-p-renormalize",
        action="store_true",
        help="--routing dynamic: renormalise the kept experts' weights to sum to 1",
    )
    x.add_argument(
        "--top-p-max-experts",
        type=int,
        default=None,
        help="--routing dynamic: at most this many experts per token (default: no cap)",
    )
    x.add_argument(
        "--router-temperature",
        type=float,
        default=0.0,
        help="router softmax temperature, softmax(logits / t) (default 0: off)",
    )
    x.add_argument(
        "--capacity-factor",
        type=float,
        default=1.0,
        help="--routing switch: tokens per expert = ceil(factor x tokens / experts); the rest skip the "
        "experts' LoRA and keep the frozen FFN (default 1.0)",
    )
    x.add_argument(
        "--capacity-scope",
        default="batch",
        choices=CAPACITY_SCOPES,
        help="--routing switch: the tokens a capacity counts, the micro-batch or each sequence (default batch)",
    )
    x.add_argument(
        "--router-aux-loss-coef", type=float, default=0.01, help="load-balancing loss coefficient (default 0.01)"
    )
    x.add_argument(
        "--router-aux-loss-pooling",
        default="pooled",
        choices=AUX_LOSS_POOLINGS,
        help="pooled: one balancing loss over all layers' tokens, as transformers and the MixLoRA reference "
        "(default); per_layer_sum: each layer's loss, summed (about num_layers times stronger)",
    )
    x.add_argument(
        "--router-z-loss-coef",
        type=float,
        default=None,
        help="router z-loss coefficient (default 0.001 with --routing switch, else 0)",
    )
    x.add_argument(
        "--router-init-range", type=float, default=0.02, help="std of the router's initialisation (default 0.02)"
    )
    x.add_argument(
        "--jitter-noise",
        type=float,
        default=0.0,
        help="multiplicative U(1-eps, 1+eps) noise while training on the router's input, and with topk/dynamic "
        "routing on the experts' input too, as the MixLoRA reference (default 0)",
    )
    x.add_argument(
        "--expert-r", default="", metavar="E:R,...", help="per-expert ranks, e.g. 0:16,1:4 (default: --lora-r)"
    )
    x.add_argument("--expert-alpha", default="", metavar="E:A,...", help="per-expert alphas (default: --lora-alpha)")
    x.add_argument(
        "--reference-path",
        action="store_true",
        help="run every chosen expert's full FFN instead of the fast shared-W1/W3 path (same result, slower)",
    )
    s = p.add_argument_group("sieve: routing profile and expert selection")
    s.add_argument(
        "--selection-policy",
        default="topk",
        choices=POLICIES,
        help="topk: most-routed per layer; coverage: smallest set reaching --sieve-coverage; random: ablation "
        "at the topk budget; greedy: one total budget spread by marginal coverage; all: every expert",
    )
    s.add_argument(
        "--sieve-fraction", type=float, default=None, help="share of experts per layer, in (0, 1] (default 0.25)"
    )
    s.add_argument("--sieve-k", type=int, default=None, help="experts per layer (overrides --sieve-fraction)")
    s.add_argument(
        "--sieve-coverage", type=float, default=None, help="routed-token share for --selection-policy coverage"
    )
    s.add_argument(
        "--calibration-samples", type=int, default=256, help="samples of --data used to profile routing (default 256)"
    )
    s.add_argument(
        "--selection-file",
        default=None,
        metavar="FILE",
        help="sieve: train these experts instead of profiling: an ESFT expert_config.json, or an "
        "adapter_config.json (e.g. one launch/import_adapter.py --esft wrote, or an earlier adapter's)",
    )
    s.add_argument(
        "--reprofile-every",
        type=int,
        default=0,
        metavar="N",
        help="sieve: every N steps, profile routing on the calibration samples again and log, per layer, the "
        "selected experts' share of routed tokens (coverage) and the overlap (Jaccard) of the selection with "
        "today's hottest experts to train_log.jsonl, TensorBoard and routing_drift.png; not counted in the "
        "reported training time (default 0: off)",
    )
    s.add_argument(
        "--drift-warn",
        type=float,
        default=10.0,
        metavar="POINTS",
        help="with --reprofile-every: warn when a layer's coverage falls by more than this many percentage "
        "points below its value before training (default 10)",
    )
    s.add_argument(
        "--reselect-on-drift",
        action="store_true",
        help="with --reprofile-every: when a layer's coverage falls by more than --drift-warn, add adapters to "
        "the experts that became hot in it (the trained adapters stay; a new optimizer goes on from that step, "
        "its learning rate warming up again over 10 steps); not with --save-every/--resume or ZeRO-3",
    )
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, default=300, help="optimizer steps (default 300)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples per step and rank; N ranks see the global batches of one process with N times as many (default 16)",
    )
    t.add_argument("--max-length", type=int, default=128, help="tokens per sample after truncation (default 128)")
    t.add_argument(
        "--packing",
        action="store_true",
        help="concatenate samples into rows of --max-length tokens; attention crosses sample boundaries "
        "inside a row (samples are separated by EOS), labels stay per sample",
    )
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, warmup then cosine (default 2e-3)")
    t.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip gradients to this global norm, 0 for none (default: 1.0 in one process; under "
        "--deepspeed_config the preset's gradient_clipping, which this flag overrides)",
    )
    t.add_argument(
        "--activation-checkpointing",
        default="none",
        choices=["none", "reentrant", "non-reentrant"],
        help="recompute each decoder layer in backward to save activation memory (default none)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed for adapter init, shuffling and the random policy")
    t.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="write training state (adapters, optimizer, scheduler, step) to <output-dir>/checkpoints/step_N "
        "every N steps, for --resume (default 0: never)",
    )
    t.add_argument(
        "--resume",
        default=None,
        help="continue from a training state: a checkpoints/step_N directory, or a checkpoints directory "
        "(its latest step); same flags and number of ranks as the saved run",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    e = p.add_argument_group("evaluation while training")
    e.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N steps: validation loss per token (and --eval-tasks accuracy), logged with the "
        "training loss to <output-dir>/train_log.jsonl, TensorBoard when installed, and the console "
        "(default 0: never)",
    )
    e.add_argument(
        "--eval-split",
        default="validation",
        help="the split of --data for the validation loss (default validation; the demo tasks call theirs eval)",
    )
    e.add_argument("--eval-samples", type=int, default=256, help="validation samples (default 256)")
    e.add_argument(
        "--eval-tasks",
        nargs="*",
        default=[],
        metavar="TASK",
        help="multiple-choice tasks scored at each evaluation too (see launch/evaluate.py)",
    )
    e.add_argument("--eval-task-source", default="hub", help="hub (default), fixtures, or a directory of <task>.jsonl")
    e.add_argument("--eval-task-limit", type=int, default=200, help="items per task at each evaluation (default 200)")
    e.add_argument(
        "--keep-best",
        action="store_true",
        help="save the adapter with the lowest validation loss to <output-dir>/best as well",
    )
    d = p.add_argument_group("distributed (under the deepspeed launcher)")
    d.add_argument(
        "--deepspeed_config",
        default=None,
        help="a DeepSpeed JSON preset from ds_configs/; trains with deepspeed.initialize "
        "(--batch-size becomes the per-rank micro batch)",
    )
    d.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="expert parallelism: each MoE layer's experts (MixLoRA: each FFN's LoRA experts) are split over "
        "this many ranks, tokens reach them by all-to-all (default 1; needs --deepspeed_config; ZeRO-0/1/2 only)",
    )
    d.add_argument(
        "--expert-placement",
        choices=PLACEMENTS,
        default=None,
        help="with --ep-size > 1, which experts each rank holds: contiguous (by id) or balanced (the profiled "
        "routed rows, and the adapter work of selected experts, spread evenly over the ranks; MixLoRA: its routers' "
        "loads on the calibration samples). Default: balanced when the run profiles routing (--method sieve), "
        "else contiguous. Recorded in adapter_config.json; adapters load under any placement",
    )
    d.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        metavar="R",
        help="with a balanced placement: R more expert slots per rank and MoE layer, holding copies of the hottest "
        "experts, whose routed rows are split evenly over their copies (one hot expert no longer sets the busiest "
        "rank's load). Costs R experts' frozen weights per rank and layer, and one small exchange of the copied "
        "experts' adapters per layer and step; the adapters, and the checkpoint, stay one per expert. Sieve and "
        "LoRA on transformers models; at most E/N (default 0)",
    )
    d.add_argument(
        "--load-whole-model",
        action="store_true",
        help="with --ep-size > 1: every rank reads the whole checkpoint and keeps its experts afterwards, instead of "
        "reading only its E/N experts per layer (a fallback, and the reference the load_memory benchmark measures)",
    )
    d.add_argument(
        "--dist-timeout",
        type=int,
        default=1800,
        help="seconds a collective may wait for the other ranks; a rank that stops or dies ends the whole job "
        "within it, with one line naming the rank and the collective (default 1800)",
    )
    d.add_argument(
        "--local_rank", type=int, default=None, help="set by the deepspeed launcher; do not pass it yourself"
    )
    return p.parse_args(argv)


def per_expert(flag: str, text: str, cast) -> dict:
    """``"0:16,3:4"`` -> ``{0: 16, 3: 4}``."""
    try:
        return {int(e): cast(v) for e, v in (item.split(":") for item in text.split(",") if item)}
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r}: expected EXPERT:VALUE pairs separated by commas, e.g. 0:16,3:4") from err


def build_adapter_config(args) -> AdapterConfig | MixLoRAConfig:
    lora = dict(
        method=args.method,
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        adapter_dtype=args.adapter_dtype,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora or args.method in ("dora", "mixdora"),
    )
    if args.method in MIXLORA_METHODS:
        attention = STANDARD_ATTENTION if args.attention_lora is None else args.attention_lora
        return MixLoRAConfig(
            **lora,
            attention_targets=list(attention),
            num_experts=args.num_experts,
            top_k=args.top_k,
            routing=args.routing,
            top_p=args.top_p,
            top_p_renormalize=args.top_p_renormalize,
            top_p_max_experts=args.top_p_max_experts,
            router_temperature=args.router_temperature,
            capacity_factor=args.capacity_factor,
            capacity_scope=args.capacity_scope,
            router_aux_loss_coef=args.router_aux_loss_coef,
            router_aux_loss_pooling=args.router_aux_loss_pooling,
            router_z_loss_coef=args.router_z_loss_coef,
            router_init_range=args.router_init_range,
            jitter_noise=args.jitter_noise,
            expert_r=per_expert("--expert-r", args.expert_r, int),
            expert_alpha=per_expert("--expert-alpha", args.expert_alpha, float),
        )
    return AdapterConfig(
        **lora, attention_targets=list(args.attention_lora or []), shared_expert_lora=args.shared_expert_lora
    )


def build_configs(args) -> tuple[AdapterConfig | MixLoRAConfig, SieveConfig]:
    """Validate every flag before any model or data is loaded."""
    check_positive(
        lr=args.lr,
        calibration_samples=args.calibration_samples,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    fraction = args.sieve_fraction if args.sieve_fraction is not None else (None if args.sieve_k else 0.25)
    sieve = SieveConfig(
        policy=args.selection_policy if args.method == "sieve" else "all",
        fraction=fraction,
        k=args.sieve_k,
        coverage=args.sieve_coverage,
        seed=args.seed,
    )
    adapter = build_adapter_config(args)
    args.fixed_selection = read_selection_file(args.selection_file) if args.selection_file else None
    if args.fixed_selection is not None and args.method != "sieve":
        raise ConfigError(f"--selection-file chooses the experts of --method sieve, not of --method {args.method}")
    check_drift_flags(args)
    args.ds_config = check_distributed(args)
    if args.reselect_on_drift and (args.ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError("--reselect-on-drift cannot add adapters to a ZeRO-3 partitioned model; use ZeRO-0/1/2")
    if args.max_grad_norm is not None and not (math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0):
        raise ConfigError(f"--max-grad-norm={args.max_grad_norm} must be >= 0 (0: no clipping)")
    if args.eval_every < 0:
        raise ConfigError(f"--eval-every={args.eval_every} must be >= 0")
    if args.keep_best and not args.eval_every:
        raise ConfigError("--keep-best needs --eval-every N (it keeps the adapter of the best evaluation)")
    check_positive(eval_samples=args.eval_samples, eval_task_limit=args.eval_task_limit)
    for name in args.eval_tasks:
        get_task(name)
    if args.save_every < 0:
        raise ConfigError(f"--save-every={args.save_every} must be >= 0")
    if args.resume is not None:
        resolve_resume(args.resume)  # fails now if there is nothing to resume from
    resolve_data(args.data, args.train_split)  # a missing file fails now, before the model is loaded
    out = Path(args.output_dir)
    check_output_dir(out)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds an adapter; pass --overwrite or choose another --output-dir")
    return adapter, sieve


def check_drift_flags(args) -> None:
    """``--reprofile-every`` and its companions: a sieve selection to watch, sensible values."""
    if args.reprofile_every < 0:
        raise ConfigError(f"--reprofile-every={args.reprofile_every} must be >= 0 (0: off)")
    if not (math.isfinite(args.drift_warn) and 0 < args.drift_warn <= 100):
        raise ConfigError(f"--drift-warn={args.drift_warn} must be in (0, 100] percentage points")
    if args.reselect_on_drift and not args.reprofile_every:
        raise ConfigError("--reselect-on-drift needs --reprofile-every N (the re-profiling that detects drift)")
    if args.reselect_on_drift and (args.save_every or args.resume):
        raise ConfigError(
            "--reselect-on-drift adds adapters mid-run, which a saved training state cannot replay; "
            "drop --save-every / --resume"
        )
    if args.reprofile_every and args.method != "sieve":
        raise ConfigError(f"--reprofile-every watches a sieve selection; --method {args.method} has none")


def check_distributed(args) -> dict | None:
    """Reject flag combinations DeepSpeed cannot run, before any process group is created;
    returns the checked DeepSpeed config (None without one)."""
    check_positive(ep_size=args.ep_size, dist_timeout=args.dist_timeout)
    if args.expert_placement is not None and args.ep_size == 1:
        raise ConfigError("--expert-placement places experts on expert-parallel ranks; it needs --ep-size > 1")
    check_redundant_flags(args)
    if args.deepspeed_config is None:
        if args.ep_size > 1:
            raise ConfigError("--ep-size > 1 needs --deepspeed_config (run under the deepspeed launcher)")
        return None
    return load_deepspeed_config(args.deepspeed_config, args.batch_size, args.ep_size)


def check_redundant_flags(args) -> None:
    """``--redundant-experts``: copies of hot experts under a balanced expert-parallel placement."""
    if args.redundant_experts < 0:
        raise ConfigError(f"--redundant-experts={args.redundant_experts} must be >= 0")
    if not args.redundant_experts:
        return
    if args.ep_size == 1:
        raise ConfigError("--redundant-experts adds expert slots on expert-parallel ranks; it needs --ep-size > 1")
    if args.method not in ("sieve", "lora"):
        raise ConfigError(
            f"--redundant-experts copies a model's experts (sieve, lora); --method {args.method} has none"
        )
    if args.expert_placement == "contiguous":
        raise ConfigError("--redundant-experts places copies by load; it needs --expert-placement balanced")


def size_report(model, selection_all: dict[int, list[int]]) -> dict:
    """Trainable parameters and adapter bytes of this run, and what LoRA on all experts would take.
    A model loaded expert-parallel holds only its experts' adapters: those are summed over the
    expert-parallel group (every rank of it calls this), the replicated rest counted once."""
    trainable, nbytes = count_trainable(model), adapter_nbytes(model)
    experts = [m for m in model.modules() if isinstance(m, FusedExpertsWithLoRA)]
    own = [p for m in experts for p in m.adapters.parameters()]
    expert = torch.tensor(
        [
            sum(p.numel() for p in own),
            sum(p.numel() * p.element_size() for p in own),
            sum(len(m.expert_ids) for m in experts),
        ],
        dtype=torch.int64,
        device=model_device(model),
    )
    extra, extra_bytes = trainable - int(expert[0]), nbytes - int(expert[1])  # attention / shared-expert adapters
    if (group := expert_parallel_group(model)) is not None:
        torch.distributed.all_reduce(expert, group=group)
    expert_params, expert_bytes, n_selected = expert.tolist()
    n_all = sum(len(v) for v in selection_all.values())
    per_expert, bytes_per_expert = expert_params / max(n_selected, 1), expert_bytes / max(n_selected, 1)
    trainable, all_trainable = extra + expert_params, int(extra + per_expert * n_all)
    return {
        "trainable_params": trainable,
        "adapter_bytes": extra_bytes + expert_bytes,
        "selected_experts": n_selected,
        "all_experts": n_all,
        "all_experts_trainable_params": all_trainable,
        "all_experts_adapter_bytes": int(extra_bytes + bytes_per_expert * n_all),
        "param_ratio": trainable / all_trainable,
    }


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def evaluation_data(args, tokenizer) -> tuple[list[dict], dict]:
    """The validation examples and task items of ``--eval-every``, loaded before anything is
    written (a missing split fails first)."""
    if not args.eval_every:
        return [], {}
    examples = load_examples(
        args.data, tokenizer, args.max_length, args.eval_split, limit=args.eval_samples, fmt=data_format(args)
    )
    return examples, {n: load_items(n, args.eval_task_source, limit=args.eval_task_limit) for n in args.eval_tasks}


# What a run writes into --output-dir: --overwrite (without --resume) removes the previous run's, so
# that no stale profile, log or training state sits beside the new adapter. Nothing else is touched.
RUN_OUTPUTS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "routing_profile.json",
    "routing_heatmap.png",
    "train_log.json",
    "train_log.jsonl",
    "tensorboard",
    "best",
    "checkpoints",
)


def clear_previous_run(out: Path) -> list[str]:
    """Remove what an earlier run wrote into ``out`` (``RUN_OUTPUTS``); returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def inject_sieve(args, model, calib, sieve_cfg, adapter_cfg, world, log, progress):
    """Profile (sieve: each rank its share of ``calib()``, counts all-reduced), select, place the
    experts (expert parallel) and inject; returns the routing profile (None unless sieve), the
    selection, the size report and the placements."""
    info = backend_for(model).describe(model)
    if info["num_experts"] % args.ep_size or world % args.ep_size:
        raise ConfigError(
            f"--ep-size {args.ep_size} must divide both the experts per layer ({info['num_experts']}) "
            f"and the number of ranks ({world})"
        )
    profile = None
    if args.fixed_selection is not None:
        selection = args.fixed_selection
        log(f"selection from {args.selection_file}: {sum(map(len, selection.values()))} experts, no profiling")
    elif args.method == "sieve":
        profile = profile_routing(model, calib(), model_id=args.model, data_id=args.data, progress=progress)
        log(f"routing profile: {profile.tokens} tokens from {profile.samples} samples\n{format_skew(profile)}")
        selection = select_experts(profile, sieve_cfg)
    else:
        selection = all_experts_selection(model)
    placements = place_experts(args, model, profile, selection, adapter_cfg, calib, log, progress)
    apply_sieve_lora(model, selection, adapter_cfg)
    sizes = size_report(model, all_experts_selection(model))
    log(
        f"adapters on {sizes['selected_experts']} of {sizes['all_experts']} experts "
        f"({info['num_experts']} per layer, {len(info['moe_layers'])} MoE layers)"
    )
    return profile, selection, sizes, placements


def placement_mode(args, profile) -> str:
    """``--expert-placement``, or its default: balanced when routing was profiled or copies are asked for."""
    return args.expert_placement or ("balanced" if profile is not None or args.redundant_experts else "contiguous")


def place_experts(args, model, profile, selection, adapter_cfg, calib, log, progress) -> dict:
    """The load-aware placement of a sieve / LoRA run (``{}``: by id), from its routing profile (one
    is taken on the calibration samples if the run has none); a model loaded expert-parallel moves
    its experts there now, before adapters are added."""
    if args.ep_size == 1 or placement_mode(args, profile) == "contiguous":
        return {}
    if backend_for(model).NAME != "transformers":
        raise ConfigError("--expert-placement balanced: DeepSpeed-MoE models keep DeepSpeed's placement by id")
    if profile is None:
        profile = profile_routing(model, calib(), progress=progress)
    placements = plan_placements(
        model, profile.counts, args.ep_size, "balanced", adapter_cfg, selection, args.redundant_experts
    )
    log(placement_summary(profile.counts, placements))
    if expert_parallel_group(model) is not None:  # loaded expert-parallel: each rank holds its contiguous block
        place_loaded_experts(model, placements)
    return placements


def run_training(args, model, loader, ckpt, monitor, placements, log, progress) -> list[float]:
    """Every step, in one process or under DeepSpeed (expert-parallel: sharded first); with
    ``--reselect-on-drift``, in segments: when the drift monitor stops a segment, adapters are added
    on the newly hot experts and the next segment (a new optimizer) runs from that step."""
    config = None
    if args.deepspeed_config is not None:
        if args.ep_size > 1:
            shard_experts(model, deepspeed_expert_group(args.ep_size), placements)
        config = dict(args.ds_config)
        if args.max_grad_norm is not None:
            config["gradient_clipping"] = args.max_grad_norm
    clip = 1.0 if args.max_grad_norm is None else args.max_grad_norm

    def segment(first: int) -> list[float]:
        kw = dict(progress=progress, ckpt=ckpt, monitor=monitor, first_step=first)
        if config is None:
            return train(model, loader, args.max_steps, args.lr, clip=clip, **kw)
        return train_deepspeed(model, loader, args.max_steps, args.lr, config, release=args.reselect_on_drift, **kw)

    return train_reselecting(segment, model, monitor, log, seed=args.seed)


def drift_monitor(args, model, profile, selection, calib, log, progress) -> RoutingDrift | None:
    """``--reprofile-every``'s monitor, its baseline the profile the selection came from (a
    ``--selection-file`` run profiles the calibration samples now)."""
    if not args.reprofile_every:
        return None
    if args.reselect_on_drift and backend_for(model).NAME != "transformers":
        raise ConfigError("--reselect-on-drift grows adapters on transformers MoE models only")
    baseline = profile or profile_routing(model, calib(), progress=progress)
    watched = {layer: ids for layer, ids in selection.items() if ids}
    return RoutingDrift(args.reprofile_every, calib, watched, baseline, args.drift_warn, args.reselect_on_drift, log)


def load_run_model(args, adapter_cfg, world: int):
    """The model and tokenizer; an expert-parallel sieve/LoRA run reads on each rank only its
    E/N experts of every MoE layer (``models.load_model(experts_group=...)``) unless
    ``--load-whole-model``."""
    sharded = args.ep_size > 1 and not isinstance(adapter_cfg, MixLoRAConfig) and not args.load_whole_model
    if args.ep_size > 1 and world % args.ep_size:
        raise ConfigError(f"--ep-size {args.ep_size} must divide the number of ranks ({world})")
    group = deepspeed_expert_group(args.ep_size) if sharded else None
    return load_model(args.model, args.dtype, args.tokenizer, experts_group=group)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def examples_digest(examples: list[dict]) -> str:
    """sha256 (12 hex digits) of every sample's token ids and labels, in order: one pass over
    packed integers, not a JSON text of the whole data set."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(array("q", e["input_ids"]).tobytes() + b"|" + array("q", e["labels"]).tobytes() + b";")
    return digest.hexdigest()[:12]


def run_fingerprint(args, adapter_cfg, selection, examples, world: int, placements: dict | None = None) -> dict:
    """What a resumed run must share with the saved one (digests shortened to 12 hex digits): any
    difference means other weights, other experts, or another order of batches."""
    return {
        "model": args.model,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "method": args.method,
        "adapter_config": _digest(dataclasses.asdict(adapter_cfg)),
        "selection": _digest(selection),  # the experts carrying adapters, per layer (sieve)
        "data": f"{args.data} (split {args.train_split})",
        "examples": examples_digest(examples),  # the tokenised samples: data, format, tokenizer, --max-length
        "seed": args.seed,
        "batch_size": args.batch_size,
        "world_size": world,
        "ep_size": args.ep_size,
        "expert_placement": _digest(placements or {}),  # which experts each rank's optimizer state holds
    }


def run(args) -> int:
    adapter_cfg, sieve_cfg = build_configs(args)
    rank, world = init_distributed(args.deepspeed_config, args.dist_timeout)
    torch.manual_seed(args.seed)  # same seed everywhere: identical base and adapter init on every rank
    progress = not args.no_progress and rank == 0
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.output_dir)

    loading = time.perf_counter()
    model, tokenizer = load_run_model(args, adapter_cfg, world)
    load_seconds = time.perf_counter() - loading
    examples = load_examples(
        args.data, tokenizer, args.max_length, args.train_split, fmt=data_format(args), packing=args.packing
    )
    adapter_cfg.base_model = args.model
    profile, selection = None, None

    def calib():  # this rank's share of the calibration samples
        return calibration_batches(examples[: args.calibration_samples], tokenizer, args.batch_size, rank, world)

    if isinstance(adapter_cfg, MixLoRAConfig):
        if adapter_cfg.num_experts % args.ep_size or world % args.ep_size:
            raise ConfigError(
                f"--ep-size {args.ep_size} must divide both --num-experts ({adapter_cfg.num_experts}) "
                f"and the number of ranks ({world})"
            )
        apply_mixlora(model, adapter_cfg, fast=not args.reference_path)
        placements = {}
        if args.ep_size > 1 and args.expert_placement == "balanced":  # the routers' loads at the start
            counts = routing_counts(model, calib())
            placements = plan_placements(model, counts, args.ep_size, "balanced", adapter_cfg)
            log(placement_summary(counts, placements))
        sizes = {"trainable_params": count_trainable(model), "adapter_bytes": adapter_nbytes(model)}
        log(
            f"{args.method}: {args.num_experts} LoRA experts per FFN, {args.routing} routing, "
            f"{sizes['trainable_params']:,} trainable parameters"
        )
    else:
        profile, selection, sizes, placements = inject_sieve(
            args, model, calib, sieve_cfg, adapter_cfg, world, log, progress
        )
    if args.activation_checkpointing != "none":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": args.activation_checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()  # the frozen embeddings give no input with a gradient otherwise

    # world ranks with --batch-size B see the global batches of one process with B x world
    loader = make_train_loader(examples, tokenizer, args.batch_size, args.seed, rank, world)
    fingerprint = run_fingerprint(args, adapter_cfg, selection, examples, world, placements)
    # the saved run must be this one
    resumed = check_resume(args.resume, fingerprint, args.max_steps) if args.resume else None
    eval_examples, eval_tasks = evaluation_data(args, tokenizer)
    # everything is checked: from here on files are written
    if args.overwrite and args.resume is None and rank == 0:
        removed = clear_previous_run(out)
        if removed:
            log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
    monitor = TrainingMonitor(
        out,
        tokenizer,
        args.eval_every,
        eval_examples,
        eval_tasks,
        args.batch_size,
        args.keep_best,
        resumed_from=str(resumed) if resumed else None,
        drift=drift_monitor(args, model, profile, selection, calib, log, progress),
    )
    ckpt = Checkpointing(out / "checkpoints", args.save_every, Path(args.resume) if args.resume else None, fingerprint)
    start = time.perf_counter()
    losses = run_training(args, model, loader, ckpt, monitor, placements, log, progress)
    if monitor.drift is not None and monitor.drift.grown:  # more experts carry adapters now
        sizes = size_report(model, all_experts_selection(model))
    reprofiling = monitor.drift.seconds if monitor.drift is not None else 0.0
    elapsed = time.perf_counter() - start - reprofiling  # the drift monitor's profiles are not training
    monitor.close()

    save_adapter(model, out)  # expert-parallel: every rank takes part, rank 0 writes
    peak = per_rank({**peak_memory(model_device(model)), "load_seconds": load_seconds})
    if rank != 0:
        return 0
    if profile is not None:
        profile.save(out / "routing_profile.json")
        plot_heatmap(profile, out / "routing_heatmap.png")
    record = {
        "losses": losses,
        "evaluations": monitor.evaluations(),
        "first_step": args.max_steps - len(losses),
        "seconds": elapsed,
        "reprofile_seconds": reprofiling,
        "reselections": monitor.drift.grown if monitor.drift is not None else [],
        "sizes": sizes,
        "world_size": world,
        "peak_host_memory_bytes": [p["host"] for p in peak],  # per rank, loading included
        "peak_device_memory_bytes": [p["device"] for p in peak],
        "load_seconds": [p["load_seconds"] for p in peak],
        "args": vars(args),
    }
    (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")

    head, tail = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    print(f"loss {head:.3f} -> {tail:.3f} over {len(losses)} steps ({elapsed:.1f} s, {world} rank(s))")
    if "param_ratio" in sizes:
        print(
            f"trainable parameters: {sizes['trainable_params']:,} (LoRA on all experts: "
            f"{sizes['all_experts_trainable_params']:,}, ratio {sizes['param_ratio']:.3f})"
        )
        print(
            f"adapter size: {sizes['adapter_bytes'] / 1e6:.2f} MB (all experts: {sizes['all_experts_adapter_bytes'] / 1e6:.2f} MB)"
        )
    else:
        print(
            f"trainable parameters: {sizes['trainable_params']:,}; adapter size: {sizes['adapter_bytes'] / 1e6:.2f} MB"
        )
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
