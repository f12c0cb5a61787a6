"""MixLoRA: the fast shared-W1/W3 path against the reference path, and K adapters trained in
one batch against K separate base-model copies.

1. Latency (one process, interleaved rounds, medians): forward + backward of a small random
   LLaMA whose FFNs are MixLoRA layers (8 experts, top-2, LoRA r=8, attention LoRA), with the
   fast path and with the reference path (same adapter weights, same batch); and the same for
   the MixLoRA FFN layers alone (hidden states in, the attention and LM head left out).
   Target (issue 17): fast / reference <= 0.6; a per-category profile of the FFN step says where the time goes.
2. Memory (one fresh process per variant, peak RSS above the RSS after imports): K=4 MixLoRA
   adapters trained together in one batch over one frozen base (``multi_adapter``) against
   4 base-model copies with one adapter each, trained on the same samples in lockstep (the
   memory of 4 jobs running at the same time, without their 4 runtimes); and tokens/s.
   Target: multi / separate <= 0.5. This runs on a larger model (``MEMORY``): the saving is
   the shared frozen weights, so it shows where they outweigh a step's activations; it is
   measured without and with activation checkpointing (the same setting on both sides).

    python benchmarks/mixlora.py            # default size (a few minutes on 2 cores)
    python benchmarks/mixlora.py --quick    # tiny, seconds

Writes ``benchmarks/results/mixlora.json`` and ``mixlora.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults, write_result  # noqa: E402

DEFAULTS = dict(
    layers=4,
    hidden=512,
    intermediate=1408,
    heads=8,
    vocab=4096,
    experts=8,
    top_k=2,
    r=8,
    batch=4,
    seq=256,
    rounds=10,
    adapters=4,
    memory_steps=3,
)
QUICK = dict(
    layers=2,
    hidden=64,
    intermediate=160,
    heads=4,
    vocab=256,
    experts=4,
    top_k=2,
    r=4,
    batch=2,
    seq=32,
    rounds=2,
    adapters=4,
    memory_steps=1,
)
# The memory comparison is about the frozen weights that the adapters share, so it runs on a
# model whose weights outweigh one step's activations (as a 7B model's do at small batches).
MEMORY = dict(layers=8, hidden=1024, intermediate=2816, heads=8, vocab=8192, batch=1, seq=128)
TARGETS = {
    "latency model fast/reference": 0.6,
    "latency ffn fast/reference": 0.6,
    "peak memory multi/separate": 0.5,
    "peak memory multi/separate, activation checkpointing": 0.5,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "mixlora.json"), help="result JSON path")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--memory-child", choices=["multi", "separate"], help=argparse.SUPPRESS)  # internal
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # internal: memory child setting
    for key, value in DEFAULTS.items():
        p.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value} ({QUICK[key]} with --quick)"
        )
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    return args


def base_model(args, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return tf.LlamaForCausalLM(cfg)


def mixlora_config(args):
    from moe_peft_ds import MixLoRAConfig

    return MixLoRAConfig(num_experts=args.experts, top_k=args.top_k, r=args.r)


def with_trained_b(model, seed: int = 0):
    """B starts at zero; give it values so that both paths do all their work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def tokens(args, seed: int, batch: int | None = None) -> torch.Tensor:
    return torch.randint(0, args.vocab, (batch or args.batch, args.seq), generator=torch.Generator().manual_seed(seed))


