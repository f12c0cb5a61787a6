"""Sieve LoRA for the expert layers of Megatron-core models (megatron-core, an optional extra).

Megatron-core has no adapter mechanism of its own; this backend adds one for its three
expert implementations, each local expert ``i`` being global expert
``ep_rank * num_local_experts + i``:

- ``SequentialMLP``: ``local_experts[i].linear_fc1 / linear_fc2`` are (Column/Row)ParallelLinear
  (or their Transformer Engine twins); a selected expert's two linears are wrapped.
- ``TEGroupedMLP``: ``linear_fc1 / linear_fc2`` are grouped linears holding ``weight{i}`` per
  local expert, called with the tokens per expert; the wrapper adds LoRA to the rows of the
  selected experts.
- ``GroupedMLP`` (legacy): ``weight1 [H, E*F]`` / ``weight2 [E*F', H]``, i.e. ``[E, in, out]``
  per expert; its forward is replaced by one that runs the frozen experts as grouped GEMMs
  and adds LoRA on the selected experts' rows.

All three hold their adapters as ``lora.ExpertLoRA`` (the sieve's code), so DoRA, per-expert
ranks and the checkpoint layout are shared with the transformers backend. ``linear_fc1`` is
stored as ``gate_up_proj`` and ``linear_fc2`` as ``down_proj``: both are ``[out, in]`` and a
gated fc1 is ``[gate; up]`` like Mixtral's fused tensor, so a Megatron sieve adapter and a
transformers one differ only in their config (``checkpoint.convert_adapter``).

Adapter parameters carry ``allreduce=False`` (Megatron's DDP and optimizer then reduce them
over the expert-data-parallel group, like the experts' own weights). Expert tensor
parallelism (``expert_tensor_parallel_size > 1``) is refused: the adapters would have to be
split like the sharded base output, which is not built.

The MoE layer index is Megatron's ``layer_number - 1`` (the decoder layer, counted from 0
over the whole pipeline), the index transformers uses; expert modules outside an
``MoELayer`` are numbered in module order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..lora import ExpertLoRA, apply_expert_update, grouped_mm
from ..modules import UnsupportedModelError, replace_module

MODEL_TYPE = "megatron"
FC_NAMES = {"gate_up_proj": "linear_fc1", "down_proj": "linear_fc2"}  # checkpoint name -> Megatron name


def _experts_classes() -> tuple[type, ...]:
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

    return SequentialMLP, TEGroupedMLP, GroupedMLP


def is_megatron_model(model: nn.Module) -> bool:
    """True for a model built from megatron-core modules (megatron is then imported already)."""
    return any(type(m).__module__.startswith("megatron.core.") for m in model.modules())


@dataclass
class ExpertLayer:
    """One Megatron expert module: its layer index, the module and (inside an MoELayer) the router."""

    layer: int
    experts: nn.Module
    path: str  # where ``experts`` sits in the model
    router: nn.Module | None

    @property
    def base(self) -> nn.Module:
        return self.experts.base if isinstance(self.experts, GroupedMLPWithLoRA) else self.experts

    @property
    def first_expert(self) -> int:
        return self.base.ep_group.rank() * self.base.num_local_experts

    def global_ids(self) -> list[int]:
        return list(range(self.first_expert, self.first_expert + self.base.num_local_experts))


def expert_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every Megatron expert module of ``model``, in layer order."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    kinds = _experts_classes() + (GroupedMLPWithLoRA,)
    layers = []
    seen = {id(m.base) for m in model.modules() if isinstance(m, GroupedMLPWithLoRA)}  # found as their wrapper
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and module.layer_number is not None:
            layers.append(
                ExpertLayer(module.layer_number - 1, module.experts, f"{name}.experts".lstrip("."), module.router)
            )
            seen.add(id(module.experts))
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and id(m) not in seen]
    for order, (name, module) in enumerate(named):  # bare expert modules: numbered in module order
        layers.append(ExpertLayer(order, module, name, None))
    return sorted(layers, key=lambda x: x.layer)


def _config(model: nn.Module):
    layers = expert_layers(model)
    if not layers:
        raise UnsupportedModelError(
            "the model has no Megatron-core expert layers (SequentialMLP, TEGroupedMLP, GroupedMLP)"
        )
    return layers, layers[0].base.config


def describe(model: nn.Module) -> dict:
    """Under pipeline parallelism this rank holds some layers only (``stage_layers_only``)."""
    layers, config = _config(model)
    return {
        "model_type": MODEL_TYPE,
        "num_experts": config.num_moe_experts,
        "hidden_size": config.hidden_size,
        "moe_layers": [x.layer for x in layers],
        "stage_layers_only": True,
    }


def _check_expert_tp(layer: ExpertLayer) -> None:
    if layer.base.tp_group.size() > 1:
        raise UnsupportedModelError(
            f"layer {layer.layer}: expert tensor parallelism (size {layer.base.tp_group.size()}) is not supported by "
            "moe_peft_ds's Megatron adapters; build the model with expert_tensor_parallel_size=1"
        )


def tag_expert_params(module: nn.Module) -> None:
    """Megatron's DDP reduces parameters with ``allreduce=False`` over the expert-data-parallel group."""
    for p in module.parameters():
        if p.requires_grad:
            p.allreduce = False


