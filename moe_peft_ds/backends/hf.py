"""Hugging Face transformers (5.x) MoE models, found by their experts interface, and adapter injection.

transformers marks every fused experts class with ``use_experts_implementation``, which records
the layout on each instance (``has_gate``, ``is_transposed``, ``has_bias``,
``has_post_expert_norm``, and ``_apply_gate`` for the gated activation), and every MoE block
calls its experts as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. So a
model is supported when it holds such modules: no per-family registry. ``FusedExpertsWithLoRA``
replaces an experts module behind that same call, computes every expert from the frozen fused
tensors, and adds LoRA only for the selected experts on the tokens routed to them. Dense layers
(no experts module) and hybrid stacks (attention / linear attention / SSM layers) need nothing:
only blocks that hold fused experts are touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ATTENTION_TARGETS, AdapterConfig
from ..lora import ExpertLoRA, LoRALinear, apply_expert_update, grouped_mm
from ..routing import expert_counts

EXPERT_TARGETS = ("gate_up_proj", "down_proj")  # the up (gate and up, or up alone) tensor and the down one
SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")  # attributes of a block holding shared experts


class UnsupportedModelError(ValueError):
    """The model holds no MoE layers this backend can adapt."""


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts module (``use_experts_implementation`` set its flags)."""
    down = getattr(module, "down_proj", None)
    return (all(hasattr(module, f) for f in ("has_gate", "is_transposed", "has_bias"))
            and isinstance(down, torch.Tensor) and down.dim() == 3)


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its experts, read from its experts-interface flags."""

    up: str  # "gate_up_proj" (gated: ``[gate; up]`` or interleaved, split by ``_apply_gate``) or "up_proj"
    transposed: bool  # tensors stored ``[E, in, out]`` instead of ``[E, out, in]``
    has_bias: bool  # ``<tensor>_bias`` exist
    has_gate: bool  # gated activation ``_apply_gate``; else ``act_fn`` on the up projection
    post_norm: bool  # ``post_expert_norm`` after the down projection

    @classmethod
    def of(cls, experts: nn.Module) -> "ExpertsLayout":
        base = base_experts(experts)
        return cls("gate_up_proj" if base.has_gate else "up_proj", bool(base.is_transposed), bool(base.has_bias),
                   bool(base.has_gate), bool(getattr(base, "has_post_expert_norm", False)))

    def tensor(self, target: str) -> str:
        """The module's tensor behind an expert target (``gate_up_proj`` means ``up_proj`` without a gate)."""
        return self.up if target == "gate_up_proj" else target

    def describe(self) -> str:
        parts = [self.up, "[E, in, out]" if self.transposed else "[E, out, in]"]
        parts += ["bias"] * self.has_bias + ["no gate"] * (not self.has_gate) + ["post-expert norm"] * self.post_norm
        return ", ".join(parts)


@dataclass
class MoEBlock:
    """One MoE block found in a model: its decoder-layer index, its path, and the attribute of
    its experts module."""

    layer: int
    name: str
    module: nn.Module
    attr: str = "experts"

    @property
    def experts(self) -> nn.Module:
        return getattr(self.module, self.attr)

    @experts.setter
    def experts(self, new: nn.Module) -> None:
        setattr(self.module, self.attr, new)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module path (``model.layers.3.mlp`` -> 3), or None."""
    match = _LAYER_INDEX.search(name + ".")
    return None if match is None else int(match.group(1))


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of ``model`` (a module holding fused experts) in layer order."""
    blocks = []
    for name, module in model.named_modules():
        if getattr(module, "wraps_experts", False):
            continue  # our wrappers hold the experts module; their parent block is the one found
        for attr, child in module.named_children():
            if not is_fused_experts(base_experts(child)):
                continue
            layer = layer_index(f"{name}.{attr}")
            if layer is None:
                raise UnsupportedModelError(f"MoE experts {name}.{attr} are not under a 'layers.N.' path")
            blocks.append(MoEBlock(layer, name, module, attr))
    if not blocks:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not a supported MoE model: it holds no fused experts module (transformers "
            "marks those with use_experts_implementation); supported: every transformers MoE family with fused experts, "
            "models built from deepspeed.moe.layer.MoE, and Megatron-core MoE layers")
    return sorted(blocks, key=lambda b: b.layer)


def base_experts(experts: nn.Module) -> nn.Module:
    """The frozen fused experts module, whether or not it is wrapped (adapters, expert parallelism)."""
    experts = getattr(experts, "local", experts) if getattr(experts, "wraps_experts", False) else experts
    return experts.base if isinstance(experts, FusedExpertsWithLoRA) else experts


