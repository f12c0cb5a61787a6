"""Step time of expert-selective LoRA (the sieve) against LoRA on all experts and the frozen base.

One training step (forward + backward + optimizer step) of a small random-init Mixtral
(fp32, eager attention), for four variants that share identical base weights:

- ``sieve25``     this project's sieve: ``apply_sieve_lora`` on the top 25% of experts per
                  layer, chosen by ``profile_routing`` + ``select_experts(policy="topk")``
- ``ours_all``    the same code on every expert (``all_experts_selection``)
- ``peft_all``    PEFT ``LoraConfig(target_parameters=[...experts.gate_up_proj, ...down_proj])``
- ``frozen_base`` no adapter, all weights frozen, ``inputs_embeds.requires_grad_(True)`` so
                  backward still runs through every layer; no optimizer step. The floor.

The variants run in ONE process and are timed interleaved (round robin, one step of each
variant per round, the order rotated every round) so that the noise of a shared machine hits
all of them alike. Reported: median step time per variant and all raw times, trainable
parameters, optimizer-state bytes, an approximate peak-RSS increase over one step, and the
adapter file size; and the ratios that DESIGN.md / the README track, with pass/miss.

    python benchmarks/step_time.py            # default size (several minutes on 2 cores)
    python benchmarks/step_time.py --quick    # tiny model, a few steps (< 1 minute)

Writes ``benchmarks/results/step_time.json`` and a Markdown table next to it (``.md``).
Absolute times on a shared machine mean little; read the ratios.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run from a checkout without `pip install -e .`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults, peak_rss_delta  # noqa: E402

DEFAULTS = dict(layers=4, hidden=256, intermediate=512, experts=16, top_k=2, heads=4, vocab=1024,
                batch=4, seq=256, steps=20, warmup=3, calib_batches=4)
QUICK = dict(layers=2, hidden=64, intermediate=128, experts=8, top_k=2, heads=4, vocab=256,
             batch=2, seq=64, steps=3, warmup=1, calib_batches=2)

# ratio name -> (numerator, denominator, quantity, target (<=), meaning)
TARGETS = {
    "step_time sieve25/ours_all": ("sieve25", "ours_all", "step_time", 0.6, "sieve step vs our all-expert LoRA"),
    "step_time ours_all/peft_all": ("ours_all", "peft_all", "step_time", 1.0, "our all-expert LoRA vs PEFT's"),
    "step_time sieve25/frozen_base": ("sieve25", "frozen_base", "step_time", 1.25, "sieve step vs frozen-base floor"),
    "trainable_params sieve25/ours_all": ("sieve25", "ours_all", "trainable_params", 0.3, "trainable parameters"),
    "adapter_file sieve25/ours_all": ("sieve25", "ours_all", "adapter_file_bytes", 0.3, "adapter checkpoint size"),
}
INFO_RATIOS = {  # reported, no target
    "step_time peft_all/frozen_base": ("peft_all", "frozen_base", "step_time"),
    "step_time ours_all/frozen_base": ("ours_all", "frozen_base", "step_time"),
    "step_time sieve25/peft_all": ("sieve25", "peft_all", "step_time"),
    "optimizer_state sieve25/ours_all": ("sieve25", "ours_all", "optimizer_state_bytes"),
    "adapter_file ours_all/peft_all": ("ours_all", "peft_all", "adapter_file_bytes"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = {"experts": "experts per MoE layer", "top_k": "experts routed per token", "layers": "decoder layers, all MoE",
             "hidden": "hidden size", "intermediate": "expert FFN intermediate size",
             "heads": "attention heads, also used as KV heads", "vocab": "vocabulary size",
             "batch": "sequences per training batch", "seq": "tokens per sequence",
             "steps": "timed rounds; each round runs one step of every variant",
             "warmup": "untimed warm-up rounds before the timed ones",
             "calib_batches": "random calibration batches for the sieve's routing profile"}
    for key, meaning in sizes.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"{meaning} (default {DEFAULTS[key]}; --quick: {QUICK[key]})")
    p.add_argument("--fraction", type=float, default=0.25, help="share of experts per layer the sieve selects (topk policy) (default %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r for every adapter variant (default %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha for every adapter variant (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate for the adapter variants (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the whole run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights (identical for every variant) and of the data (default %(default)s)")
    p.add_argument("--experts-implementation", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                   help="transformers experts kernel for the unwrapped fused experts (frozen_base, peft_all); "
                        "default: what transformers picks (grouped_mm on torch>=2.9). moe_peft_ds replaces the "
                        "experts module, so it does not use this setting")
    p.add_argument("--variants", default="sieve25,ours_all,peft_all,frozen_base",
                   help="comma-separated subset of variants to run (ratios need their two variants) (default %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS measurement step")
    p.add_argument("--quick", action="store_true", help="much smaller model and few steps (a smoke run, < 1 minute); explicit flags still win")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "step_time.json"),
                   help="JSON result path; the Markdown table goes next to it with a .md suffix (default %(default)s)")
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    for key in ("experts", "top_k", "layers", "hidden", "intermediate", "heads", "vocab", "batch", "seq", "steps", "calib_batches", "threads", "rank"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANT_BUILDERS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANT_BUILDERS)}")
    return args


# ---------------------------------------------------------------------------------------------
# model and data


def mixtral_config(args):
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    if args.experts_implementation:
        cfg._experts_implementation = args.experts_implementation
    return cfg


def base_model(args):
    """A fresh random-init model; the same seed gives bit-identical weights every call."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(mixtral_config(args)).float()
    model.train()
    return model