def _adapter_out(out: torch.Tensor, delta, scale) -> torch.Tensor:
    """``out [..., O]`` with an ``ExpertLoRA`` update; a copy, never in place: the base output
    belongs to Megatron's (or Transformer Engine's) autograd functions."""
    flat = out.reshape(-1, out.shape[-1])
    return apply_expert_update(flat.clone(), delta, scale).view(out.shape)


def _check_dora_bias(base: nn.Module, cfg: AdapterConfig, where: str) -> None:
    """DoRA scales the bias-free output; a linear that adds its bias itself would be scaled wrongly."""
    if cfg.use_dora and getattr(base, "bias", None) is not None and not getattr(base, "skip_bias_add", False):
        raise UnsupportedModelError(f"{where}: DoRA needs the linear to return its bias separately (skip_bias_add)")


class ExpertLinearLoRA(nn.Module):
    """A Megatron expert linear plus LoRA on its selected experts; called like the linear.

    ``base`` is one expert's parallel linear (``forward(x) -> (out, bias)``) or a grouped
    linear over all local experts (``forward(x, m_splits) -> (out, bias)``, ``weight{i}``).
    """

    def __init__(self, base: nn.Module, expert_ids: list[int], cfg: AdapterConfig, first_expert: int):
        super().__init__()
        self.base = base
        self.grouped = hasattr(base, "num_gemms")
        self.lora = ExpertLoRA(expert_ids, self.weights(), cfg, first_expert)
        tag_expert_params(self.lora)

    def weights(self) -> torch.Tensor:
        """The base weight(s) as ``[E, out, in]`` (a copy for a grouped linear: read only for
        DoRA's norm, and at construction)."""
        if not self.grouped:
            return self.base.weight[None]
        return torch.stack([getattr(self.base, f"weight{i}") for i in range(self.base.num_gemms)])

    def forward(self, x: torch.Tensor, m_splits: list[int] | None = None, *args, **kwargs):
        out, bias = self.base(x, m_splits, *args, **kwargs) if self.grouped else self.base(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        counts = torch.tensor(list(m_splits) if self.grouped else [flat.shape[0]], device=x.device)
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts), device=x.device), counts, output_size=flat.shape[0]
        )
        update = self.lora(flat, expert_of_row, counts, self.weights() if self.lora.magnitude is not None else None)
        return _adapter_out(out, *update), bias

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold the adapter into the frozen weight(s) and return the plain Megatron linear."""
        for e, i in zip(self.lora.expert_ids, self.lora.ids.tolist()):
            w = getattr(self.base, f"weight{i}") if self.grouped else self.base.weight
            w.copy_(self.lora.merged_weight(e, w))
        return self.base


class GroupedMLPWithLoRA(nn.Module):
    """A legacy ``GroupedMLP`` with LoRA on its selected experts, called like it.

    The frozen experts run as grouped GEMMs over ``weight1``/``weight2`` seen as ``[E, in, out]``
    (as ``GroupedMLP`` does with the grouped_gemm package; here through the same dispatcher the
    transformers backend uses), each with the selected experts' LoRA added on their rows.
    """

    def __init__(self, base: nn.Module, expert_ids: list[int], cfg: AdapterConfig, first_expert: int):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(
            {
                name: ExpertLoRA(expert_ids, self._weight(name).transpose(1, 2), cfg, first_expert)
                for name in cfg.expert_targets
            }
        )
        tag_expert_params(self.adapters)

    def _weight(self, name: str) -> torch.Tensor:
        """``[E, in, out]`` view of fc1 (``weight1``) or fc2 (``weight2``)."""
        E, H = self.base.num_local_experts, self.base.config.hidden_size
        return self.base.weight1.view(E, H, -1) if name == "gate_up_proj" else self.base.weight2.view(E, -1, H)

    def _project(self, name: str, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w = self._weight(name)
        y = grouped_mm(x, w, counts.cumsum(0).to(torch.int32))
        if name in self.adapters:
            y = apply_expert_update(y, *self.adapters[name](x, expert_of_row, counts, w.transpose(1, 2)))
        return y

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.base.config.moe_apply_probs_on_input:  # as GroupedMLP: top-1 only, probs folded into the input
            x, probs = (probs.unsqueeze(-1) * x).to(x.dtype), torch.ones_like(probs)
        counts = tokens_per_expert.to(device=x.device, dtype=torch.long)
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
        )
        h = self.base.activation_func_with_probs(
            self._project("gate_up_proj", x, expert_of_row, counts), probs.unsqueeze(-1)
        )
        return self._project("down_proj", h, expert_of_row, counts), None

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold the adapters into ``weight1``/``weight2`` and return the plain ``GroupedMLP``."""
        for name, lora in self.adapters.items():
            w = self._weight(name).transpose(1, 2)  # [E, out, in] view of the base weight
            for e, i in zip(lora.expert_ids, lora.ids.tolist()):
                w[i].copy_(lora.merged_weight(e, w[i]))
        return self.base


