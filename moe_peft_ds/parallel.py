"""Expert parallelism of an adapted model: which backend or method shards what (the dispatch
itself is ``dispatch``)."""

from __future__ import annotations

from torch import nn

from .backends.hf import shard_moe_blocks
from .mixlora import mixlora_layers


def shard_experts(model: nn.Module, group=None) -> nn.Module:
    """Make every MoE block of ``model`` (with its adapter already applied) expert-parallel
    over ``group``: each rank keeps E/N experts per layer, tagged for DeepSpeed. A MixLoRA
    model keeps E/N of each layer's LoRA experts (``mixlora.MixLoRAFFN.shard``).

    Call on every rank with identical models (same seed / same checkpoint).
    """
    cfg = getattr(model, "moe_peft_config", None)
    if cfg is None:
        raise ValueError("apply_sieve_lora (or load_adapter) first; expert parallelism shards the adapted model")
    if mixlora_layers(model):
        if getattr(model, "moe_peft_configs", None):
            raise ValueError("expert parallelism takes one adapter per model, not several (multi_adapter)")
        for _, layer in mixlora_layers(model):
            layer.shard(group)
        return model
    shard_moe_blocks(model, cfg, group)
    return model