def random_batches(args, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    name: str
    description: str
    model: torch.nn.Module
    step: Callable[[torch.Tensor], float]  # one full training step on a batch; returns the loss
    optimizer: torch.optim.Optimizer | None = None
    save: Callable[[Path], Path] | None = None  # writes the adapter, returns the weights file
    extra: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_step(model, optimizer) -> Callable[[torch.Tensor], float]:
    def step(ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def build_ours(args, name: str, selection: dict[int, list[int]], description: str, **extra) -> Variant:
    import moe_peft_ds as mp

    model = mp.apply_sieve_lora(base_model(args), selection, mp.AdapterConfig(r=args.rank, alpha=args.alpha))
    opt = torch.optim.AdamW(trainable(model), lr=args.lr)

    def save(d: Path) -> Path:
        return Path(mp.save_adapter(model, d)) / "adapter_model.safetensors"

    extra["selection"] = {str(k): v for k, v in model.moe_peft_config.selection.items()}
    return Variant(name, description, model, adapter_step(model, opt), opt, save, extra)


def build_sieve(args) -> Variant:
    import moe_peft_ds as mp

    probe = base_model(args)  # same weights as the variant's own copy
    calib = [{"input_ids": ids} for ids in random_batches(args, args.calib_batches, seed=args.seed + 1000)]
    profile = mp.profile_routing(probe, calib, progress=False)
    selection = mp.select_experts(profile, policy="topk", fraction=args.fraction)
    del probe
    return build_ours(args, "sieve25", selection,
                      f"moe_peft_ds sieve: LoRA on top {args.fraction:.0%} experts/layer (profile_routing + select_experts topk)",
                      calibration_tokens=profile.tokens)


def build_ours_all(args) -> Variant:
    import moe_peft_ds as mp

    probe = base_model(args)
    selection = mp.all_experts_selection(probe)
    del probe
    return build_ours(args, "ours_all", selection, "moe_peft_ds apply_sieve_lora on all experts")


PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_peft(args) -> Variant:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=[], target_parameters=PEFT_TARGETS)
    model = get_peft_model(base_model(args), cfg)
    model.train()
    params = trainable(model)
    wrapped = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    if not params or wrapped != 2 * args.layers:
        raise RuntimeError(f"PEFT target_parameters={PEFT_TARGETS} wrapped {wrapped} expert tensors, expected {2 * args.layers}")
    opt = torch.optim.AdamW(params, lr=args.lr)

    def save(d: Path) -> Path:
        model.save_pretrained(str(d))
        return Path(d) / "adapter_model.safetensors"

    return Variant("peft_all", f"PEFT LoraConfig(target_parameters={PEFT_TARGETS}), all experts", model,
                   adapter_step(model, opt), opt, save, {"target_parameters": PEFT_TARGETS})


def build_frozen(args) -> Variant:
    model = base_model(args)
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step(ids: torch.Tensor) -> float:
        x = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()  # input gradients only: backward through every layer, no weight grads
        x.grad = None
        return loss.item()

    return Variant("frozen_base", "no adapter, all frozen; backward to inputs_embeds only, no optimizer", model, step)


VARIANT_BUILDERS = {"sieve25": build_sieve, "ours_all": build_ours_all, "peft_all": build_peft, "frozen_base": build_frozen}


# ---------------------------------------------------------------------------------------------
# measurement helpers


def optimizer_state_bytes(opt) -> int:
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def file_size(v: Variant) -> int | None:
    if v.save is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        return Path(v.save(Path(d))).stat().st_size


def machine() -> dict:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__, "peft": peft_version,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


# ---------------------------------------------------------------------------------------------
# run


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = {"benchmark": "step_time", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine()}
    t_start = time.perf_counter()

    variants = [VARIANT_BUILDERS[name](args) for name in args.variants]
    result["config"] = {
        **{k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "vocab",
                                         "batch", "seq", "steps", "warmup", "calib_batches", "fraction", "rank",
                                         "alpha", "lr", "threads", "seed", "quick")},
        "dtype": "float32", "attn_implementation": "eager",
        "experts_implementation": variants[0].model.config._experts_implementation if variants else None,
        "optimizer": "AdamW", "labels": "input_ids", "variants": args.variants,
    }

    data = random_batches(args, max(1, args.warmup + args.steps), seed=args.seed + 1)
    rounds = args.warmup + args.steps
    gc.disable()  # collections happen between steps, never inside one
    try:
        for r in range(rounds):
            ids = data[r % len(data)]
            k = r % len(variants)
            this_round = {}
            for v in variants[k:] + variants[:k]:  # rotate the order so no variant always runs first
                gc.collect()
                t0 = time.perf_counter()
                loss = v.step(ids)
                dt = time.perf_counter() - t0
                v.losses.append(loss)
                this_round[v.name] = dt
                if r >= args.warmup:
                    v.times.append(dt)
            tag = "warm-up" if r < args.warmup else "timed"
            print(f"round {r + 1}/{rounds} ({tag}) " + " ".join(f"{v.name}={this_round[v.name]:.3f}s" for v in variants),
                  file=sys.stderr, flush=True)
    finally:
        gc.enable()
    timing_s = time.perf_counter() - t_start


    per = {}
    for v in variants:
        n_train = sum(p.numel() for p in trainable(v.model))
        per[v.name] = {
            "description": v.description,
            "median_step_s": statistics.median(v.times),
            "min_step_s": min(v.times),
            "max_step_s": max(v.times),
            "step_times_s": v.times,
            "trainable_params": n_train,
            "total_params": sum(p.numel() for p in v.model.parameters()),
            "optimizer_state_bytes": optimizer_state_bytes(v.optimizer),
            "adapter_file_bytes": file_size(v),
            "peak_rss_delta_bytes": None if args.no_memory else peak_rss_delta(lambda: v.step(data[0])),
            "first_loss": v.losses[0],
            "last_loss": v.losses[-1],
            **v.extra,
        }
    result["variants"] = per

    def quantity(name: str, what: str):
        return per[name]["median_step_s"] if what == "step_time" else per[name][what]

    def paired(num: str, den: str) -> float:
        """Median over rounds of the within-round ratio: steadier when the load drifts."""
        return statistics.median(a / b for a, b in zip(per[num]["step_times_s"], per[den]["step_times_s"]))

    ratios = {}
    for key, (num, den, what, target, meaning) in TARGETS.items():
        if num in per and den in per and quantity(num, what) and quantity(den, what):
            value = quantity(num, what) / quantity(den, what)
            ratios[key] = {"value": value, "target_max": target, "pass": value <= target, "meaning": meaning}
            if what == "step_time":
                ratios[key]["median_of_round_ratios"] = paired(num, den)
    for key, (num, den, what) in INFO_RATIOS.items():
        if num in per and den in per and quantity(num, what) and quantity(den, what):
            ratios[key] = {"value": quantity(num, what) / quantity(den, what), "target_max": None, "pass": None}
            if what == "step_time":
                ratios[key]["median_of_round_ratios"] = paired(num, den)
    result["ratios"] = ratios

    firsts = [per[n]["first_loss"] for n in per]
    result["checks"] = {
        # LoRA B starts at zero, so every variant's first step sees the same loss as the frozen base.
        "identical_first_loss": max(firsts) - min(firsts) <= 1e-4 * max(1.0, abs(firsts[0])),
        "ours_all_params_equal_peft_all": (per["ours_all"]["trainable_params"] == per["peft_all"]["trainable_params"])
        if {"ours_all", "peft_all"} <= per.keys() else None,
    }
    result["run_time_s"] = {"timing_phase": timing_s, "total": time.perf_counter() - t_start}
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def markdown(result: dict) -> str:
    c, m, per = result["config"], result["machine"], result["variants"]
    base = per.get("frozen_base", {}).get("median_step_s")
    lines = [
        f"Step time (forward + backward + AdamW step), random-init Mixtral: {c['layers']} layers, hidden {c['hidden']}, "
        f"intermediate {c['intermediate']}, {c['experts']} experts top-{c['top_k']}, batch {c['batch']}x{c['seq']}, "
        f"fp32, LoRA r={c['rank']} alpha={c['alpha']:g}; {m['cpu_count']} CPUs, {c['threads']} torch threads, torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}; base experts kernel `{c['experts_implementation']}`; "
        f"median of {c['steps']} interleaved rounds after {c['warmup']} warm-up ({result['date'][:10]}).",
        "",
        "| variant | median step | vs frozen base | trainable params | optimizer state | adapter file | peak RSS +step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in per.items():
        rel = f"{v['median_step_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| `{name}` | {v['median_step_s'] * 1000:.0f} ms | {rel} | {v['trainable_params']:,} | "
                     f"{_fmt_bytes(v['optimizer_state_bytes'])} | {_fmt_bytes(v['adapter_file_bytes'])} | "
                     f"{_fmt_bytes(v['peak_rss_delta_bytes'])} |")
    lines += ["", "| ratio | measured | target | result |", "|---|---:|---:|---|"]
    for key, r in result["ratios"].items():
        if r["target_max"] is None:
            continue
        extra = f" (per-round {r['median_of_round_ratios']:.2f})" if "median_of_round_ratios" in r else ""
        lines.append(f"| {key} | {r['value']:.3f}{extra} | <= {r['target_max']} | {'pass' if r['pass'] else 'MISS'} |")
    info = [f"{k} = {r['value']:.2f}" for k, r in result["ratios"].items() if r["target_max"] is None]
    if info:
        lines += ["", "Also: " + "; ".join(info) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    if not all(v for v in result["checks"].values() if v is not None):
        print(f"WARNING: sanity checks failed: {result['checks']}", file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['run_time_s']['total']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