def interleaved_medians(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Time every step function once per round, rotating the order; all raw times."""
    names, times = list(steps), {n: [] for n in steps}
    for n in names:  # warm-up
        steps[n]()
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
    return times


def latency(args) -> dict:
    from moe_peft_ds import apply_mixlora
    from moe_peft_ds.mixlora import mixlora_layers, set_fast_path

    model = with_trained_b(apply_mixlora(base_model(args), mixlora_config(args)))
    model.train()
    ids = tokens(args, 1)
    layers = [layer for _, layer in mixlora_layers(model)]
    hidden = torch.randn(
        args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(2), requires_grad=True
    )

    def model_step(fast: bool):
        def step():
            set_fast_path(model, fast)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        return step

    def ffn_step(fast: bool):
        def step():
            set_fast_path(model, fast)
            model.zero_grad(set_to_none=True)
            sum(layer(hidden).square().mean() for layer in layers).backward()

        return step

    with torch.no_grad():  # the two paths compute the same thing
        set_fast_path(model, True)
        fast_out = model(input_ids=ids).logits
        set_fast_path(model, False)
        diff = (model(input_ids=ids).logits - fast_out).abs().max().item()
    times = interleaved_medians(
        {
            "model fast": model_step(True),
            "model reference": model_step(False),
            "ffn fast": ffn_step(True),
            "ffn reference": ffn_step(False),
        },
        args.rounds,
    )
    medians = {n: statistics.median(t) for n, t in times.items()}
    tokens_per_step = args.batch * args.seq
    profiled = {"ffn fast": breakdown(ffn_step(True)), "ffn reference": breakdown(ffn_step(False))}
    return {
        "max_abs_logit_difference": diff,
        "median_s": medians,
        "times_s": times,
        "breakdown_ms": profiled,
        "tokens_per_s": {n: tokens_per_step / m for n, m in medians.items()},
        "ratios": {
            "latency model fast/reference": medians["model fast"] / medians["model reference"],
            "latency ffn fast/reference": medians["ffn fast"] / medians["ffn reference"],
        },
    }


# op name fragments -> category of the fast/reference breakdown (first match wins). On CPU torch's
# grouped GEMM runs one aten::mm per expert, so the LoRA experts' products count as "frozen GEMMs"
# there too; LABELS says so in the report.
CATEGORIES = (
    ("frozen GEMMs", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("LoRA grouped GEMMs", ("grouped_mm",)),
    (
        "gathers, scatters, mixing",
        ("index_select", "index_copy", "index_add", "aten::index", "aten::cat", "aten::stack", "aten::sum"),
    ),
    ("routing", ("topk", "softmax", "sort", "scatter_add", "cumsum", "bincount")),
    ("elementwise", ("silu", "mul", "add", "where", "div", "neg", "sigmoid", "copy_", "fill_", "zero_")),
)


LABELS = {
    "frozen GEMMs": "matrix products (aten::mm: the frozen W1/W2/W3; on CPU the LoRA experts' too)",
    "LoRA grouped GEMMs": "grouped GEMM calls (aten::_grouped_mm itself)",
}


def breakdown(step, steps: int = 2) -> dict[str, float]:
    """Self CPU milliseconds per step of ``step`` by op category (``CATEGORIES``), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        category = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), "other")
        totals[category] += event.self_cpu_time_total / 1000 / steps
    return totals


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def checkpointed(model, args):
    """With ``--checkpointing``: recompute every decoder layer in backward (non-re-entrant)."""
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def memory_child(args) -> dict:
    """Run in a fresh process: train K adapters one way; peak RSS above the RSS after imports."""
    import tempfile

    from moe_peft_ds import apply_mixlora, load_adapter, save_adapter
    from moe_peft_ds.train import train_multi_adapter

    torch.set_num_threads(args.threads)
    names = [f"task{i}" for i in range(args.adapters)]
    loaders = {}
    for i, n in enumerate(names):
        ids = tokens(args, 10 + i)
        loaders[n] = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(apply_mixlora(base_model(args), mixlora_config(args)), tmp)  # every adapter starts here
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        start_kb = _status_kb("VmRSS")
        begin = time.perf_counter()
        if args.memory_child == "multi":
            model = checkpointed(load_adapter(base_model(args), tmp, adapter_name=names[0]), args)
            for n in names[1:]:
                load_adapter(model, tmp, adapter_name=n)
            train_multi_adapter(model, loaders, args.memory_steps, {n: 1e-3 for n in names}, progress=False)
        else:  # K copies trained in lockstep, as K jobs running side by side would be
            models = [checkpointed(load_adapter(base_model(args), tmp), args).train() for _ in names]
            optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in models]
            for _ in range(args.memory_steps):
                sum(m(**loaders[n][0]).loss for m, n in zip(models, names)).backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - begin
    peak_kb = _status_kb("VmHWM")
    return {
        "peak_rss_above_imports_bytes": (peak_kb - start_kb) * 1024,
        "seconds": seconds,
        "tokens_per_s": args.adapters * args.batch * args.seq * args.memory_steps / seconds,
    }


def memory_sizes(args) -> dict:
    return {key: getattr(args, key) if args.quick or key not in MEMORY else MEMORY[key] for key in DEFAULTS}


