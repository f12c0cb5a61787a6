"""Expert-parallel dispatch on 2 CPU ranks (gloo): all-to-all volume and step time.

In one launch of 2 ranks, on a random-init Mixtral with LoRA on all experts:

- bytes our dropless all-to-all moves per forward pass (dispatch + combine) divided by the
  minimum, routed (token, expert) pairs x hidden x element size x 2 directions (target 1.0);
- the same for DeepSpeed-native ``MoE`` (capacity-padded ``[E, C, H]`` all-to-all) on the
  same shapes (tokens per rank, experts, top-k, hidden) at capacity factors 1.0 and 2.0,
  with the share of routed pairs it drops;
- step time (forward + backward + AdamW) of EP=2 against EP=1 (both experts replicated,
  data parallel), interleaved round by round, and the expert weight bytes per rank.

    python benchmarks/ep_dispatch.py            # writes benchmarks/results/ep_dispatch.{json,md}
    python benchmarks/ep_dispatch.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SIZES = dict(layers=4, hidden=256, intermediate=512, experts=16, top_k=2, batch=4, seq=256, rounds=10)
QUICK = dict(layers=2, hidden=64, intermediate=128, experts=8, top_k=2, batch=2, seq=64, rounds=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a much smaller model and 2 rounds (a smoke run)")
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "ep_dispatch.json",
        help="JSON result path; the Markdown table goes next to it (default %(default)s)",
    )
    return p.parse_args(argv)


def mixtral(s: dict):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=1024,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=s["experts"],
        num_experts_per_tok=s["top_k"],
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).float()


def expert_bytes(model) -> int:
    from moe_peft_ds.backends.hf import find_moe_blocks

    return sum(p.numel() * p.element_size() for b in find_moe_blocks(model) for p in b.experts.parameters())


def ours(s: dict, rank: int) -> dict:
    """EP=1 (replicated experts, data parallel) vs EP=2, LoRA on all experts."""
    import moe_peft_ds as mp_
    from moe_peft_ds.backends.hf import ExpertParallelExperts
    from moe_peft_ds.parallel import shard_experts

    ep1 = mp_.apply_sieve_lora(mixtral(s), mp_.all_experts_selection(mixtral(s)), mp_.AdapterConfig())
    ep2 = shard_experts(copy.deepcopy(ep1), dist.group.WORLD)
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in (("ep1", ep1), ("ep2", ep2))
    }
    g = torch.Generator().manual_seed(rank)
    times = {"ep1": [], "ep2": []}
    sent = 0
    for r in range(s["rounds"] + 1):  # round 0 is warm-up
        ids = torch.randint(0, 1024, (s["batch"], s["seq"]), generator=g)
        for name, model in (("ep1", ep1), ("ep2", ep2)) if r % 2 else (("ep2", ep2), ("ep1", ep1)):
            for m in model.modules():
                if isinstance(m, ExpertParallelExperts):
                    m.sent_rows = 0
            dist.barrier()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            for p in (p for p in model.parameters() if p.grad is not None and getattr(p, "allreduce", True)):
                dist.all_reduce(p.grad)  # data-parallel gradient sum for replicated parameters
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - t0)
            if name == "ep2":
                sent = sum(m.sent_rows for m in model.modules() if isinstance(m, ExpertParallelExperts))
    routed = s["batch"] * s["seq"] * s["top_k"] * s["layers"]  # (token, expert) pairs this rank routes per forward
    return {
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "step_times_s": times,
        "ours_rows_moved": sent,
        "routed_pairs": routed,
        "expert_bytes_per_rank": {"ep1": expert_bytes(ep1), "ep2": expert_bytes(ep2)},
    }


def deepspeed_native(s: dict, capacity_factor: float) -> dict:
    """One DeepSpeed MoE layer on the same shapes: its all-to-all tensor and dropped pairs."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(1)
    expert = torch.nn.Sequential(
        torch.nn.Linear(s["hidden"], s["intermediate"]),
        torch.nn.SiLU(),
        torch.nn.Linear(s["intermediate"], s["hidden"]),
    )
    moe = MoE(
        s["hidden"],
        expert,
        num_experts=s["experts"],
        ep_size=2,
        k=s["top_k"],
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=0,
    )
    moe.set_deepspeed_parallelism()
    shapes = []
    moe.deepspeed_moe.experts.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    x = torch.randn(s["batch"], s["seq"], s["hidden"])
    moe.train()
    moe(x)
    ep, e_local, capacity, hidden = shapes[0]
    counts = moe.deepspeed_moe.exp_counts  # per expert, before capacity dropping
    routed = s["batch"] * s["seq"] * s["top_k"]
    dropped = int(torch.clamp(torch.as_tensor(counts) - capacity, min=0).sum())
    return {
        "capacity_factor": capacity_factor,
        "capacity": capacity,
        "rows_moved": 2 * ep * e_local * capacity,
        "routed_pairs": routed,
        "dropped_share": dropped / routed,
    }


