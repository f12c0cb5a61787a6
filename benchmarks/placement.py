"""Load-aware expert placement: how even the ranks' routed rows are, and what it does to a step.

1. Balance, from routing profiles: the busiest rank's routed rows over the mean rank's, per MoE
   layer, for experts placed by id (``contiguous``) and ``balanced``, beside the best any
   placement of whole experts can do (``placement.lower_bound``), and ``balanced`` with 1 and 2
   redundant slots per rank (copies of hot experts, rows split over the copies), at EP=2, 4 and 8:
   on the demo model's profiles (tiny-mixtral on demo:arithmetic and demo:code, profiled here)
   and on a skewed synthetic profile (64 experts, Zipf shares).
2. Step time at EP=2 and EP=4 (gloo ranks, one thread each): a stack of MoE layers (hidden 256,
   intermediate 512, 16 experts top-2, LoRA on every expert) whose routing is drawn from the demo
   profile's per-layer shares, forward + backward of the experts through the dispatch, the three
   placements (by id, balanced, balanced with one redundant slot per rank) interleaved step by
   step in one launch. Per step: the slowest rank's time, the
   time the least-loaded rank spends inside the all-to-alls (waiting for the busiest, plus the
   transfer itself), and the busiest rank's own CPU time (what it would take with a core, or a
   device, to itself: 4 ranks share 2 cores here, so the step time also carries the others' work).

    python benchmarks/placement.py            # writes benchmarks/results/placement.{json,md}
    python benchmarks/placement.py --quick
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402

from moe_peft_ds.placement import balanced, contiguous, imbalance, lower_bound, rank_loads  # noqa: E402

MODES = {"contiguous": "by id", "balanced": "balanced", "redundant": "balanced + 1 copy slot"}

FULL = dict(calibration_samples=256, hidden=256, intermediate=512, tokens=2048, steps=12, ep_sizes=[2, 4])
QUICK = dict(calibration_samples=16, hidden=32, intermediate=64, tokens=64, steps=2, ep_sizes=[2])
SETTINGS = ("calibration_samples", "tokens", "steps")  # flags; the rest follow --quick


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 steps, EP=2 only (a smoke run)")
    p.add_argument("--calibration-samples", type=int, default=None, help="samples per demo profile (256)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank per step (2048)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per placement, after one warm-up (12)")
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "placement.json",
        help="JSON result path; the Markdown table goes next to it (default %(default)s)",
    )
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else FULL
    for key in ("hidden", "intermediate", "ep_sizes"):
        setattr(args, key, shapes[key])
    return fill_defaults(args, {k: FULL[k] for k in SETTINGS}, {k: QUICK[k] for k in SETTINGS})


def demo_profiles(samples: int) -> dict[str, dict[int, list[int]]]:
    """Routed rows per layer and expert of tiny-mixtral on each demo task."""
    from moe_peft_ds.data import calibration_batches, load_examples
    from moe_peft_ds.models import load_model
    from moe_peft_ds.profiling import profile_routing

    model, tokenizer = load_model("tiny-mixtral")
    profiles = {}
    for task in ("arithmetic", "code"):
        examples = load_examples(f"demo:{task}", tokenizer, 128, limit=samples)
        profile = profile_routing(model, calibration_batches(examples, tokenizer, 16, 0, 1), progress=False)
        profiles[task] = profile.counts
    return profiles


def zipf_profile(experts: int = 64, layers: int = 4, exponent: float = 1.0) -> dict[int, list[int]]:
    """Zipf shares over a per-layer random order of experts, 100,000 rows per layer."""
    g = torch.Generator().manual_seed(0)
    shares = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    shares /= shares.sum()
    return {
        layer: (shares[torch.randperm(experts, generator=g).argsort()] * 100_000).round().long().tolist()
        for layer in range(layers)
    }


def balance(profiles: dict[str, dict[int, list[int]]], ep_sizes: list[int]) -> list[dict]:
    rows = []
    for name, counts in profiles.items():
        for ep in ep_sizes:
            for layer, c in sorted(counts.items()):
                rows.append(
                    {
                        "profile": name,
                        "ep": ep,
                        "layer": layer,
                        "contiguous": imbalance(c, contiguous(len(c), ep)),
                        "balanced": imbalance(c, balanced(c, ep)),
                        "lower_bound": lower_bound(c, ep),
                        "redundant_1": imbalance(c, balanced(c, ep, redundant=1)),
                        "redundant_2": imbalance(c, balanced(c, ep, redundant=2)),
                    }
                )
    return rows


def _timed_all_to_all():
    """Count the seconds this process spends inside ``all_to_all_single`` (the dispatch's collectives)."""
    spent = {"s": 0.0}
    inner = dist.all_to_all_single

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        spent["s"] += time.perf_counter() - t0
        return out

    dist.all_to_all_single = timed
    return spent


def _stack(a: argparse.Namespace, shares: list[list[float]]):
    """One adapted Mixtral per placement mode (``MODES``), its MoE blocks' experts sharded by that placement."""
    from transformers import MixtralConfig, MixtralForCausalLM

    import moe_peft_ds as mpd
    from moe_peft_ds.backends.hf import find_moe_blocks
    from moe_peft_ds.parallel import shard_experts

    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=len(shares),
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=len(shares[0]),
        num_experts_per_tok=2,
    )
    ep = dist.get_world_size()
    expected = {layer: [s * a.tokens * 2 * ep for s in row] for layer, row in enumerate(shares)}
    blocks = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg)
        mpd.apply_sieve_lora(model, mpd.all_experts_selection(model), mpd.AdapterConfig())
        redundant = int(mode == "redundant")
        placements = {l: balanced(c, ep, redundant=redundant) for l, c in expected.items()}
        placements = {} if mode == "contiguous" else placements
        shard_experts(model, dist.group.WORLD, placements)
        blocks[mode] = [b.experts for b in find_moe_blocks(model)]
    return blocks


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, shares: list[list[float]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # ranks share the 2 cores
    spent = _timed_all_to_all()
    blocks = _stack(a, shares)
    g = torch.Generator().manual_seed(rank)
    probs = torch.tensor(shares, dtype=torch.float64)
    result = {mode: {"step_s": [], "all_to_all_s": [], "cpu_s": [], "rows": []} for mode in blocks}
    for step in range(a.steps + 1):  # step 0 warms up
        x = torch.randn(a.tokens, a.hidden, generator=g)
        routes = [torch.multinomial(p.expand(a.tokens, -1), 2, generator=g) for p in probs]
        weights = torch.softmax(torch.randn(a.tokens, 2, generator=g), -1)
        for mode in list(blocks)[step % 3 :] + list(blocks)[: step % 3]:  # each mode first in turn
            h = x.clone().requires_grad_(True)
            dist.barrier()
            spent["s"], t0, c0 = 0.0, time.perf_counter(), time.process_time()
            y = h
            for experts, index in zip(blocks[mode], routes):
                y = y + experts(y, index, weights)
            y.square().mean().backward()
            cpu = time.process_time() - c0  # this rank's own work, whoever else shares its core
            dist.barrier()  # the step ends when the slowest rank is done
            if step:
                result[mode]["step_s"].append(time.perf_counter() - t0)
                result[mode]["all_to_all_s"].append(spent["s"])
                result[mode]["cpu_s"].append(cpu)
    for mode, layers in blocks.items():  # expected rows this rank's experts receive per step, per layer
        result[mode]["rows"] = [
            rank_loads(p, m.placement)[rank] * a.tokens * 2 * world for p, m in zip(shares, layers)
        ]
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def step_times(a: argparse.Namespace, shares: list[list[float]], ep: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(ep, port, a, shares, tmp), nprocs=ep, join=True)
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(ep)]
    summary = {}
    for mode in MODES:
        rows = [r[mode]["rows"] for r in ranks]  # [rank][layer]
        per_layer = list(zip(*rows))
        total = [sum(r) for r in rows]
        lightest = total.index(min(total))
        summary[mode] = {
            "step_s": statistics.median(max(r[mode]["step_s"][i] for r in ranks) for i in range(a.steps)),
            "lightest_rank_all_to_all_s": statistics.median(ranks[lightest][mode]["all_to_all_s"]),
            # the busiest rank's own CPU seconds: what a rank with its own device would take
            "busiest_rank_cpu_s": statistics.median(max(r[mode]["cpu_s"][i] for r in ranks) for i in range(a.steps)),
            # every layer waits for its busiest rank: the rows a step waits for, over an even split's
            "expected_rows_max_over_mean": sum(max(l) for l in per_layer) / (sum(total) / len(rows)),
            "raw": [r[mode] for r in ranks],
        }
    summary["balanced_over_contiguous"] = summary["balanced"]["step_s"] / summary["contiguous"]["step_s"]
    summary["redundant_over_contiguous"] = summary["redundant"]["step_s"] / summary["contiguous"]["step_s"]
    for mode in ("balanced", "redundant"):
        busiest = summary[mode]["busiest_rank_cpu_s"] / summary["contiguous"]["busiest_rank_cpu_s"]
        summary[f"{mode}_busiest_cpu_over_contiguous"] = busiest
    return summary


