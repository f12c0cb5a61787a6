"""Step time of expert-selective LoRA (the sieve) against LoRA on all experts and the frozen base.

One training step (forward + backward + optimizer step) of a small random-init Mixtral
(eager attention), for four variants that share identical base weights:

- ``sieve25``     this project's sieve: ``apply_sieve_lora`` on the top 25% of experts per
                  layer, chosen by ``profile_routing`` + ``select_experts(policy="topk")``
- ``ours_all``    the same code on every expert (``all_experts_selection``)
- ``peft_all``    PEFT ``LoraConfig(target_parameters=[...experts.gate_up_proj, ...down_proj])``
- ``frozen_base`` no adapter, all weights frozen, ``inputs_embeds.requires_grad_(True)`` so
                  backward still runs through every layer; no optimizer step. The floor.

One invocation measures a grid of cells, each a (shape, dtype) pair:

- shapes (``--shapes``): ``e16k2`` = 4 layers, hidden 256, 16 experts top-2, expert
  intermediate 512; ``e64k8`` = the same with 64 experts top-8 and intermediate 128, so the
  routed expert FLOPs per token are equal and only the expert granularity changes.
- dtypes (``--dtypes``): the base model is cast to fp32 or bf16; the adapters take whatever
  dtype moe_peft_ds and PEFT give them (recorded per variant as ``adapter_dtype``).

In each cell the variants run in ONE process and are timed interleaved (round robin, one step
of each variant per round, the order rotated every round) so that the noise of a shared
machine hits all of them alike. 60 timed rounds by default: on this 2-core VM one step's time
varies by 10-15% (coefficient of variation, 2026-12-02), so the median of 20 rounds moved a ratio
by about 0.05 from run to run, as much as the targets' margins. Reported per cell: median step time per variant and all raw
times, trainable parameters, optimizer-state bytes, the peak memory of one step (what the
variant holds between steps, its weights and optimizer state, plus the step's own peak increase:
on CPU from torch.profiler's memory timeline, on CUDA ``max_memory_allocated``), the adapter file
size, the target ratios with pass/MISS, and with ``--profile`` the top 12 ops by self time over
2 steps of ``sieve25`` and ``ours_all`` (where the remaining time goes). The step-time targets
are for fp32; bf16 cells report the same ratios for information only.

    python benchmarks/step_time.py                 # full grid: 4 cells, 7.4 minutes on 2 CPU cores (native bf16)
    python benchmarks/step_time.py --dtypes fp32   # the fp32 cells only, about 5 minutes on 2 CPU cores
    python benchmarks/step_time.py --device cuda   # on a GPU (timers synchronize first)
    python benchmarks/step_time.py --quick         # tiny models, one thread, no profile (about 25 s)

Measured on 2 CPU cores (AVX2, no native bf16), 2026-12-01, at 20 rounds: the full grid took
12 min 17 s, the fp32 cells 2 min 22 s. bf16 matrix products take a slow path on such a CPU (a frozen-base bf16
step at full size takes 8-10 s against 0.3 s in fp32), so bf16 cells on a CPU run a quarter of
the rounds (``rounds_of``); run them on a GPU for numbers that matter. On 2 cores with AVX512-BF16
(2026-12-02) a bf16 step takes about what an fp32 one does, and the full grid (60 rounds) took
7.4 minutes.

Writes ``benchmarks/results/step_time.json`` and a Markdown report next to it (``.md``).
Absolute times on a shared machine mean little; read the ratios.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import operator
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run from a checkout without `pip install -e .`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from measure import fill_defaults  # noqa: E402

# Sizes shared by every shape; the per-shape ones (experts, top_k, intermediate) are in SHAPES.
# --quick is a smoke run on one thread: with two threads on a shared 2-core machine, every
# parallel region waits for a descheduled thread and a tiny bf16 step goes from 0.04 s to 1 s.
DEFAULTS = dict(
    layers=4, hidden=256, heads=4, vocab=1024, batch=4, seq=256, steps=60, warmup=3, calib_batches=4, threads=2
)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=256, batch=2, seq=64, steps=3, warmup=1, calib_batches=2, threads=1)

# shape -> (full sizes, --quick sizes). Within a column top_k * intermediate is the same for
# every shape (e16k2 2 x 512 = e64k8 8 x 128), so the shapes differ in expert granularity only.
SHAPES = {
    "e16k2": (dict(experts=16, top_k=2, intermediate=512), dict(experts=8, top_k=2, intermediate=128)),
    "e64k8": (dict(experts=64, top_k=8, intermediate=128), dict(experts=16, top_k=4, intermediate=64)),
}
PER_SHAPE = ("experts", "top_k", "intermediate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_DTYPES = {"fp32"}  # the step-time "Done means" are for fp32; other dtypes are informational
PROFILED = ("sieve25", "ours_all")
PROFILE_STEPS, PROFILE_ROWS = 2, 12

# ratio name -> (numerator, denominator, quantity, comparison, bound, meaning)
TARGETS = {
    "step_time sieve25/frozen_base": (
        "sieve25",
        "frozen_base",
        "step_time",
        "<=",
        1.04,
        "sieve step vs frozen-base floor",
    ),
    "step_time ours_all/frozen_base": (
        "ours_all",
        "frozen_base",
        "step_time",
        "<=",
        1.10,
        "all-expert step vs frozen-base floor",
    ),
    "step_time sieve25/peft_all": (
        "sieve25",
        "peft_all",
        "step_time",
        "<=",
        0.70,
        "sieve step vs PEFT on all experts",
    ),
    "trainable_params sieve25/ours_all": (
        "sieve25",
        "ours_all",
        "trainable_params",
        "<=",
        0.3,
        "trainable parameters",
    ),
    "adapter_file sieve25/ours_all": (
        "sieve25",
        "ours_all",
        "adapter_file_bytes",
        "<=",
        0.3,
        "adapter checkpoint size",
    ),
    "peak_memory sieve25/ours_all": (
        "sieve25",
        "ours_all",
        "peak_memory_bytes",
        "<",
        1.0,
        "peak memory of a step (weights, optimizer state and the step's own): sieve below all experts",
    ),
}
COMPARE = {"<=": operator.le, "<": operator.lt}
INFO_RATIOS = {  # reported, no target
    "step_time peft_all/frozen_base": ("peft_all", "frozen_base", "step_time"),
    "step_time ours_all/peft_all": ("ours_all", "peft_all", "step_time"),
    "step_time sieve25/ours_all": ("sieve25", "ours_all", "step_time"),
    "optimizer_state sieve25/ours_all": ("sieve25", "ours_all", "optimizer_state_bytes"),
    "adapter_file ours_all/peft_all": ("ours_all", "peft_all", "adapter_file_bytes"),
}
SUMMARY = {  # column of the summary table -> target ratio
    "sieve/base": "step_time sieve25/frozen_base",
    "all/base": "step_time ours_all/frozen_base",
    "sieve/peft": "step_time sieve25/peft_all",
    "sieve mem < all mem": "peak_memory sieve25/ours_all",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_size_flags(p)
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        default=list(SHAPES),
        help="model shapes to measure: e16k2 = 16 experts top-2, intermediate 512 (--quick: 8 experts top-2, 128); "
        "e64k8 = 64 experts top-8, intermediate 128 (--quick: 16 experts top-4, 64) (default: both)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="dtypes the base model is cast to, one cell per shape and dtype; the step-time targets apply to "
        "fp32 cells only (default: fp32 bf16; bf16 is very slow on CPUs without native bf16)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where models and batches live; cuda synchronizes before each timer read and measures memory "
        "with torch.cuda.max_memory_allocated (default %(default)s)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"after timing each cell, run torch.profiler over {PROFILE_STEPS} steps of {' and '.join(PROFILED)} "
        f"and report the top {PROFILE_ROWS} ops by self time (default: on, off with --quick)",
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=0.25,
        help="share of experts per layer the sieve selects (topk policy) (default %(default)s)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r for every adapter variant (default %(default)s)")
    p.add_argument(
        "--alpha", type=float, default=16.0, help="LoRA alpha for every adapter variant (default %(default)s)"
    )
    p.add_argument(
        "--lr", type=float, default=1e-4, help="AdamW learning rate for the adapter variants (default %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch.set_num_threads for the whole run (default {DEFAULTS['threads']}; --quick: {QUICK['threads']})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the base weights (identical for every variant) and of the data (default %(default)s)",
    )
    p.add_argument(
        "--experts-implementation",
        default=None,
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers experts kernel for the unwrapped fused experts (frozen_base, peft_all); "
        "default: what transformers picks (grouped_mm on torch>=2.9). moe_peft_ds replaces the "
        "experts module, so it does not use this setting",
    )
    p.add_argument(
        "--variants",
        default="sieve25,ours_all,peft_all,frozen_base",
        help="comma-separated subset of variants to run (ratios need their two variants) (default %(default)s)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory measurement step")
    p.add_argument(
        "--quick",
        action="store_true",
        help="much smaller models, few steps, one thread, no profile, still every shape and dtype (a smoke run, about 25 s); "
        "explicit flags still win",
    )
    p.add_argument(
        "--output",
        default=str(ROOT / "benchmarks" / "results" / "step_time.json"),
        help="JSON result path; the Markdown report goes next to it with a .md suffix (default %(default)s)",
    )
    args = p.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    if args.profile is None:
        args.profile = not args.quick
    check_args(p, args)
    return args


def add_size_flags(p: argparse.ArgumentParser) -> None:
    # the same in every shape
    sizes = {
        "layers": "decoder layers, all MoE",
        "hidden": "hidden size",
        "heads": "attention heads, also used as KV heads",
        "vocab": "vocabulary size",
        "batch": "sequences per training batch",
        "seq": "tokens per sequence",
        "steps": "timed rounds per cell; each round runs one step of every variant",
        "warmup": "untimed warm-up rounds per cell before the timed ones",
        "calib_batches": "random calibration batches for the sieve's routing profile",
    }
    for key, meaning in sizes.items():
        p.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{meaning} (default {DEFAULTS[key]}; --quick: {QUICK[key]})",
        )
    # each shape's own unless given
    per_shape = {
        "experts": "experts per MoE layer",
        "top_k": "experts routed per token",
        "intermediate": "expert FFN intermediate size",
    }
    for key, meaning in per_shape.items():
        by_shape = ", ".join(f"{s} {full[key]}" for s, (full, _) in SHAPES.items())
        quick = ", ".join(f"{s} {q[key]}" for s, (_, q) in SHAPES.items())
        p.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{meaning}; overrides every shape's value (default per shape: {by_shape}; --quick: {quick})",
        )


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for key in (
        "layers",
        "hidden",
        "heads",
        "vocab",
        "batch",
        "seq",
        "steps",
        "calib_batches",
        "threads",
        "rank",
        *PER_SHAPE,
    ):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    for shape in args.shapes:
        cell = make_cell(args, shape, "fp32")
        if cell.top_k > cell.experts:
            p.error(f"{shape}: top-k {cell.top_k} exceeds experts {cell.experts}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False (CPU-only torch build or no visible GPU)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANT_BUILDERS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANT_BUILDERS)}")


# ---------------------------------------------------------------------------------------------
# one cell of the grid


@dataclass(frozen=True)
class Cell:
    """Everything the builders need for one (shape, dtype) cell."""

    shape: str
    dtype: str
    device: str
    layers: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    heads: int
    vocab: int
    batch: int
    seq: int
    calib_batches: int
    fraction: float
    rank: int
    alpha: float
    lr: float
    seed: int
    experts_implementation: str | None

    @property
    def name(self) -> str:
        return f"{self.shape}/{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def make_cell(args: argparse.Namespace, shape: str, dtype: str) -> Cell:
    """The cell's settings: the shape's own experts/top_k/intermediate unless given on the command line."""
    sizes = SHAPES[shape][1 if args.quick else 0]
    own = {k: sizes[k] if getattr(args, k) is None else getattr(args, k) for k in PER_SHAPE}
    shared = {f.name: getattr(args, f.name) for f in fields(Cell) if f.name not in (*PER_SHAPE, "shape", "dtype")}
    return Cell(shape=shape, dtype=dtype, **own, **shared)


# ---------------------------------------------------------------------------------------------
# model and data


def mixtral_config(cell: Cell):
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=cell.vocab,
        hidden_size=cell.hidden,
        intermediate_size=cell.intermediate,
        num_hidden_layers=cell.layers,
        num_attention_heads=cell.heads,
        num_key_value_heads=cell.heads,
        num_local_experts=cell.experts,
        num_experts_per_tok=cell.top_k,
        max_position_embeddings=max(4096, cell.seq),
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    if cell.experts_implementation:
        cfg._experts_implementation = cell.experts_implementation
    return cfg


def base_model(cell: Cell):
    """A fresh random-init model; the same seed gives bit-identical weights every call (initialised
    in fp32, then cast, so every dtype's weights round the same fp32 values)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(cell.seed)
    model = MixtralForCausalLM(mixtral_config(cell)).to(device=cell.device, dtype=cell.torch_dtype)
    model.train()
    return model


def random_batches(cell: Cell, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # on CPU, so every device sees the same tokens
    return [torch.randint(0, cell.vocab, (cell.batch, cell.seq), generator=g).to(cell.device) for _ in range(n)]


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


def build_ours(cell: Cell, name: str, selection: dict[int, list[int]], description: str, **extra) -> Variant:
    import moe_peft_ds as mp

    model = mp.apply_sieve_lora(base_model(cell), selection, mp.AdapterConfig(r=cell.rank, alpha=cell.alpha))
    opt = torch.optim.AdamW(trainable(model), lr=cell.lr)

    def save(d: Path) -> Path:
        return Path(mp.save_adapter(model, d)) / "adapter_model.safetensors"

    extra["selection"] = {str(k): v for k, v in model.moe_peft_config.selection.items()}
    return Variant(name, description, model, adapter_step(model, opt), opt, save, extra)


def build_sieve(cell: Cell) -> Variant:
    import moe_peft_ds as mp

    probe = base_model(cell)  # same weights as the variant's own copy
    calib = [{"input_ids": ids} for ids in random_batches(cell, cell.calib_batches, seed=cell.seed + 1000)]
    profile = mp.profile_routing(probe, calib, progress=False)
    selection = mp.select_experts(profile, policy="topk", fraction=cell.fraction)
    del probe
    return build_ours(
        cell,
        "sieve25",
        selection,
        f"moe_peft_ds sieve: LoRA on top {cell.fraction:.0%} experts/layer (profile_routing + select_experts topk)",
        calibration_tokens=profile.tokens,
    )


def build_ours_all(cell: Cell) -> Variant:
    import moe_peft_ds as mp

    probe = base_model(cell)
    selection = mp.all_experts_selection(probe)
    del probe
    return build_ours(cell, "ours_all", selection, "moe_peft_ds apply_sieve_lora on all experts")


PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_peft(cell: Cell) -> Variant:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=cell.rank, lora_alpha=cell.alpha, target_modules=[], target_parameters=PEFT_TARGETS)
    model = get_peft_model(base_model(cell), cfg)
    model.train()
    params = trainable(model)
    wrapped = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    if not params or wrapped != 2 * cell.layers:
        raise RuntimeError(
            f"PEFT target_parameters={PEFT_TARGETS} wrapped {wrapped} expert tensors, expected {2 * cell.layers}"
        )
    opt = torch.optim.AdamW(params, lr=cell.lr)

    def save(d: Path) -> Path:
        model.save_pretrained(str(d))
        return Path(d) / "adapter_model.safetensors"

    return Variant(
        "peft_all",
        f"PEFT LoraConfig(target_parameters={PEFT_TARGETS}), all experts",
        model,
        adapter_step(model, opt),
        opt,
        save,
        {"target_parameters": PEFT_TARGETS},
    )


def build_frozen(cell: Cell) -> Variant:
    model = base_model(cell)
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step(ids: torch.Tensor) -> float:
        x = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()  # input gradients only: backward through every layer, no weight grads
        x.grad = None
        return loss.item()

    return Variant("frozen_base", "no adapter, all frozen; backward to inputs_embeds only, no optimizer", model, step)


VARIANT_BUILDERS = {
    "sieve25": build_sieve,
    "ours_all": build_ours_all,
    "peft_all": build_peft,
    "frozen_base": build_frozen,
}


# ---------------------------------------------------------------------------------------------
# measurement helpers


def clock(device: str) -> Callable[[], float]:
    """A timer that, on CUDA, first waits for the queued kernels, so a step's time is its own."""
    if device != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return now


def cuda_peak_delta(step: Callable[[], object]) -> int:
    """Bytes by which allocated CUDA memory peaked above its level before ``step()``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_delta(step: Callable[[], object]) -> int:
    """Bytes by which the tensors alive peaked above their level before ``step()``, from torch.profiler's
    memory timeline (every tensor allocation and free on the CPU): exact, unlike the process's RSS,
    which the allocator's caching and returning of pages moves by several MiB from run to run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a CUDA-only API
        path = Path(d) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0


def resident_bytes(v: Variant) -> int:
    """What the variant holds between steps: its model's parameters and buffers (each storage once)
    and its optimizer state. Gradients are set to None after each step."""
    tensors = [*v.model.parameters(), *v.model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) + optimizer_state_bytes(v.optimizer)


MEMORY = {  # device -> (what the peak_step_memory_bytes of a variant is, how it is measured)
    "cpu": (
        "cpu_tensor_peak_delta: torch.profiler memory timeline, peak increase of tensor bytes over one step",
        cpu_peak_delta,
    ),
    "cuda": (
        "cuda_max_memory_allocated_delta: torch.cuda.max_memory_allocated increase over one step",
        cuda_peak_delta,
    ),
}


def optimizer_state_bytes(opt) -> int:
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def file_size(v: Variant) -> int | None:
    if v.save is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        return Path(v.save(Path(d))).stat().st_size


def machine(device: str) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft_version,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
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


def time_rounds(cell: Cell, variants: list[Variant], data: list[torch.Tensor], warmup: int, steps: int) -> None:
    """Round robin: one step of every variant per round, the order rotated so no variant always runs first."""
    now = clock(cell.device)
    rounds = warmup + steps
    gc.disable()  # collections happen between steps, never inside one
    try:
        for r in range(rounds):
            ids = data[r % len(data)]
            k = r % len(variants)
            this_round = {}
            for v in variants[k:] + variants[:k]:
                gc.collect()
                t0 = now()
                loss = v.step(ids)
                dt = now() - t0
                v.losses.append(loss)
                this_round[v.name] = dt
                if r >= warmup:
                    v.times.append(dt)
            tag = "warm-up" if r < warmup else "timed"
            print(
                f"{cell.name} round {r + 1}/{rounds} ({tag}) "
                + " ".join(f"{v.name}={this_round[v.name]:.3f}s" for v in variants),
                file=sys.stderr,
                flush=True,
            )
    finally:
        gc.enable()


def variant_stats(v: Variant, cell: Cell, batch: torch.Tensor, measure_memory: bool) -> dict:
    params = trainable(v.model)
    peak = MEMORY[cell.device][1](lambda: v.step(batch)) if measure_memory else None
    resident = resident_bytes(v)
    return {
        "description": v.description,
        "median_step_s": statistics.median(v.times),
        "min_step_s": min(v.times),
        "max_step_s": max(v.times),
        "step_times_s": v.times,
        "trainable_params": sum(p.numel() for p in params),
        "adapter_dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        "total_params": sum(p.numel() for p in v.model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(v.optimizer),
        "adapter_file_bytes": file_size(v),
        "peak_step_memory_bytes": peak,
        "resident_bytes": resident,
        "peak_memory_bytes": None if peak is None else resident + peak,
        "first_loss": v.losses[0],
        "last_loss": v.losses[-1],
        **v.extra,
    }


def profile_sort_key(device: str) -> str:
    """On CUDA the ops' own kernel time; their CPU time there is mostly launch overhead."""
    return "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"


def profile_ops(v: Variant, cell: Cell, data: list[torch.Tensor]) -> str:
    """torch.profiler over PROFILE_STEPS steps: the top ops by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = cell.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    gc.collect()
    with profile(activities=activities) as prof:
        for i in range(PROFILE_STEPS):
            v.step(data[i % len(data)])
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=profile_sort_key(cell.device), row_limit=PROFILE_ROWS)


def ratio_entry(per: dict, num: str, den: str, what: str) -> dict | None:
    """``num``'s quantity over ``den``'s, plus for step times the median of the per-round ratios
    (steadier when the load drifts); None when either is missing or the denominator is zero."""

    def quantity(name: str):
        return per[name]["median_step_s"] if what == "step_time" else per[name][what]

    if num not in per or den not in per or quantity(num) is None or not quantity(den):
        return None
    entry = {"value": quantity(num) / quantity(den)}
    if what == "step_time":
        entry["median_of_round_ratios"] = statistics.median(
            a / b for a, b in zip(per[num]["step_times_s"], per[den]["step_times_s"])
        )
    return entry


def cell_ratios(per: dict, cell: Cell) -> dict:
    ratios = {}
    for key, (num, den, what, op, bound, meaning) in TARGETS.items():
        entry = ratio_entry(per, num, den, what)
        if entry is not None:
            ratios[key] = {
                **entry,
                "target": f"{op} {bound:g}",
                "target_max": bound,
                "pass": COMPARE[op](entry["value"], bound),
                "applies": what != "step_time" or cell.dtype in TARGET_DTYPES,
                "meaning": meaning,
            }
    for key, (num, den, what) in INFO_RATIOS.items():
        entry = ratio_entry(per, num, den, what)
        if entry is not None:
            ratios[key] = {**entry, "target": None, "target_max": None, "pass": None, "applies": False}
    return ratios


def cell_checks(per: dict, cell: Cell) -> dict:
    firsts = [per[n]["first_loss"] for n in per]
    # LoRA B starts at zero, so every variant's first step sees the frozen base's loss, up to the
    # rounding of the different expert kernels: one bf16 epsilon (2**-8) in bf16.
    tolerance = 1e-4 if cell.dtype == "fp32" else 2**-8
    return {
        "identical_first_loss": max(firsts) - min(firsts) <= tolerance * max(1.0, abs(firsts[0])),
        "ours_all_params_equal_peft_all": (per["ours_all"]["trainable_params"] == per["peft_all"]["trainable_params"])
        if {"ours_all", "peft_all"} <= per.keys()
        else None,
    }


def checks_pass(c: dict) -> bool:
    return all(v for v in c["checks"].values() if v is not None)  # None: the check's variants did not run


def cell_config(cell: Cell, args: argparse.Namespace, variants: list[Variant]) -> dict:
    return {
        **{f.name: getattr(cell, f.name) for f in fields(Cell)},
        **{k: getattr(args, k) for k in ("threads", "quick")},
        **dict(zip(("steps", "warmup"), rounds_of(cell, args))),
        "torch_dtype": str(cell.torch_dtype).removeprefix("torch."),
        "attn_implementation": "eager",
        "experts_implementation": variants[0].model.config._experts_implementation if variants else None,
        "optimizer": "AdamW",
        "labels": "input_ids",
        "variants": args.variants,
        "memory_kind": None if args.no_memory else MEMORY[cell.device][0],
    }


def rounds_of(cell: Cell, args: argparse.Namespace) -> tuple[int, int]:
    """(timed, warm-up) rounds of a cell. A CPU without native bf16 runs bf16 GEMMs about 15x slower
    than fp32 (measured here): its bf16 cells take a quarter of the rounds (at least 3, at most all) and one warm-up,
    so that the whole grid fits in about half an hour there (at 60 rounds; 7.4 minutes with native bf16)."""
    if cell.device == "cpu" and cell.dtype != "fp32":
        return min(args.steps, max(3, args.steps // 4)), min(args.warmup, 1)
    return args.steps, args.warmup


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    """Build the variants of one (shape, dtype) cell, time them interleaved, then measure and profile them."""
    t_start = time.perf_counter()
    variants = [VARIANT_BUILDERS[name](cell) for name in args.variants]
    steps, warmup = rounds_of(cell, args)
    data = random_batches(cell, max(1, warmup + steps), seed=cell.seed + 1)
    time_rounds(cell, variants, data, warmup, steps)
    timing_s = time.perf_counter() - t_start
    per = {v.name: variant_stats(v, cell, data[0], not args.no_memory) for v in variants}
    profile = None
    if args.profile:
        profile = {
            "steps": PROFILE_STEPS,
            "sort_by": profile_sort_key(cell.device),
            "tables": {v.name: profile_ops(v, cell, data) for v in variants if v.name in PROFILED},
        }
    return {
        "config": cell_config(cell, args, variants),
        "variants": per,
        "ratios": cell_ratios(per, cell),
        "checks": cell_checks(per, cell),
        "profile": profile,
        "run_time_s": {"timing_phase": timing_s, "total": time.perf_counter() - t_start},
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = {
        "benchmark": "step_time",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "device": args.device,
        "cells": {},
    }
    t_start = time.perf_counter()
    for shape in args.shapes:
        for dtype in args.dtypes:
            cell = make_cell(args, shape, dtype)
            result["cells"][cell.name] = run_cell(cell, args)
            gc.collect()  # the cell's models are garbage now; free them before the next cell builds its own
            if args.device == "cuda":
                torch.cuda.empty_cache()
    result["run_time_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


# ---------------------------------------------------------------------------------------------
# report


def verdict(r: dict) -> str:
    """pass/MISS for a target that applies; lower-case "info: pass/miss" where it does not (bf16 step
    times), so that searching for MISS finds only real misses."""
    word = "pass" if r["pass"] else "MISS"
    return word if r["applies"] else f"info: {word.lower()}"


def summary_table(result: dict) -> list[str]:
    lines = ["| cell | " + " | ".join(SUMMARY) + " |", "|---|" + "---:|" * len(SUMMARY)]
    for name, c in result["cells"].items():
        row = [
            f"{c['ratios'][key]['value']:.2f} {verdict(c['ratios'][key])}" if key in c["ratios"] else "n/a"
            for key in SUMMARY.values()
        ]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def variant_table(c: dict) -> list[str]:
    per = c["variants"]
    base = per.get("frozen_base", {}).get("median_step_s")
    lines = [
        "| variant | median step | vs frozen base | trainable params | adapter dtype | optimizer state | adapter file "
        "| step's peak increase | peak memory |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, v in per.items():
        rel = f"{v['median_step_s'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| `{name}` | {v['median_step_s'] * 1000:.0f} ms | {rel} | {v['trainable_params']:,} | {v['adapter_dtype'] or 'n/a'} | "
            f"{_fmt_bytes(v['optimizer_state_bytes'])} | {_fmt_bytes(v['adapter_file_bytes'])} | "
            f"{_fmt_bytes(v['peak_step_memory_bytes'])} | {_fmt_bytes(v['peak_memory_bytes'])} |"
        )
    return lines


def ratio_table(c: dict) -> list[str]:
    lines = ["| ratio | measured | target | result |", "|---|---:|---:|---|"]
    for key, r in c["ratios"].items():
        if r["target"] is None:
            continue
        extra = f" (per-round {r['median_of_round_ratios']:.2f})" if "median_of_round_ratios" in r else ""
        lines.append(f"| {key} | {r['value']:.3f}{extra} | {r['target']} | {verdict(r)} |")
    info = [f"{k} = {r['value']:.2f}" for k, r in c["ratios"].items() if r["target"] is None]
    return lines + (["", "Also: " + "; ".join(info) + "."] if info else [])


def profile_section(name: str, profile: dict | None) -> list[str]:
    """One collapsed block per profiled variant (the profiler's tables are wide)."""
    if profile is None:
        return []
    lines = []
    for variant, table in profile["tables"].items():
        lines += [
            f"<details><summary>{name} <code>{variant}</code>: top {PROFILE_ROWS} ops by {profile['sort_by']}, "
            f"{profile['steps']} steps</summary>",
            "",
            "```text",
            *table.rstrip().splitlines(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def cell_section(name: str, c: dict) -> list[str]:
    cfg = c["config"]
    lines = [
        f"### {name}",
        "",
        f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['experts']} experts top-{cfg['top_k']}, intermediate "
        f"{cfg['intermediate']}, batch {cfg['batch']}x{cfg['seq']}, base in {cfg['dtype']}, base experts kernel "
        f"`{cfg['experts_implementation']}`; median of {cfg['steps']} interleaved rounds after {cfg['warmup']} warm-up.",
        "",
    ]
    lines += variant_table(c) + [""] + ratio_table(c) + [""]
    if not checks_pass(c):
        lines += [f"**Sanity checks failed:** {c['checks']}", ""]
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    first = next(iter(result["cells"].values()))["config"]
    device = result["device"] + (f" ({m['gpu']})" if m["gpu"] else "")
    memory = first["memory_kind"].split(":")[0] if first["memory_kind"] else "not measured"
    lines = [
        f"Step time (forward + backward + AdamW step) of random-init Mixtral, eager attention, LoRA r={first['rank']} "
        f"alpha={first['alpha']:g}; device {device}, {m['cpu_count']} CPUs, torch threads {first['threads']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}; peak memory = weights and optimizer state + the step's "
        f"peak increase ({memory}) ({result['date'][:10]}).",
        "",
        "Targets: "
        + "; ".join(f"{key} {spec[3]} {spec[4]:g}" for key, spec in TARGETS.items())
        + f" (step times: medians). The step-time targets apply to {'/'.join(sorted(TARGET_DTYPES))} cells only; other "
        "dtypes show the same ratios for information (`info: pass/miss`).",
        "",
        *summary_table(result),
        "",
    ]
    for name, c in result["cells"].items():
        lines += cell_section(name, c)
    if any(c["profile"] for c in result["cells"].values()):
        lines += ["Where the time goes: the profiler tables are in the `*_profile.md` file next to this one.", ""]
    return "\n".join(lines).rstrip() + "\n"


def profile_markdown(result: dict) -> str | None:
    """The profiler tables of every cell (None without ``--profile``); kept apart from the
    report, which docs/results.md quotes."""
    lines = [line for name, c in result["cells"].items() for line in profile_section(name, c["profile"])]
    return "\n".join(["# step_time: where the time goes", "", *lines]).rstrip() + "\n" if lines else None


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    out.with_suffix(".md").write_text(report)
    profiles = profile_markdown(result)
    if profiles:
        out.with_name(out.stem + "_profile.md").write_text(profiles)
    print(report)
    failed = {name: c["checks"] for name, c in result["cells"].items() if not checks_pass(c)}
    if failed:
        print(f"WARNING: sanity checks failed: {failed}", file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['run_time_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
