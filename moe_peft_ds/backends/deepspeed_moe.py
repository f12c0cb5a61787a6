"""Sieve LoRA for models built from DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``).

Such a layer holds this rank's ``num_local_experts`` experts in
``deepspeed_moe.experts.deepspeed_experts`` (local expert ``i`` is global expert
``ep_rank * num_local_experts + i``) and routes with a ``TopKGate``. Here:

- routing counts come from the gate's scores (top-k of its softmax, before any capacity
  dropping, padding excluded) and are all-reduced over all ranks, since each rank routes
  its own tokens;
- LoRA goes on every ``nn.Linear`` inside the selected experts, on the ranks that own
  them, tagged like DeepSpeed tags expert parameters (``allreduce=False`` and the layer's
  ``group_name``), and named under ``deepspeed_experts.N`` so that DeepSpeed's checkpoint
  code, which rejects other keys containing ``expert``, accepts them;
- the adapter state is keyed by MoE layer and *global* expert id, as for the Hugging Face
  backend, and gathered from the owning ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import AdapterConfig
from ..dispatch import ExpertParallelDispatch, deepspeed_expert_group
from ..lora import LoRALinear
from ..modules import UnsupportedModelError

MODEL_TYPE = "deepspeed_moe"


def ds_moe_layers(model: nn.Module) -> list:
    """The ``deepspeed.moe.layer.MoE`` modules of ``model`` in order; their index is the layer id."""
    from deepspeed.moe.layer import MoE

    # our own expert-parallel dispatch subclasses MoE; it is not one of these
    return [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m, ExpertParallelDispatch)]


def matches(model: nn.Module) -> bool:
    return bool(ds_moe_layers(model))


def _ep_rank(moe) -> int:
    if moe.ep_size == 1:
        return 0
    group = moe.deepspeed_moe.ep_group
    if group is None:  # deepspeed.initialize sets the layer's group later; the layout is DeepSpeed's either way
        group = deepspeed_expert_group(moe.ep_size)
    return dist.get_rank(group=group)


def global_ids(moe) -> list[int]:
    """Global expert ids of the experts this rank holds in ``moe``."""
    first = _ep_rank(moe) * moe.num_local_experts
    return list(range(first, first + moe.num_local_experts))


def describe(model: nn.Module) -> dict:
    layers = ds_moe_layers(model)
    if not layers:
        raise UnsupportedModelError("the model has no deepspeed.moe.layer.MoE layers")
    return {
        "model_type": MODEL_TYPE,
        "num_experts": layers[0].num_experts,
        "hidden_size": layers[0].deepspeed_moe.gate.wg.in_features,
        "moe_layers": list(range(len(layers))),
    }


def gate_choice(gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, index)`` ``[S, k]``: a ``TopKGate``'s top-k choice for tokens ``x [S, M]``,
    from its scores, before any capacity limit drops a token."""
    probs = torch.softmax(x.float() @ gate.wg.weight.float().t(), dim=-1)
    return probs.topk(gate.k, dim=-1)


def _wrap_linears(expert: nn.Module, cfg: AdapterConfig, group_name: str) -> None:
    """Every nn.Linear inside ``expert`` becomes a LoRALinear with DeepSpeed's expert tags."""
    for name, child in list(expert.named_modules()):
        if isinstance(child, nn.Linear):
            parent = expert.get_submodule(name.rpartition(".")[0]) if "." in name else expert
            wrapped = LoRALinear(child, cfg)
            setattr(parent, name.rpartition(".")[2], wrapped)
            for p in wrapped.parameters():
                p.allreduce, p.group_name = False, group_name


def inject_sieve(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Freeze ``model`` and add LoRA to the selected global experts held by this rank."""
    info = describe(model)
    if cfg.attention_targets or cfg.shared_expert_lora:
        raise UnsupportedModelError(
            "on DeepSpeed-MoE models the sieve puts LoRA on the routed experts only; "
            "set attention_targets=[] and shared_expert_lora=False"
        )
    bad = [
        (layer, e)
        for layer, ids in selection.items()
        for e in ids
        if layer not in info["moe_layers"] or not 0 <= e < info["num_experts"]
    ]
    if bad:
        raise ValueError(f"selection names (layer, expert) pairs {bad[:5]} that this model does not have")
    model.requires_grad_(False)
    for layer, moe in enumerate(ds_moe_layers(model)):
        chosen = set(selection.get(layer, []))
        for expert, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, global_ids(moe)):
            if e in chosen:
                _wrap_linears(expert, cfg, moe.expert_group_name)


def _state(model: nn.Module, gather: bool) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed ``layers.{L}.experts.{global id}.{path in expert}.{lora_A|lora_B|magnitude}``;
    with ``gather``, merged from every rank of each layer's expert-parallel group."""
    state = {}
    for layer, moe in enumerate(ds_moe_layers(model)):
        for expert, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, global_ids(moe)):
            for name, p in expert.named_parameters():
                if "lora_" in name or "magnitude" in name:
                    state[f"layers.{layer}.experts.{e}.{name}"] = p.detach() if not gather else p.detach().cpu()
    groups = {moe.deepspeed_moe.ep_group for moe in ds_moe_layers(model) if moe.ep_size > 1}
    if gather and groups:
        (group,) = groups  # one expert-parallel size per model
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, state, group=group)
        state = {k: v for part in parts for k, v in part.items()}
    return state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (views into the parameters), under their global keys
    ``layers.{L}.experts.{global id}.{path in expert}.{lora_A|lora_B|magnitude}``."""
    return _state(model, gather=False)


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter on CPU, merged from every rank of each layer's expert-parallel group."""
    return _state(model, gather=True)


def held_experts(model: nn.Module) -> set[tuple[int, int]]:
    """``(layer, global expert id)`` of every expert this rank holds."""
    return {(layer, e) for layer, moe in enumerate(ds_moe_layers(model)) for e in global_ids(moe)}


NAME = "deepspeed_moe"
