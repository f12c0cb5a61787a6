"""Expert parallelism of an adapted model: which backend or method shards what (the dispatch
itself is ``dispatch``)."""

from __future__ import annotations

from torch import nn

from .backends.hf import adapter_flops_share, shard_moe_blocks
from .config import AdapterConfig, ConfigError
from .mixlora import mixlora_layers, pool_groups
from .placement import PLACEMENTS, balanced, check_redundant, expert_loads


def shard_experts(model: nn.Module, group=None, placements: dict | None = None) -> nn.Module:
    """Make every MoE block of ``model`` (with its adapter already applied) expert-parallel
    over ``group``: each rank keeps E/N experts per layer, tagged for DeepSpeed. A MixLoRA
    model keeps E/N of each layer's LoRA experts (``mixlora.MixLoRAFFN.shard``). Which ones,
    per layer, ``placements`` says (``{layer: placement}``, see ``placement``; default: by id).

    Call on every rank with identical models (same seed / same checkpoint).
    """
    cfg = getattr(model, "moe_peft_config", None)
    if cfg is None:
        raise ValueError("apply_sieve_lora (or load_adapter) first; expert parallelism shards the adapted model")
    cfg.expert_placement = dict(placements or {})  # recorded in the adapter config (informative)
    if mixlora_layers(model):
        if getattr(model, "moe_peft_configs", None):
            raise ValueError("expert parallelism takes one adapter per model, not several (multi_adapter)")
        for index, layer in mixlora_layers(model):
            layer.shard(group, (placements or {}).get(index))
        return model
    shard_moe_blocks(model, cfg, group, placements)
    return model


def plan_placements(
    model: nn.Module,
    counts: dict[int, list[int]],
    ep_size: int,
    mode: str,
    cfg,
    selection: dict | None = None,
    redundant: int = 0,
) -> dict[int, list[list[int]]]:
    """``{layer: placement}`` for ``shard_experts``: empty for ``contiguous``; for ``balanced``,
    each layer's routed ``counts`` (a routing profile's, or MixLoRA routers' on calibration data)
    spread over the ``ep_size`` ranks, a selected expert's rows weighted by its adapter's extra
    work, a MixLoRA pool's task groups each split evenly; ``redundant`` slots per rank hold copies
    of the hottest experts (transformers experts only)."""
    if mode not in PLACEMENTS:
        raise ValueError(f"expert placement {mode!r} is not one of {PLACEMENTS}")
    if mode == "contiguous" or ep_size == 1:
        return {}
    mixlora = dict(mixlora_layers(model))
    if mixlora and redundant:
        raise ConfigError("redundant expert slots copy a model's experts; MixLoRA's LoRA experts take none")
    if mixlora:
        return {layer: balanced(counts[layer], ep_size, pool_groups(ffn)) for layer, ffn in mixlora.items()}
    num_experts = len(next(iter(counts.values())))
    check_redundant(num_experts, ep_size, redundant)
    share = adapter_flops_share(model, cfg) if isinstance(cfg, AdapterConfig) else 0.0
    selection = selection or {}
    return {
        layer: balanced(expert_loads(c, selection.get(layer, ()), share), ep_size, redundant=redundant)
        for layer, c in counts.items()
    }


def place_mixlora_experts(model: nn.Module, placements: dict[int, list[list[int]]]) -> None:
    """Move the LoRA experts of an expert-parallel MixLoRA model to ``placements`` (``{layer:
    placement}``; every rank calls this): each layer gathers its experts and keeps those the
    placement gives it (``MixLoRAFFN.unshard`` / ``shard``)."""
    for index, layer in mixlora_layers(model):
        if layer.dispatch is None:
            raise ValueError("place_mixlora_experts takes an expert-parallel MixLoRA model (shard_experts first)")
        group = layer.dispatch.group
        layer.unshard()
        layer.shard(group, placements.get(index))
    model.moe_peft_config.expert_placement = dict(placements)
