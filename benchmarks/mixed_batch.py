"""Several sieve adapters in one mixed batch against one batch per adapter: tokens per second.

On the demo MoE (``tiny-mixtral``, fp32, 16 experts per layer) carrying 4 sieve adapters (each on
its own 25% of the experts, LoRA r=8 on them and on q/v attention): a prefill forward of a batch
whose rows take turns among the 4 adapters (``adapter_names``), and greedy generation from the
same prompts, against the same rows as 4 batches of one adapter each, on the same model and on 4
models carrying one adapter each. Side by side in one process, the median of the repeats.

    python benchmarks/mixed_batch.py          # writes benchmarks/results/mixed_batch.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import fill_defaults, write_result  # noqa: E402
from moe_peft_ds import AdapterConfig, apply_sieve_lora, load_adapter, save_adapter  # noqa: E402
from moe_peft_ds.models import load_model  # noqa: E402

ADAPTERS = ("math", "code", "law", "chat")
FULL = dict(rows=8, length=64, new_tokens=16, repeats=5)
QUICK = dict(rows=2, length=16, new_tokens=4, repeats=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes")
    p.add_argument("--rows", type=int, default=None, help=f"prompts per adapter (default {FULL['rows']})")
    p.add_argument("--length", type=int, default=None, help=f"prompt tokens (default {FULL['length']})")
    p.add_argument("--new-tokens", type=int, default=None, help=f"generated tokens (default {FULL['new_tokens']})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed repeats, median kept (default {FULL['repeats']})")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "mixed_batch.json"))
    return fill_defaults(p.parse_args(argv), FULL, QUICK)


def make_adapters(directory: Path) -> None:
    """4 sieve adapters on disjoint-ish random quarters of the experts, with non-zero B."""
    g = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        model, _ = load_model("tiny-mixtral")
        layers = model.config.num_hidden_layers
        experts = model.config.num_local_experts
        selection = {
            layer: sorted(torch.randperm(experts, generator=g)[: experts // 4].tolist()) for layer in range(layers)
        }
        apply_sieve_lora(model, selection, AdapterConfig(r=8, attention_targets=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter(model, directory / name)


def median_seconds(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up: the first calls of a fresh model pay one-off kernel set-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp))
        multi = None
        for name in ADAPTERS:
            multi = load_adapter(load_model("tiny-mixtral")[0] if multi is None else multi, Path(tmp) / name, name)
        singles = {name: load_adapter(load_model("tiny-mixtral")[0], Path(tmp) / name) for name in ADAPTERS}
    vocab = multi.config.vocab_size
    n = args.rows * len(ADAPTERS)
    prompts = torch.randint(3, vocab, (n, args.length), generator=torch.Generator().manual_seed(1))
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(n)]  # rows take turns among the adapters
    rows = {name: [i for i, a in enumerate(names) if a == name] for name in ADAPTERS}
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def prefill_mixed():
        multi(input_ids=prompts, adapter_names=names)

    def prefill_each():
        for name, idx in rows.items():
            multi(input_ids=prompts[idx], adapter_names=[name] * len(idx))

    def prefill_singles():
        for name, idx in rows.items():
            singles[name](input_ids=prompts[idx])

    def generate_mixed():
        multi.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **gen)

    def generate_each():
        for name, idx in rows.items():
            p = prompts[idx]
            multi.generate(p, attention_mask=torch.ones_like(p), adapter_names=[name] * len(idx), **gen)

    def generate_singles():
        for name, idx in rows.items():
            singles[name].generate(prompts[idx], attention_mask=torch.ones_like(prompts[idx]), **gen)

    timed = {}
    with torch.no_grad():
        for what, fn in [
            ("prefill_mixed", prefill_mixed),
            ("prefill_per_adapter", prefill_each),
            ("prefill_single_models", prefill_singles),
            ("generate_mixed", generate_mixed),
            ("generate_per_adapter", generate_each),
            ("generate_single_models", generate_singles),
        ]:
            timed[what] = median_seconds(fn, args.repeats)
    tokens = {"prefill": n * args.length, "generate": n * args.new_tokens}
    result = {
        "benchmark": "mixed_batch",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny-mixtral (fp32)",
        "adapters": len(ADAPTERS),
        "rows_per_adapter": args.rows,
        "prompt_tokens": args.length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seconds": timed,
        "tokens_per_second": {k: tokens[k.split("_")[0]] / v for k, v in timed.items()},
        "mixed_over_per_adapter": {
            phase: timed[f"{phase}_per_adapter"] / timed[f"{phase}_mixed"] for phase in ("prefill", "generate")
        },
    }
    write_result(args.output, result, table(result))
    return 0


def table(result: dict) -> str:
    tps = result["tokens_per_second"]
    lines = [
        f"{result['adapters']} sieve adapters on {result['model']}, {result['rows_per_adapter']} prompts each of "
        f"{result['prompt_tokens']} tokens, greedy generation of {result['new_tokens']} tokens; median of "
        f"{result['repeats']} ({result['date'][:10]}).",
        "",
        "| phase | mixed batch (tokens/s) | one batch per adapter, same model | one model per adapter | mixed / per adapter |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase in ("prefill", "generate"):
        lines.append(
            f"| {phase} | {tps[f'{phase}_mixed']:,.0f} | {tps[f'{phase}_per_adapter']:,.0f} | "
            f"{tps[f'{phase}_single_models']:,.0f} | {result['mixed_over_per_adapter'][phase]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