def _linears(layer: ExpertLayer, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The Megatron linears of ``layer`` that LoRA would wrap (none for the legacy GroupedMLP)."""
    fcs = [FC_NAMES[name] for name in cfg.expert_targets]
    if hasattr(layer.base, "local_experts"):
        return [(fc, getattr(e, fc)) for e in layer.base.local_experts for fc in fcs]
    return [(fc, getattr(layer.base, fc)) for fc in fcs if hasattr(layer.base, fc)]


def _wrap_experts(model: nn.Module, layer: ExpertLayer, ids: list[int], cfg: AdapterConfig) -> None:
    """Put LoRA on the selected global experts ``ids`` this rank holds in ``layer``."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    base, first = layer.base, layer.first_expert
    local = [e for e in ids if first <= e < first + base.num_local_experts]
    if not local:
        return
    if isinstance(base, SequentialMLP):
        for e in local:
            expert = base.local_experts[e - first]
            for name in cfg.expert_targets:
                setattr(expert, FC_NAMES[name], ExpertLinearLoRA(getattr(expert, FC_NAMES[name]), [e], cfg, e))
    elif isinstance(base, GroupedMLP):
        if not layer.path:
            raise UnsupportedModelError(
                "a GroupedMLP that is the model itself cannot be wrapped; put it in a container"
            )
        replace_module(model, layer.path, GroupedMLPWithLoRA(base, local, cfg, first))
    else:  # TEGroupedMLP
        for name in cfg.expert_targets:
            setattr(base, FC_NAMES[name], ExpertLinearLoRA(getattr(base, FC_NAMES[name]), local, cfg, first))


class _Hooks(list):
    """Several hook handles removed as one."""

    def remove(self) -> None:
        for handle in self:
            handle.remove()


def _input_needs_grad(moe_layer: nn.Module, args: tuple):
    """Under expert parallelism every rank must run the same collectives in backward: the
    dispatcher's all-gathers and all-to-alls are differentiable, and a rank whose input needs no
    gradient (the base is frozen, and its own experts may carry no adapter) would skip them
    while the others wait. Training inputs of an expert-parallel MoE layer therefore need one."""
    hidden = args[0] if args else None
    if hidden is not None and moe_layer.training and torch.is_grad_enabled() and not hidden.requires_grad:
        return (hidden.detach().requires_grad_(True),) + tuple(args[1:])
    return None


def inject_sieve(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Freeze ``model`` and add LoRA to the selected global experts held by this rank.

    ``selection`` maps the MoE layer index (``layer_number - 1``) to global expert ids; under
    pipeline parallelism it may name layers held by other stages. Checked before anything changes.
    """
    layers, config = _config(model)
    if cfg.attention_targets or cfg.shared_expert_lora:
        raise UnsupportedModelError(
            "on Megatron models the sieve puts LoRA on the routed experts only; "
            "set attention_targets=[] and shared_expert_lora=False"
        )
    bad = [
        (layer, e)
        for layer, ids in selection.items()
        for e in ids
        if not 0 <= layer < config.num_layers or not 0 <= e < config.num_moe_experts
    ]
    if bad:
        raise ValueError(
            f"selection names (layer, expert) pairs {bad[:5]} that this model does not have "
            f"({config.num_layers} layers, {config.num_moe_experts} experts)"
        )
    for layer in layers:
        _check_expert_tp(layer)
        if cfg.use_dora:
            for name, linear in _linears(layer, cfg):
                _check_dora_bias(linear, cfg, f"layer {layer.layer} {name}")
    model.requires_grad_(False)
    for layer in layers:
        _wrap_experts(model, layer, selection.get(layer.layer, []), cfg)
    model._megatron_grad_hooks = _Hooks(
        model.get_submodule(x.path.rpartition(".")[0]).register_forward_pre_hook(_input_needs_grad)
        for x in layers
        if x.base.ep_group.size() > 1
    )


def _expert_adapters(layer: ExpertLayer) -> dict[str, list[ExpertLoRA]]:
    """The ``ExpertLoRA`` modules of one layer, by checkpoint tensor name."""
    found = {}
    for name, fc in FC_NAMES.items():
        if isinstance(layer.experts, GroupedMLPWithLoRA):
            mods = [layer.experts.adapters[name]] if name in layer.experts.adapters else []
        elif hasattr(layer.base, "local_experts"):
            mods = [
                getattr(e, fc).lora for e in layer.base.local_experts if isinstance(getattr(e, fc), ExpertLinearLoRA)
            ]
        else:
            mods = [getattr(layer.base, fc).lora] if isinstance(getattr(layer.base, fc), ExpertLinearLoRA) else []
        if mods:
            found[name] = mods
    return found


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (views), keyed ``layers.{L}.experts.{global id}.{gate_up_proj|down_proj}.{...}``."""
    state = {}
    for layer in expert_layers(model):
        for name, mods in _expert_adapters(layer).items():
            for lora in mods:
                state.update(lora.expert_state(layer.layer, name))
    return state


def held_experts(model: nn.Module) -> set[tuple[int, int]]:
    """``(layer, global expert id)`` of every expert this rank holds."""
    return {(x.layer, e) for x in expert_layers(model) for e in x.global_ids()}


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter merged from every rank: expert-parallel ranks hold other experts and pipeline
    stages other layers (keys are global, so the parts just merge)."""
    state = {k: v.to("cpu", copy=True) for k, v in adapter_state(model).items()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {k: v for part in parts for k, v in part.items()}


matches = is_megatron_model
NAME = "megatron"


def routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer, TopKRouter)`` of every MoE layer of ``model``."""
    return [(x.layer, x.router) for x in expert_layers(model) if x.router is not None]


class _Projection:
    """One projection of a Megatron MLP as MixLoRA reads an ``nn.Linear``: ``weight [out, in]``,
    ``bias``, ``in_features`` (``rows`` picks the gate or the up half of the fused ``linear_fc1``)."""

    def __init__(self, linear: nn.Module, rows: slice):
        bias = getattr(linear, "bias", None)
        self.weight = linear.weight[rows]
        self.bias = None if bias is None else bias[rows]
        self.in_features = self.weight.shape[1]


class MegatronGatedMLP(nn.Module):
    """A Megatron dense ``MLP`` with a gated ``linear_fc1 = [gate; up]`` seen as the gated MLP that
    ``mixlora.MixLoRAFFN`` wraps (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``; views,
    made on each access so they follow the parameters across ``.cuda()``)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.half = mlp.linear_fc1.weight.shape[0] // 2

    gate_proj = property(lambda self: _Projection(self.mlp.linear_fc1, slice(0, self.half)))
    up_proj = property(lambda self: _Projection(self.mlp.linear_fc1, slice(self.half, None)))
    down_proj = property(lambda self: _Projection(self.mlp.linear_fc2, slice(None)))
    act_fn = property(lambda self: self.mlp.config.activation_func)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        h = self.act_fn(F.linear(x, gate.weight, gate.bias)) * F.linear(x, up.weight, up.bias)
        return F.linear(h, down.weight, down.bias)


def dense_mlps(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """``(path, layer index, MLP)`` of every dense Megatron MLP outside the experts."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found = [
        (f"{n}.mlp".lstrip("."), m.layer_number - 1, m.mlp)
        for n, m in model.named_modules()
        if isinstance(m, TransformerLayer) and type(m.mlp) is MLP
    ]
    if found:
        return found
    experts = _experts_classes()
    inside = {id(c) for m in model.modules() if isinstance(m, experts) for c in m.modules()}
    return [
        (n, i, m)
        for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if type(m) is MLP and id(m) not in inside)
    ]