def markdown(r: dict) -> str:
    lines = [
        f"Routed rows of the busiest EP rank over the mean rank's, per MoE layer ({r['date']}); "
        "`bound`: the best any placement of whole experts (E/N per rank) can do; `+R copies`: balanced with R "
        "redundant slots per rank holding copies of hot experts (their rows split evenly over the copies).",
        "",
        "| profile | EP | layer | by id | balanced | bound | +1 copy | +2 copies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["balance"]:
        lines.append(
            f"| {row['profile']} | {row['ep']} | {row['layer']} | {row['contiguous']:.3f} | {row['balanced']:.3f} | "
            f"{row['lower_bound']:.3f} | {row['redundant_1']:.3f} | {row['redundant_2']:.3f} |"
        )
    s = r["sizes"]
    lines += [
        "",
        f"Step time: {len(r['shares'])} MoE layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{len(r['shares'][0])} experts top-2, LoRA r=8 on every expert, {s['tokens']} tokens per rank, routing "
        f"drawn from the demo arithmetic profile; forward + backward of the experts, median of {s['steps']} "
        "interleaved steps, gloo ranks with one thread each on this machine's 2 cores.",
        "",
        "| EP | placement | rows waited for / even split | step (slowest rank) | least-loaded rank in all-to-all "
        "| busiest rank's own CPU time |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for ep, t in r["step_time"].items():
        for mode, label in MODES.items():
            m = t[mode]
            lines.append(
                f"| {ep} | {label} | {m['expected_rows_max_over_mean']:.2f} | "
                f"{m['step_s'] * 1000:.0f} ms | {m['lightest_rank_all_to_all_s'] * 1000:.0f} ms | "
                f"{m['busiest_rank_cpu_s'] * 1000:.0f} ms |"
            )
        for mode, label in (("balanced", "balanced"), ("redundant", "balanced + 1 copy")):
            lines.append(
                f"| {ep} | {label} / by id | | {t[f'{mode}_over_contiguous']:.2f} | | "
                f"{t[f'{mode}_busiest_cpu_over_contiguous']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    demo = demo_profiles(a.calibration_samples)
    profiles = {f"demo {task}": counts for task, counts in demo.items()} | {"Zipf(1.0), 64 experts": zipf_profile()}
    arithmetic = demo["arithmetic"]
    shares = [[c / sum(counts) for c in counts] for _, counts in sorted(arithmetic.items())]
    result = {
        "benchmark": "placement",
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "sizes": {k: getattr(a, k) for k in ("calibration_samples", "hidden", "intermediate", "tokens", "steps")},
        "profiles": {name: {str(k): v for k, v in c.items()} for name, c in profiles.items()},
        "balance": balance(profiles, [2, 4, 8]),
        "shares": shares,
        "step_time": {str(ep): step_times(a, shares, ep) for ep in a.ep_sizes},
    }
    write_result(a.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