def num_local_experts(experts: nn.Module) -> int:
    return base_experts(experts).down_proj.shape[0]


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

    wraps_experts = True

    def __init__(self, base: nn.Module, expert_ids: list[int], cfg: AdapterConfig, first_expert: int = 0):
        """``base`` holds experts ``first_expert ..`` (all of them unless expert-parallel);
        ``expert_ids`` are global ids among those, possibly none (a rank without adapters)."""
        super().__init__()
        self.base = base
        self.layout = ExpertsLayout.of(base)
        self.num_experts = base.down_proj.shape[0]  # local experts
        self.first_expert = first_expert
        tensors = [self.layout.tensor(t) for t in cfg.expert_targets]
        self.adapters = nn.ModuleDict({
            t: ExpertLoRA(expert_ids, weight_out_in(base, t, self.layout.transposed), cfg, first_expert) for t in tensors
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
        w = weight_out_in(self.base, tensor, self.layout.transposed)  # [E, out, in]
        y = grouped_mm(x, w.transpose(1, 2), counts.cumsum(0).to(torch.int32))
        if tensor in self.adapters:
            y = apply_expert_update(y, *self.adapters[tensor](x, expert_of_row, counts, w))
        if self.layout.has_bias:
            y = y + getattr(self.base, f"{tensor}_bias")[expert_of_row]
        return y

    def expert_rows(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The expert FFN on rows ``x [S, H]`` sorted by (local) expert; ``counts [E]`` rows per expert."""
        h = self._project(self.layout.up, x, expert_of_row, counts)
        h = self.base._apply_gate(h) if self.layout.has_gate else self.base.act_fn(h)
        y = self._project("down_proj", h, expert_of_row, counts)
        return self.base.post_expert_norm(y) if self.layout.post_norm else y

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
            w = weight_out_in(self.base, tensor, self.layout.transposed)
            for e in adapter.expert_ids:
                local = e - self.first_expert
                w[local].copy_(adapter.merged_weight(e, w[local]))
        return self.base


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.<path>`` is."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _wrap_linears(parent: nn.Module, names: tuple[str, ...] | None, cfg: AdapterConfig) -> int:
    """Replace ``parent.<name>`` nn.Linear children (every one with ``names=None``) by LoRALinear;
    returns how many."""
    n = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear) and (names is None or name in names):
            setattr(parent, name, LoRALinear(child, cfg))
            n += 1
    return n


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules (softmax, MLA, linear attention) of every decoder layer."""
    return [m for n, m in model.named_modules() if layer_index(n) is not None and "attention" in type(m).__name__.lower()]


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the nn.Linear projections the attention modules of ``model`` hold, among ``ATTENTION_TARGETS``."""
    found = {n for m in attention_modules(model) for n, c in m.named_children() if isinstance(c, nn.Linear)}
    return [t for t in ATTENTION_TARGETS if t in found]


def check_attention_targets(model: nn.Module, targets: list[str]) -> None:
    """Raise if ``targets`` names projections this model's attention does not have; changes nothing."""
    missing = sorted(set(targets) - set(attention_projections(model)))
    if missing:
        raise UnsupportedModelError(f"attention_targets {missing} are not attention projections of this model; "
                                    f"it has {attention_projections(model)}")


def inject_attention_lora(model: nn.Module, cfg: AdapterConfig) -> int:
    """Plain LoRA on the attention projections named in ``cfg.attention_targets``."""
    check_attention_targets(model, cfg.attention_targets)
    targets = tuple(cfg.attention_targets)
    return sum(_wrap_linears(m, targets, cfg) for m in attention_modules(model))


def shared_experts(block: MoEBlock) -> list[nn.Module]:
    """The shared experts of a block (plain MLPs every token goes through)."""
    return [m for attr in SHARED_EXPERTS if isinstance(m := getattr(block.module, attr, None), nn.Module)]


def check_shared_expert_lora(blocks: list[MoEBlock], cfg: AdapterConfig) -> None:
    """Raise if ``cfg`` asks for shared-expert LoRA that this model cannot take; changes nothing."""
    if not getattr(cfg, "shared_expert_lora", False):
        return
    shared = [s for b in blocks for s in shared_experts(b)]
    if not shared:
        raise UnsupportedModelError(f"shared_expert_lora: this model's MoE blocks have no shared experts (one of {SHARED_EXPERTS})")
    if not any(isinstance(m, nn.Linear) for s in shared for m in s.modules()):
        raise UnsupportedModelError("shared_expert_lora: this model's shared experts are fused tensors, not nn.Linear "
                                    "projections; LoRA on them is not supported")


def check_selection(model: nn.Module, selection: dict[int, list[int]]) -> list[MoEBlock]:
    """Raise if ``selection`` names layers or experts the model does not have; changes nothing."""
    blocks = find_moe_blocks(model)
    layers = {b.layer for b in blocks}
    unknown = sorted(set(selection) - layers)
    if unknown:
        raise ValueError(f"selection names layers {unknown} that are not MoE layers of this model; MoE layers: {sorted(layers)}")
    num_experts = num_local_experts(blocks[0].experts)
    for layer, ids in selection.items():
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"selection for layer {layer} has expert ids {bad} outside [0, {num_experts})")
    return blocks


def inject_expert_lora(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Wrap the experts of every selected layer; layers with no selected expert stay untouched."""
    for block in check_selection(model, selection):
        ids = selection.get(block.layer, [])
        if ids:
            block.experts = FusedExpertsWithLoRA(block.experts, sorted(ids), cfg)
        if cfg.shared_expert_lora:
            for parent in [m for shared in shared_experts(block) for m in shared.modules()]:
                _wrap_linears(parent, None, cfg)


def text_config(model: nn.Module):
    """The config of the language model (the text config of a multimodal one)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def describe_model(model: nn.Module) -> dict:
    """Facts about an MoE model that an adapter must match."""
    blocks = find_moe_blocks(model)
    experts = blocks[0].experts
    # Expert-parallel blocks hold E/N experts; their wrapper knows the global count.
    num_experts = experts.num_experts if hasattr(experts, "local") else num_local_experts(experts)
    return {
        "model_type": model.config.model_type,
        "num_experts": num_experts,
        "hidden_size": text_config(model).hidden_size,
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
    check_attention_targets(model, cfg.attention_targets)
    check_shared_expert_lora(find_moe_blocks(model), cfg)
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
