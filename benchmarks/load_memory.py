"""Peak host memory per rank when loading expert-parallel: each rank reads only its experts.

Builds (once, cached under --cache) a random-init Qwen3-MoE whose weights are mostly experts,
saved as several safetensors shards like a hub checkpoint, then runs the real launcher side by
side on it:

- one process (``deepspeed --num_gpus 1``, EP=1: the whole model, today's path for everyone),
- ``deepspeed --num_gpus 2 ... --ep-size 2`` and ``--num_gpus 4 ... --ep-size 4`` (each rank
  loads the non-expert weights and E/N experts per layer),

each a short sieve run (profile, inject, 2 steps, save), and reads every rank's peak resident
host memory (``ru_maxrss``, loading included) and the load time from ``train_log.json``.
Each EP degree also runs with ``--load-whole-model`` (every rank reads the whole checkpoint and
keeps its experts afterwards: the behaviour before expert-parallel loading). Targets: the
largest rank's peak at EP=4 <= 0.5x one process, at EP=2 about 0.6x; load time no worse than the
whole-model load of the same ranks.

    python benchmarks/load_memory.py            # writes benchmarks/results/load_memory.{json,md}
    python benchmarks/load_memory.py --quick    # a ~60 MB model, EP=2 only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import fill_defaults, write_result  # noqa: E402

FULL = dict(layers=8, hidden=512, experts=64, intermediate=512, ep_sizes="2,4", shard_size="200MB")
QUICK = dict(layers=2, hidden=128, experts=16, intermediate=256, ep_sizes="2", shard_size="20MB")
TARGETS = {4: 0.5, 2: 0.6}  # EP degree -> largest rank's peak / one process's (2: "about")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, help="decoder layers, all MoE (default 8; --quick: 2)")
    p.add_argument("--hidden", type=int, help="hidden size (default 512; --quick: 128)")
    p.add_argument("--experts", type=int, help="experts per layer (default 64; --quick: 16)")
    p.add_argument("--intermediate", type=int, help="expert FFN size (default 512; --quick: 256)")
    p.add_argument("--ep-sizes", help="expert-parallel degrees to run, comma-separated (default 2,4; --quick: 2)")
    p.add_argument("--shard-size", help="safetensors shard size of the built checkpoint (default 200MB)")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "load_memory"), help="where the built model is kept")
    p.add_argument("--quick", action="store_true", help="a small model, EP=2 only (a smoke run)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    return fill_defaults(p.parse_args(argv), FULL, QUICK)


def build_model(args) -> tuple[Path, int]:
    """The checkpoint directory (built once per shape) and its size in bytes."""
    import torch
    import transformers as tf

    from moe_peft_ds.models import load_tokenizer

    name = f"qwen3moe-l{args.layers}-h{args.hidden}-e{args.experts}-i{args.intermediate}"
    path = Path(args.cache) / name
    if not (path / "config.json").is_file():
        vocab = len(load_tokenizer("tiny-mixtral"))
        cfg = tf.Qwen3MoeConfig(
            vocab_size=vocab,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=args.hidden // 8,
            intermediate_size=args.intermediate,
            moe_intermediate_size=args.intermediate,
            num_experts=args.experts,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size=args.shard_size)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path, size


def launch(model: Path, out: Path, ranks: int, ep_size: int, port: int, whole: bool = False) -> dict:
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        str(ROOT / "launch" / "train.py"),
        "--model",
        str(model),
        "--tokenizer",
        "tiny-mixtral",
        "--data",
        "demo:arithmetic",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--calibration-samples",
        str(4 * ranks),
        "--no-progress",
        "--overwrite",
        "--output-dir",
        str(out),
        "--deepspeed_config",
        str(ROOT / "ds_configs" / "zero2_fp32.json"),
        "--ep-size",
        str(ep_size),
    ] + (["--load-whole-model"] if whole else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    log = json.loads((out / "train_log.json").read_text())
    return {
        "ranks": ranks,
        "ep_size": ep_size,
        "whole_model_load": whole,
        "peak_host_memory_bytes": log["peak_host_memory_bytes"],
        "load_seconds": log["load_seconds"],
    }


RUNTIME = (
    "import resource, torch, transformers, deepspeed, moe_peft_ds.backends.hf_load, moe_peft_ds.train; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)


def runtime_bytes() -> int:
    """Peak RSS of a process that only imports what the launcher imports: the runtime the plan leaves out."""
    done = subprocess.run([sys.executable, "-c", RUNTIME], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def planned_host_peak(model: Path, ranks: int, ep_size: int) -> int:
    """``launch/plan.py``'s host peak while loading for this run (fp32, ZeRO-2, the run's batch)."""
    from moe_peft_ds.commands.plan import read_config
    from moe_peft_ds.memory_plan import Layout, ModelShapes, Run, plan

    shapes = ModelShapes.of(read_config(str(model)))
    return plan(shapes, Layout(ranks, ep_size, 2), Run(dtype="fp32", batch_size=2, max_length=64))["host_peak_at_load"]


def table(result: dict) -> str:
    gib = 2**30
    lines = [
        f"Peak host memory per rank (ru_maxrss, loading included) of a short `launch/train.py` sieve run on a "
        f"random-init Qwen3-MoE checkpoint of {result['checkpoint_bytes'] / gib:.2f} GiB "
        f"({result['expert_share']:.0%} experts, {result['shards']} safetensors shards); CPU ranks (gloo), "
        f"{result['date'][:10]}. Planned: `launch/plan.py`'s host peak while loading plus the runtime (a process "
        f"that imports the launcher's modules: {result['runtime_bytes'] / gib:.2f} GiB); the plan aims at 25%.",
        "",
        "| run | ranks | peak per rank (GiB) | largest / one process | target | planned (GiB) | largest / planned "
        "| load s (slowest rank) | load / one process |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    one = result["runs"][0]
    for run in result["runs"]:
        peaks = run["peak_host_memory_bytes"]
        ratio = max(peaks) / max(one["peak_host_memory_bytes"])
        target = TARGETS.get(run["ep_size"]) if run["ep_size"] > 1 and not run["whole_model_load"] else None
        verdict = "" if target is None else f"<= {target} {'pass' if ratio <= target else 'MISS'}"
        if run["ep_size"] == 1:
            label = "one process (reads the whole model)"
        else:
            how = "every rank reads the whole model" if run["whole_model_load"] else "each rank reads its experts"
            label = f"EP={run['ep_size']}, {how}"
        lines.append(
            f"| {label} | {run['ranks']} | {', '.join(f'{p / gib:.2f}' for p in peaks)} | {ratio:.2f} | {verdict} | "
            f"{run['planned_host_peak'] / gib:.2f} | {max(peaks) / run['planned_host_peak']:.2f} | "
            f"{max(run['load_seconds']):.1f} | {max(run['load_seconds']) / max(one['load_seconds']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    model, size = build_model(args)
    experts = args.layers * args.experts * 3 * args.hidden * args.intermediate * 4
    out = Path(args.cache) / "runs"
    runs = [launch(model, out / "one", 1, 1, 29701)]
    for i, ep in enumerate(int(e) for e in args.ep_sizes.split(",")):
        runs.append(launch(model, out / f"ep{ep}-whole", ep, ep, 29712 + i, whole=True))
        runs.append(launch(model, out / f"ep{ep}", ep, ep, 29702 + i))
    runtime = runtime_bytes()
    for run in runs:  # a whole-model load reads what one process reads
        read_as = 1 if run["whole_model_load"] else run["ep_size"]
        run["planned_host_peak"] = planned_host_peak(model, run["ranks"], read_as) + runtime
    result = {
        "benchmark": "load_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "config": vars(args),
        "checkpoint_bytes": size,
        "expert_share": experts / size,
        "shards": len(list(model.glob("*.safetensors"))),
        "runtime_bytes": runtime,
        "runs": runs,
    }
    write_result(args.output, result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