def memory(args) -> dict:
    """Each variant in a fresh process, without and with activation checkpointing (both sides alike)."""
    out = {}
    for variant in ("multi", "separate", "multi+ckpt", "separate+ckpt"):
        cmd = [sys.executable, __file__, "--memory-child", variant.split("+")[0], "--threads", str(args.threads)]
        cmd += ["--checkpointing"] if variant.endswith("+ckpt") else []
        for key, value in memory_sizes(args).items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["sizes"] = memory_sizes(args)
    peak = {v: out[v]["peak_rss_above_imports_bytes"] for v in ("multi", "separate", "multi+ckpt", "separate+ckpt")}
    out["ratios"] = {
        "peak memory multi/separate": peak["multi"] / peak["separate"],
        "peak memory multi/separate, activation checkpointing": peak["multi+ckpt"] / peak["separate+ckpt"],
    }
    # Why the ratio is what it is: the frozen weights W are shared (1 copy against K), the rest is not.
    with torch.device("meta"):
        weights = sum(
            p.numel() * p.element_size() for p in base_model(argparse.Namespace(**out["sizes"])).parameters()
        )
    k = args.adapters
    out["frozen_weight_bytes"] = weights
    out["breakdown"] = {}
    for ckpt in ("", "+ckpt"):
        rest_multi, rest_separate = peak["multi" + ckpt] - weights, peak["separate" + ckpt] - k * weights
        out["breakdown"]["multi/separate" + ckpt] = {
            "multi_non_weight_bytes": rest_multi,
            "separate_non_weight_bytes": rest_separate,
            # the best a shared base can do: the separate jobs' activations, one copy of the weights
            "floor": (weights + rest_separate) / (k * weights + rest_separate),
        }
    return out


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"Small LLaMA (random init): {a['layers']} layers, hidden {a['hidden']}, FFN {a['intermediate']}, "
        f"vocab {a['vocab']}; MixLoRA {a['experts']} experts top-{a['top_k']}, r={a['r']}, attention LoRA; "
        f"batch {a['batch']}x{a['seq']} tokens; fp32, {a['threads']} threads ({result['date']}).",
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
    ]
    ratios = {**result["latency"]["ratios"], **result["memory"]["ratios"]}
    for name, value in ratios.items():
        lines.append(f"| {name} | {value:.2f} | <= {TARGETS[name]} | {'pass' if value <= TARGETS[name] else 'MISS'} |")
    lat, mem = result["latency"], result["memory"]
    lines += ["", "| | median s / step | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {n} | {lat['median_s'][n]:.3f} | {lat['tokens_per_s'][n]:.0f} |" for n in lat["median_s"]]
    prof = lat["breakdown_ms"]
    lines += [
        "",
        "Where the FFN step's time goes (self CPU ms per step, torch.profiler, 2 steps after a warm-up):",
        "",
        "| category | ffn fast | ffn reference | fast/reference |",
        "|---|---:|---:|---:|",
    ]
    for cat in prof["ffn fast"]:
        fast, ref = prof["ffn fast"][cat], prof["ffn reference"][cat]
        label = LABELS.get(cat, cat)
        lines.append(
            f"| {label} | {fast:.1f} | {ref:.1f} | {fast / ref:.2f} |"
            if ref
            else f"| {label} | {fast:.1f} | {ref:.1f} | |"
        )
    total = {k: sum(v.values()) for k, v in prof.items()}
    lines.append(
        f"| total | {total['ffn fast']:.1f} | {total['ffn reference']:.1f} | {total['ffn fast'] / total['ffn reference']:.2f} |"
    )
    m = result["memory"]["sizes"]
    lines += [
        "",
        f"Memory: {m['adapters']} adapters, {m['memory_steps']} steps, each adapter's batch {m['batch']}x{m['seq']}, "
        f"on a larger LLaMA ({m['layers']} layers, hidden {m['hidden']}, FFN {m['intermediate']}, vocab {m['vocab']}) "
        "whose frozen weights outweigh a step's activations.",
        "",
        "| variant | peak RSS above imports | tokens/s |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {n} | {mem[n]['peak_rss_above_imports_bytes'] / 2**20:.1f} MiB | {mem[n]['tokens_per_s']:.0f} |"
        for n in ("multi", "separate", "multi+ckpt", "separate+ckpt")
    ]
    lines += [
        "",
        f"Breakdown: the frozen weights are {mem['frozen_weight_bytes'] / 2**20:.0f} MiB (one copy shared by multi, "
        f"{m['adapters']} for separate); the rest is activations, adapters, optimizer state and allocator slack.",
        "",
        "| | multi: rest | separate: rest (all jobs) | multi/separate floor (shared weights, separate's rest) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {b['multi_non_weight_bytes'] / 2**20:.0f} MiB | {b['separate_non_weight_bytes'] / 2**20:.0f} MiB | "
        f"{b['floor']:.2f} |"
        for name, b in mem["breakdown"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    result = {
        "date": _dt.date.today().isoformat(),
        "machine": platform.platform(),
        "args": vars(args),
        "latency": latency(args),
        "memory": memory(args),
    }
    result["targets"] = {
        name: {"value": value, "target": TARGETS[name], "pass": value <= TARGETS[name]}
        for name, value in {**result["latency"]["ratios"], **result["memory"]["ratios"]}.items()
    }
    write_result(args.output, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
