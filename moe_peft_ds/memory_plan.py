"""What a training layout needs per rank, from a model's config alone (no weights, no GPU).

The model is built on the meta device from its transformers config, so every parameter count
(the fused experts and the rest, the LoRA the sieve would put on them) is exact for any family the
transformers backend supports. Memory then follows the launcher's rules: the frozen base in
``--dtype``; adapters in fp32 (``adapter_dtype``); AdamW's two states per trainable parameter;
ZeRO-1/2's fp32 master partition, with ZeRO-1 partitioning the optimizer states and ZeRO-2 the
gradients as well, over the ranks that share a parameter (all ranks for replicated adapters, the
expert-data-parallel group ``world / ep`` for expert adapters); expert parallelism keeping E/N
experts per rank, loaded per rank. Activations and the all-to-all volume are estimates (stated
in ``ESTIMATED``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backends.hf import ExpertsLayout, find_moe_blocks, weight_out_in
from .config import AdapterConfig, ConfigError, SieveConfig
from .placement import check_redundant, max_redundant

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32
ESTIMATED = {
    "activations": "per MoE decoder layer about B*S*H*(18 + 2*k) elements in --dtype kept for backward (attention "
    "inputs/outputs, norms, router, k routed copies of the token), plus the attention scores B*heads*S*S; with "
    "activation checkpointing only each layer's input plus one layer recomputed",
    "all_to_all": "dispatch + combine forward and their backward, 4 x B*S*k*H elements per MoE layer, the share "
    "(N-1)/N leaving the rank under even routing (+2 with activation checkpointing: the recomputed forward)",
    "expert_adapters_per_rank": "the largest share one rank can hold: min(selected experts, E/N) per layer (the sieve "
    "picks by profile, so one rank may hold all of a layer's selected experts)",
}


@dataclass(frozen=True)
class ModelShapes:
    """Parameter counts of a model, from its config."""

    model_type: str
    layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    heads: int
    expert_params: int  # all fused expert tensors, all layers
    other_params: int  # everything else (attention, norms, embeddings, routers, shared experts)
    lora_per_expert: int  # LoRA parameters of one expert at rank r=1 over the default expert targets (r scales it)
    dora_per_expert: int  # DoRA's magnitudes of one expert: one per output row of each target tensor
    attention_lora: dict  # projection -> LoRA parameters at r=1 over all layers

    @classmethod
    def of(cls, config) -> "ModelShapes":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        blocks = find_moe_blocks(model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = [b.experts for b in blocks]
        expert_ids = {id(p) for e in experts for p in e.parameters()}
        layout = ExpertsLayout.of(experts[0])
        targets = [weight_out_in(experts[0], t, layout.transposed).shape[1:] for t in layout.tensors(AdapterConfig())]
        return cls(
            model_type=config.model_type,
            layers=text.num_hidden_layers,
            moe_layers=len(blocks),
            num_experts=experts[0].down_proj.shape[0],
            top_k=_top_k(text),
            hidden=text.hidden_size,
            heads=text.num_attention_heads,
            expert_params=sum(p.numel() for e in experts for p in e.parameters()),
            other_params=sum(p.numel() for p in model.parameters() if id(p) not in expert_ids),
            lora_per_expert=sum(out + inp for out, inp in targets),
            dora_per_expert=sum(out for out, _ in targets),
            attention_lora=_attention_lora(model),
        )


def _top_k(text) -> int:
    for attr in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k"):
        if isinstance(getattr(text, attr, None), int):
            return getattr(text, attr)
    raise ConfigError(f"model_type={text.model_type!r}: the config names no experts per token")


def _attention_lora(model: nn.Module) -> dict:
    from .backends.hf import attention_modules

    found = {}
    for module in attention_modules(model):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                found[name] = found.get(name, 0) + child.in_features + child.out_features
    return found


@dataclass(frozen=True)
class Layout:
    world: int
    ep: int
    zero: int


@dataclass(frozen=True)
class Run:
    """What the launcher would be asked to do."""

    dtype: str = "bf16"
    method: str = "sieve"  # sieve | lora (all experts)
    sieve: SieveConfig = field(default_factory=SieveConfig)
    r: int = 16
    use_dora: bool = False
    attention_targets: tuple = ()
    batch_size: int = 1
    max_length: int = 2048
    activation_checkpointing: bool = False
    redundant_experts: int = 0  # copies of hot experts per rank and layer (expert parallel only)


def check_layout(shapes: ModelShapes, layout: Layout) -> None:
    if layout.zero not in (0, 1, 2):
        raise ConfigError(f"--zero {layout.zero}: expert parallelism runs with ZeRO-0, 1 or 2")
    if layout.world < 1 or layout.ep < 1 or layout.world % layout.ep:
        raise ConfigError(f"--ep-size {layout.ep} must divide --world-size {layout.world}")
    if shapes.num_experts % layout.ep:
        raise ConfigError(f"--ep-size {layout.ep} does not divide the {shapes.num_experts} experts per layer")


def expert_slots(shapes: ModelShapes, layout: Layout, run: Run) -> int:
    """Experts each rank holds per MoE layer: E/N, plus ``run.redundant_experts`` copies under
    expert parallelism (``placement.replicated``)."""
    share = shapes.num_experts // layout.ep
    if layout.ep == 1:
        return share
    check_redundant(shapes.num_experts, layout.ep, run.redundant_experts)
    return share + run.redundant_experts


def plan(shapes: ModelShapes, layout: Layout, run: Run) -> dict:
    """Bytes per rank (and the counts behind them) of ``run`` on ``layout``."""
    check_layout(shapes, layout)
    base = DTYPE_BYTES[run.dtype]
    per_layer = run.sieve.per_layer_budget(shapes.num_experts) if run.method == "sieve" else shapes.num_experts
    local_experts = shapes.num_experts // layout.ep
    expert_lora = run.r * shapes.lora_per_expert + (shapes.dora_per_expert if run.use_dora else 0)
    attention = run.r * sum(shapes.attention_lora[t] for t in run.attention_targets)
    expert_adapter = shapes.moe_layers * min(per_layer, local_experts) * expert_lora  # this rank, at most
    expert_adapter_all = shapes.moe_layers * per_layer * expert_lora
    # the ranks that share one parameter's gradient and optimizer state (ZeRO partitions over them)
    dp_expert, dp_all = layout.world // layout.ep, layout.world
    grads = _partitioned(expert_adapter, dp_expert, layout.zero >= 2) + _partitioned(
        attention, dp_all, layout.zero >= 2
    )
    states = ADAM_STATES + (1 if layout.zero >= 1 else 0)  # + ZeRO's fp32 master partition
    optim = _partitioned(expert_adapter, dp_expert, layout.zero >= 1) + _partitioned(
        attention, dp_all, layout.zero >= 1
    )
    tokens = run.batch_size * run.max_length
    act_layer = tokens * shapes.hidden * (18 + 2 * shapes.top_k) + run.batch_size * shapes.heads * run.max_length**2
    if run.activation_checkpointing:
        activations = (shapes.layers * tokens * shapes.hidden + act_layer) * base
    else:
        activations = shapes.layers * act_layer * base
    exchanges = 4 + (2 if run.activation_checkpointing else 0)
    a2a = exchanges * shapes.moe_layers * tokens * shapes.top_k * shapes.hidden * base * (layout.ep - 1) // layout.ep
    out = {
        "base_experts": shapes.expert_params * base * expert_slots(shapes, layout, run) // shapes.num_experts,
        "base_other": shapes.other_params * base,
        "adapter_params": expert_adapter + attention,
        "adapter_params_all_ranks": expert_adapter_all + attention,
        "adapters": (expert_adapter + attention) * 4,
        "gradients": grads * 4,
        "optimizer_states": optim * 4 * states,
        "activations": activations,
        "all_to_all_per_step": a2a,
    }
    out["peak_at_load"] = out["base_experts"] + out["base_other"]
    # Host: the memory-mapped checkpoint pages this rank reads count as resident, next to the
    # tensors made from them (a checkpoint stored in --dtype); the Python/torch runtime comes on top.
    out["host_peak_at_load"] = 2 * out["peak_at_load"]
    out["total"] = sum(out[k] for k in ("base_experts", "base_other", "adapters", "gradients", "optimizer_states"))
    out["total"] += activations
    return out


def _partitioned(count: int, ranks: int, partitioned: bool) -> int:
    return math.ceil(count / ranks) if partitioned else count


def smallest_fit(shapes: ModelShapes, run: Run, budget: int, max_world: int = 4096) -> tuple[Layout, dict] | None:
    """The layout with the fewest ranks (then the smallest EP degree, then the lowest ZeRO stage)
    whose every rank needs at most ``budget`` bytes."""
    world = 1
    while world <= max_world:
        for ep in range(1, world + 1):
            if (
                world % ep
                or shapes.num_experts % ep
                or (ep > 1 and run.redundant_experts > max_redundant(shapes.num_experts, ep))
            ):
                continue
            for zero in (0, 1, 2):
                layout = Layout(world, ep, zero)
                need = plan(shapes, layout, run)
                if need["total"] <= budget:
                    return layout, need
        world *= 2
    return None


def as_dict(layout: Layout) -> dict:
    return asdict(layout)
