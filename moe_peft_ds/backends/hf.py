"""Hugging Face transformers (5.x) MoE families: the registry, and adapter injection.

A family is data: which attribute of the MoE block holds the router, which the fused
experts, how the expert tensors are laid out, and which attributes hold shared experts.
Adding a family is one ``MoEFamily`` entry in ``FAMILIES``.

All families route the same way at the experts' boundary: the router returns
``(logits, top_k_weights [T, k], top_k_index [T, k])`` and the experts module is called as
``experts(hidden [T, H], top_k_index, top_k_weights)``. ``FusedExpertsWithLoRA`` replaces
the experts module behind that same call, computes every expert from the frozen fused
tensors, and adds LoRA only for the selected experts on the tokens routed to them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ATTENTION_TARGETS, AdapterConfig
from ..lora import ExpertLoRA, LoRALinear, apply_expert_update, grouped_mm
from ..routing import expert_counts

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def chunked_glu(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """Mixtral/Qwen/OLMoE/DeepSeek: ``[gate; up]`` halves, ``act(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def gpt_oss_glu(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS: interleaved gate/up with clamping; the base module owns the exact formula."""
    return experts._apply_gate(gate_up)


@dataclass(frozen=True)
class MoEFamily:
    """How one transformers MoE family lays out its block, router and experts."""

    name: str
    model_types: tuple[str, ...]
    router: str = "gate"  # attribute of the MoE block holding the router
    experts: str = "experts"  # attribute of the MoE block holding the fused experts
    transposed: bool = False  # expert tensors stored [E, in, out] instead of [E, out, in]
    has_bias: bool = False  # gate_up_proj_bias / down_proj_bias exist
    glu: Callable[[nn.Module, torch.Tensor], torch.Tensor] = chunked_glu
    shared: tuple[str, ...] = ()  # attributes holding shared experts (plain MLPs)


FAMILIES = (
    MoEFamily("mixtral", ("mixtral",)),
    MoEFamily("qwen2_moe", ("qwen2_moe",), shared=("shared_expert",)),
    MoEFamily("qwen3_moe", ("qwen3_moe",)),
    MoEFamily("olmoe", ("olmoe",)),
    # Sigmoid router with correction bias and grouped top-k; shared experts. GLM4-MoE matches.
    MoEFamily("deepseek_v3", ("deepseek_v3", "glm4_moe"), shared=("shared_experts",)),
    MoEFamily("gpt_oss", ("gpt_oss",), router="router", transposed=True, has_bias=True, glu=gpt_oss_glu),
)


class UnsupportedModelError(ValueError):
    """The model's architecture is not in the registry."""


def supported_model_types() -> list[str]:
    return sorted(t for fam in FAMILIES for t in fam.model_types)


def family_of(model: nn.Module) -> MoEFamily:
    """The registry entry for ``model.config.model_type``, or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported MoE family; supported: {supported_model_types()}. "
        "Add a MoEFamily entry in moe_peft_ds/backends/hf.py to support another layout."
    )


@dataclass
class MoEBlock:
    """One MoE block found in a model: its decoder-layer index and the module."""

    layer: int
    name: str
    module: nn.Module

    def router(self, fam: MoEFamily) -> nn.Module:
        return getattr(self.module, fam.router)

    def experts(self, fam: MoEFamily) -> nn.Module:
        return getattr(self.module, fam.experts)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_moe_blocks(model: nn.Module, fam: MoEFamily | None = None) -> list[MoEBlock]:
    """Every MoE block of ``model`` in layer order (dense layers are skipped)."""
    fam = fam or family_of(model)
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, fam.experts, None)
        if experts is None or not hasattr(module, fam.router):
            continue
        if not hasattr(base_experts(experts), "gate_up_proj"):
            continue
        match = _LAYER_INDEX.search(name + ".")
        if match is None:
            raise UnsupportedModelError(f"MoE block {name!r} is not under a 'layers.N.' path")
        blocks.append(MoEBlock(int(match.group(1)), name, module))
    if not blocks:
        raise UnsupportedModelError(f"no MoE blocks with fused experts found in this {fam.name} model")
    return sorted(blocks, key=lambda b: b.layer)


def base_experts(experts: nn.Module) -> nn.Module:
    """The frozen fused experts module, whether or not it is wrapped (adapters, expert parallelism)."""
    experts = getattr(experts, "local", experts)  # parallel.ExpertParallelExperts holds the local experts
    return experts.base if isinstance(experts, FusedExpertsWithLoRA) else experts


def weight_out_in(experts: nn.Module, tensor: str, transposed: bool) -> torch.Tensor:
    """An expert tensor as ``[E, out, in]`` (a view for transposed layouts)."""
    w = getattr(experts, tensor)
    return w.transpose(1, 2) if transposed else w


@dataclass
class Routes:
    """The top-k assignments of a batch, grouped by expert once (a stable sort)."""

    order: torch.Tensor  # [S] flat (token, slot) index of each assignment, sorted by expert
    expert: torch.Tensor  # [S] expert of each sorted assignment
    token: torch.Tensor  # [S] token of each sorted assignment
    counts: torch.Tensor  # [E] assignments per expert

    @classmethod
    def of(cls, top_k_index: torch.Tensor, num_experts: int, rows: int, counts: torch.Tensor | None = None) -> "Routes":
        """``rows`` is how many slots go to an expert (``top_k_index.numel()`` when none is masked):
        the caller knows it on the host, so building the routes never syncs with the device.
        Index E (one past the last expert) marks a masked slot: it sorts last and is dropped.
        ``counts``: ``expert_counts`` of ``top_k_index``, if the caller has them already."""
        expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
        order, expert = order[:rows], expert[:rows]
        counts = expert_counts(top_k_index, num_experts) if counts is None else counts
        return cls(order, expert, order // top_k_index.shape[1], counts)

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """The row of each assignment, in sorted order: ``per_token [T, D]`` -> ``[S, D]``.
        ``index_select``, not ``per_token[token]``: its backward is an ``index_add``, which on
        CPU is several times faster than indexing's accumulating put."""
        return per_token.index_select(0, self.token)

    def combine(self, hidden_states: torch.Tensor, y: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Weight the expert outputs ``y [S, H]`` (in sorted order) and sum them per token."""
        return self.mix(y, top_k_weights, hidden_states.shape[0]).to(hidden_states.dtype)

    def mix(self, y: torch.Tensor, top_k_weights: torch.Tensor, tokens: int) -> torch.Tensor:
        """``[tokens, D]``: the rows ``y [S, D]`` (in sorted order) weighted and summed per token.
        With every slot routed, the rows go back to slot order and each token sums its k rows
        (deterministic, as transformers does); masked slots make S smaller and take an index_add."""
        k = top_k_weights.shape[-1]
        if y.shape[0] == tokens * k:
            slotted = torch.empty_like(y).index_copy_(0, self.order, y).view(tokens, k, -1)  # [T, k, D]
            return (slotted * top_k_weights.reshape(tokens, k, 1)).sum(1)
        y = y * top_k_weights.reshape(-1)[self.order, None]
        return y.new_zeros((tokens, y.shape[1])).index_add_(0, self.token, y)


def unrouted_tokens(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T]``: True for tokens whose every slot is masked (index E): MixLoRA's padding and capacity drops."""
    return (top_k_index == num_experts).all(-1)


def add_unrouted(out: torch.Tensor, hidden: torch.Tensor, unrouted: torch.Tensor, count: int, fallback) -> torch.Tensor:
    """``out [T, H]`` plus ``fallback(rows)`` on the ``count`` tokens ``unrouted [T]`` marks; ``count``
    comes from the host already, so picking them does not sync."""
    if not count:
        return out
    tokens = torch.argsort(~unrouted, stable=True)[:count]
    return out.index_add(0, tokens, fallback(hidden.index_select(0, tokens)).to(out.dtype))


class FusedExpertsWithLoRA(nn.Module):
    """A fused experts module whose selected experts carry LoRA (or DoRA).

    Called exactly like the module it wraps. Tokens are grouped by expert once per call
    (a stable sort of the flattened top-k assignments); the frozen experts run as one
    grouped GEMM per tensor, as in transformers, and only the rows routed to selected
    experts get the LoRA update (two more grouped GEMMs over the selected experts).
    """

    def __init__(self, base: nn.Module, fam: MoEFamily, expert_ids: list[int], cfg: AdapterConfig, first_expert: int = 0):
        """``base`` holds experts ``first_expert ..`` (all of them unless expert-parallel);
        ``expert_ids`` are global ids among those, possibly none (a rank without adapters)."""
        super().__init__()
        self.base = base
        self.family = fam
        self.num_experts = base.gate_up_proj.shape[0]  # local experts
        self.first_expert = first_expert
        self.adapters = nn.ModuleDict({
            t: ExpertLoRA(expert_ids, weight_out_in(base, t, fam.transposed), cfg, first_expert) for t in cfg.expert_targets
        } if expert_ids else {})
        base.requires_grad_(False)
        # The base tensors are read here, not in base.forward: ZeRO-3 must gather them for this module.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in base.parameters():
            register_external_parameter(self, p)

    @property
    def expert_ids(self) -> list[int]:
        """Global ids of the experts that carry adapters."""
        return next(iter(self.adapters.values())).expert_ids if self.adapters else []

    def _project(self, tensor: str, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x [S, in]`` (rows sorted by expert) through each row's expert of ``tensor``, plus LoRA."""
        w = weight_out_in(self.base, tensor, self.family.transposed)  # [E, out, in]
        y = grouped_mm(x, w.transpose(1, 2), counts.cumsum(0).to(torch.int32))
        if tensor in self.adapters:
            y = apply_expert_update(y, *self.adapters[tensor](x, expert_of_row, counts, w))
        if self.family.has_bias:
            y = y + getattr(self.base, f"{tensor}_bias")[expert_of_row]
        return y

    def expert_rows(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The expert FFN on rows ``x [S, H]`` sorted by (local) expert; ``counts [E]`` rows per expert."""
        h = self.family.glu(self.base, self._project("gate_up_proj", x, expert_of_row, counts))
        return self._project("down_proj", h, expert_of_row, counts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # A slot transformers masks (index E) runs on expert 0 with weight 0: every slot then has a
        # row, and how many there are is known without asking the device.
        masked = top_k_index == self.num_experts
        top_k_index, top_k_weights = top_k_index.masked_fill(masked, 0), top_k_weights.masked_fill(masked, 0)
        routes = Routes.of(top_k_index, self.num_experts, rows=top_k_index.numel())
        return routes.combine(hidden_states, self.expert_rows(routes.gather(hidden_states), routes.expert, routes.counts),
                              top_k_weights)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold every adapter into the fused tensors and return the plain experts module."""
        for tensor, adapter in self.adapters.items():
            w = weight_out_in(self.base, tensor, self.family.transposed)
            for e in adapter.expert_ids:
                local = e - self.first_expert
                w[local].copy_(adapter.merged_weight(e, w[local]))
        return self.base


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.<path>`` is."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _wrap_linears(parent: nn.Module, names: tuple[str, ...], cfg: AdapterConfig) -> int:
    """Replace ``parent.<name>`` nn.Linear children by LoRALinear; returns how many."""
    n = 0
    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Linear):
            setattr(parent, name, LoRALinear(child, cfg))
            n += 1
    return n


def inject_attention_lora(model: nn.Module, cfg: AdapterConfig) -> int:
    """Plain LoRA on the attention projections named in ``cfg.attention_targets``."""
    targets = tuple(t for t in ATTENTION_TARGETS if t in cfg.attention_targets)
    return sum(_wrap_linears(m, targets, cfg) for n, m in model.named_modules() if n.endswith("self_attn"))


def check_selection(model: nn.Module, selection: dict[int, list[int]]) -> list[MoEBlock]:
    """Raise if ``selection`` names layers or experts the model does not have; changes nothing."""
    fam = family_of(model)
    blocks = find_moe_blocks(model, fam)
    layers = {b.layer for b in blocks}
    unknown = sorted(set(selection) - layers)
    if unknown:
        raise ValueError(f"selection names layers {unknown} that are not MoE layers of this model; MoE layers: {sorted(layers)}")
    num_experts = base_experts(blocks[0].experts(fam)).gate_up_proj.shape[0]
    for layer, ids in selection.items():
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"selection for layer {layer} has expert ids {bad} outside [0, {num_experts})")
    return blocks


def inject_expert_lora(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Wrap the experts of every selected layer; layers with no selected expert stay untouched."""
    fam = family_of(model)
    blocks = check_selection(model, selection)
    for block in blocks:
        ids = selection.get(block.layer, [])
        if ids:
            setattr(block.module, fam.experts, FusedExpertsWithLoRA(block.experts(fam), fam, sorted(ids), cfg))
        if cfg.shared_expert_lora:
            for attr in fam.shared:
                _wrap_linears(getattr(block.module, attr), ("gate_proj", "up_proj", "down_proj"), cfg)


def describe_model(model: nn.Module) -> dict:
    """Facts about an MoE model that an adapter must match."""
    fam = family_of(model)
    blocks = find_moe_blocks(model, fam)
    experts = blocks[0].experts(fam)
    # Expert-parallel blocks hold E/N experts; their wrapper knows the global count.
    num_experts = experts.num_experts if hasattr(experts, "local") else base_experts(experts).gate_up_proj.shape[0]
    return {
        "model_type": model.config.model_type,
        "num_experts": num_experts,
        "hidden_size": model.config.hidden_size,
        "moe_layers": [b.layer for b in blocks],
    }


def all_experts_selection(model: nn.Module) -> dict[int, list[int]]:
    """Every expert of every MoE layer: the "LoRA on all experts" baseline."""
    info = describe_model(model)
    return {layer: list(range(info["num_experts"])) for layer in info["moe_layers"]}


def apply_sieve_lora(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig | None = None) -> nn.Module:
    """Freeze ``model`` and add LoRA to the selected experts (and optional attention/shared LoRA).

    ``selection`` maps MoE layer index to global expert ids. Everything is checked before the
    model is changed. The filled-in config is attached as ``model.moe_peft_config``.
    """
    cfg = cfg or AdapterConfig()
    from .deepspeed_moe import apply_sieve_lora_ds, is_ds_moe_model
    from .megatron import apply_sieve_lora_megatron, is_megatron_model

    if is_ds_moe_model(model):  # built from deepspeed.moe.layer.MoE: its own backend
        return apply_sieve_lora_ds(model, selection, cfg)
    if is_megatron_model(model):  # Megatron-core expert layers: theirs
        return apply_sieve_lora_megatron(model, selection, cfg)
    info = describe_model(model)  # raises for unsupported models before anything changes
    if getattr(model, "moe_peft_config", None) is not None:
        raise ValueError("this model already carries a moe_peft_ds adapter; load a fresh base model")
    selection = {int(k): sorted(int(e) for e in v) for k, v in selection.items()}
    check_selection(model, selection)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_expert_lora(model, selection, cfg)
    inject_attention_lora(model, cfg)
    cfg.selection = {k: v for k, v in sorted(selection.items()) if v}
    cfg.model_type, cfg.num_experts, cfg.hidden_size = info["model_type"], info["num_experts"], info["hidden_size"]
    cfg.base_model = cfg.base_model or str(getattr(model.config, "_name_or_path", "") or "")
    model.moe_peft_config = cfg
    return model
