"""Memory plans of real MoE models (``launch/plan.py``'s numbers) for docs/results.md.

From the shape fields of each model's published ``config.json`` (``benchmarks/configs/``), on
one node of 8 GPUs with expert parallelism over all 8 (EP=8), ZeRO-2, a bf16 base, the sieve at
25% with LoRA r=16 (fp32 adapters), one 2048-token sequence per GPU, activation checkpointing;
and the smallest layout that fits 80 GiB GPUs. Parameter and state counts are exact, activations
and all-to-all traffic estimated (formulas in ``moe_peft_ds.memory_plan.ESTIMATED``).

    python benchmarks/plans.py        # writes benchmarks/results/plans.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import write_result  # noqa: E402
from moe_peft_ds.commands.plan import read_config, size  # noqa: E402
from moe_peft_ds.memory_plan import ESTIMATED, Layout, ModelShapes, Run, plan, smallest_fit  # noqa: E402

MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b")
LAYOUT = Layout(world=8, ep=8, zero=2)
RUN = Run(dtype="bf16", r=16, batch_size=1, max_length=2048, activation_checkpointing=True)
GPU = 80 * 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the same (it needs no weights); accepted for run_all")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "plans.json"))
    return p.parse_args(argv)


def table(result: dict) -> str:
    lines = [
        f"Per GPU on 8 GPUs, EP=8, ZeRO-2, bf16 base, sieve 25% LoRA r=16 (fp32), 1 x 2048 tokens, activation "
        f"checkpointing (`launch/plan.py`, {result['date'][:10]}); activations and all-to-all are estimates.",
        "",
        "| model | parameters (experts) | base weights | adapters + grads + optimizer | activations | total | "
        "loading peak | all-to-all / step | smallest layout within 80 GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in result["models"].items():
        need, fit = row["per_rank_bytes"], row["smallest_fit_80GiB"]
        trained = need["adapters"] + need["gradients"] + need["optimizer_states"]
        where = "none up to 4096 GPUs" if fit is None else f"{fit['world']} GPUs, EP={fit['ep']}, ZeRO-{fit['zero']}"
        lines.append(
            f"| {name} | {row['params'] / 1e9:.1f} B ({row['expert_params'] / 1e9:.1f} B) | "
            f"{size(need['base_experts'] + need['base_other'])} | {size(trained)} | {size(need['activations'])} | "
            f"{size(need['total'])} | {size(need['peak_at_load'])} | {size(need['all_to_all_per_step'])} | {where} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    models = {}
    for name in MODELS:
        shapes = ModelShapes.of(read_config(str(ROOT / "benchmarks" / "configs" / f"{name}.json")))
        fit = smallest_fit(shapes, RUN, GPU)
        models[name] = {
            "params": shapes.expert_params + shapes.other_params,
            "expert_params": shapes.expert_params,
            "per_rank_bytes": plan(shapes, LAYOUT, RUN),
            "smallest_fit_80GiB": None if fit is None else vars(fit[0]),
        }
    result = {
        "benchmark": "plans",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "layout": vars(LAYOUT),
        "run": {k: v for k, v in vars(RUN).items() if k != "sieve"} | {"sieve_fraction": RUN.sieve.fraction},
        "estimated": ESTIMATED,
        "models": models,
    }
    write_result(args.output, result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
