"""MoE-Sieve on a Megatron-core GPT-MoE model: build a small model, profile its routing on
--data, select the hottest experts of each layer, train their LoRA for a few steps and save
the adapter (adapter_config.json, adapter_model.safetensors, routing_profile.json).

    python launch/megatron_sieve.py --data demo:arithmetic --output-dir out/megatron-sieve
    torchrun --nproc-per-node 2 launch/megatron_sieve.py --ep-size 2 --data demo:arithmetic --output-dir out/megatron-sieve

The model is built from scratch (random weights, the bundled demo tokenizer's vocabulary) to
show the workflow end to end; with a pretrained Megatron model, build and load it in
build_model. Needs megatron-core (pip install -e .[megatron]); Megatron's router and attention
assume CUDA, so run it on GPUs. The adapter converts to the transformers layout with
moe_peft_ds.checkpoint.convert_adapter when the model has a Mixtral-style counterpart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_peft_ds import (
    AdapterConfig,
    SieveConfig,
    apply_sieve_lora,
    profile_routing,
    save_adapter,
    select_experts,
)
from moe_peft_ds.cli import check_output_dir, check_positive, run_cli
from moe_peft_ds.config import POLICIES
from moe_peft_ds.data import IGNORE_INDEX, load_examples, make_loader, resolve_data
from moe_peft_ds.profiling import megatron_forward


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="demo:<task>, a .jsonl/.json/.parquet/.csv file or directory, or a hub dataset"
    )
    p.add_argument("--output-dir", required=True, help="directory the adapter and routing profile are written to")
    p.add_argument("--num-layers", type=int, default=2, help="decoder layers, all MoE (default 2)")
    p.add_argument("--hidden-size", type=int, default=64, help="model width (default 64)")
    p.add_argument("--num-attention-heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--ffn-hidden-size", type=int, default=128, help="each expert's FFN width (default 128)")
    p.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="expert-parallel ranks; must divide the world size and --num-experts (default 1)",
    )
    p.add_argument(
        "--dispatcher",
        default="allgather",
        choices=("allgather", "alltoall"),
        help="Megatron's token dispatcher (default allgather)",
    )
    p.add_argument(
        "--selection-policy", default="topk", choices=POLICIES, help="how experts are picked (default topk)"
    )
    p.add_argument(
        "--sieve-fraction", type=float, default=0.25, help="share of experts per layer that get LoRA (default 0.25)"
    )
    p.add_argument("--calibration-samples", type=int, default=64, help="samples profiled, over all ranks (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank per step (default 8)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sample after truncation (default 64)")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model and data order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return p.parse_args(argv)


def init_parallel(ep_size: int) -> None:
    """torch.distributed (one process without a launcher) and Megatron's process groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the world size {world}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep_size)


def build_model(args, vocab_size: int):
    """A GPT-MoE model with every layer MoE (Transformer Engine layers where TE is installed)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer import TransformerConfig

    cuda = torch.cuda.is_available()
    try:
        import transformer_engine  # noqa: F401

        spec = specs.get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts, moe_grouped_gemm=True)
    except ImportError:
        spec = specs.get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * args.hidden_size,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.ffn_hidden_size,
        moe_router_topk=args.top_k,
        moe_token_dispatcher_type=args.dispatcher,
        expert_model_parallel_size=args.ep_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not cuda,
        params_dtype=torch.float32,
    )
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=args.max_length
    )
    return model.cuda() if cuda else model


def fixed_length(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad a batch to ``length`` tokens: under expert parallelism Megatron's dispatchers
    exchange every rank's tokens, and (allgather) need the same token count on every rank."""
    pad = length - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: F.pad(v, (0, pad), value=fill[k]) for k, v in batch.items()}


def batches(examples: list[dict], tokenizer, args):
    return [
        fixed_length(b, args.max_length, tokenizer.pad_token_id)
        for b in make_loader(examples, tokenizer, args.batch_size)
    ]


def next_token_loss(model, batch: dict, device) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens (Megatron takes labels already shifted)."""
    ids, labels, mask = (batch[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    per_token = megatron_forward(model, ids[:, :-1], mask[:, :-1], labels=target.masked_fill(~keep, 0))
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


def run(args) -> int:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from transformers import AutoTokenizer

    from moe_peft_ds.demo import DEMO_MODEL_DIR

    check_positive(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        calibration_samples=args.calibration_samples,
        ep_size=args.ep_size,
        lr=args.lr,
    )
    resolve_data(args.data)  # a missing file fails now, before any process group or model
    check_output_dir(Path(args.output_dir))
    init_parallel(args.ep_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    examples = load_examples(args.data, tokenizer, args.max_length)
    model = build_model(args, len(tokenizer))
    device = next(model.parameters()).device
    quiet = args.no_progress or rank != 0

    per_rank = (
        args.calibration_samples // world
    )  # the same share on every rank (collective forwards); counts are summed
    calibration = examples[rank * per_rank : (rank + 1) * per_rank]
    profile = profile_routing(model, batches(calibration, tokenizer, args), progress=not quiet, data_id=args.data)
    selection = select_experts(profile, SieveConfig(policy=args.selection_policy, fraction=args.sieve_fraction))
    apply_sieve_lora(model, selection, AdapterConfig(method="sieve", r=args.lora_r, alpha=args.lora_alpha))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = torch.tensor(sum(p.numel() for p in params), device=device)
    dist.all_reduce(
        trainable, group=parallel_state.get_expert_model_parallel_group()
    )  # each rank holds its experts' adapters
    # Megatron's DDP puts the adapters (tagged allreduce=False) in its expert-parallel buffers and
    # averages their gradients over the expert-data-parallel group, like the experts' own weights.
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    g = torch.Generator().manual_seed(args.seed)
    losses = []
    ddp.train()
    for _ in tqdm(range(args.max_steps), desc="training", disable=quiet, unit="step"):
        order = torch.randperm(len(examples), generator=g)[: args.batch_size * world].tolist()
        (batch,) = batches([examples[i] for i in order[rank::world]], tokenizer, args)
        ddp.zero_grad_buffer()
        loss = next_token_loss(ddp, batch, device)
        loss.backward()
        ddp.finish_grad_sync()
        for p in params:  # Megatron accumulates into main_grad; torch's AdamW reads grad
            p.grad = p.main_grad
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    save_adapter(model, out)  # every rank: the expert-parallel shards are gathered, rank 0 writes
    if rank == 0:
        profile.save(out / "routing_profile.json")
        summary = {
            "selection": {str(k): v for k, v in selection.items()},
            "losses": losses,
            "trainable_params_all_ranks": int(trainable),
            "world": world,
            "ep_size": args.ep_size,
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.max_steps} steps; adapter in {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