def _rank(rank: int, world: int, port: int, s: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    result = {"ours": ours(s, rank), "deepspeed": [deepspeed_native(s, cf) for cf in (1.0, 2.0)]}
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))  # numbers only: JSON, not pickle
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def run(args) -> dict:
    s = QUICK if args.quick else SIZES
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, port, s, tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(2)]
    o = ranks[0]["ours"]
    # Over both ranks: every routed pair goes out once (dispatch) and comes back once (combine).
    moved = sum(r["ours"]["ours_rows_moved"] for r in ranks)
    minimum = 2 * sum(r["ours"]["routed_pairs"] for r in ranks)
    row_bytes = s["hidden"] * 4
    ds = [{**d, "bytes_ratio_to_minimum": d["rows_moved"] / (2 * d["routed_pairs"])} for d in ranks[0]["deepspeed"]]
    return {
        "benchmark": "ep_dispatch",
        "date": dt.date.today().isoformat(),
        "sizes": s,
        "ranks": 2,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "ours": {
            "bytes_per_forward": moved * row_bytes,
            "minimum_bytes": minimum * row_bytes,
            "bytes_ratio_to_minimum": moved / minimum,
            "dropped_share": 0.0,
        },
        "deepspeed_native_per_layer": ds,
        "step_time": {
            "ep1_s": o["step_s"]["ep1"],
            "ep2_s": o["step_s"]["ep2"],
            "ep2_over_ep1": o["step_s"]["ep2"] / o["step_s"]["ep1"],
            "raw": o["step_times_s"],
        },
        "expert_bytes_per_rank": o["expert_bytes_per_rank"],
        "expert_memory_ratio_ep2_over_ep1": o["expert_bytes_per_rank"]["ep2"] / o["expert_bytes_per_rank"]["ep1"],
    }


def markdown(r: dict) -> str:
    s = r["sizes"]
    lines = [
        f"2 gloo ranks, random-init Mixtral: {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts "
        f"top-{s['top_k']}, {s['batch']}x{s['seq']} tokens per rank, fp32, LoRA r=8 on all experts ({r['date']}).",
        "",
        "| all-to-all | bytes / minimum | routed pairs dropped |",
        "|---|---:|---:|",
        f"| moe_peft_ds (dropless, uneven splits) | {r['ours']['bytes_ratio_to_minimum']:.3f} | 0 |",
    ]
    for d in r["deepspeed_native_per_layer"]:
        lines.append(
            f"| DeepSpeed MoE, capacity factor {d['capacity_factor']:g} (C={d['capacity']}) | "
            f"{d['bytes_ratio_to_minimum']:.3f} | {d['dropped_share']:.1%} |"
        )
    st, mem = r["step_time"], r["expert_bytes_per_rank"]
    lines += [
        "",
        "| | EP=1 (data parallel) | EP=2 | EP=2 / EP=1 |",
        "|---|---:|---:|---:|",
        f"| step time (median of {s['rounds']} interleaved rounds) | {st['ep1_s'] * 1000:.0f} ms | "
        f"{st['ep2_s'] * 1000:.0f} ms | {st['ep2_over_ep1']:.2f} |",
        f"| expert weights + adapters per rank | {mem['ep1'] / 2**20:.2f} MiB | {mem['ep2'] / 2**20:.2f} MiB | "
        f"{r['expert_memory_ratio_ep2_over_ep1']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
