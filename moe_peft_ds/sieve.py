"""MoE-Sieve: LoRA on the selected experts of an MoE model, on whichever backend holds its layout."""

from __future__ import annotations

from torch import nn

from .backends import backend_for
from .config import AdapterConfig, check_selection


def all_experts_selection(model: nn.Module) -> dict[int, list[int]]:
    """Every expert of every MoE layer: the "LoRA on all experts" baseline."""
    info = backend_for(model).describe(model)
    return {layer: list(range(info["num_experts"])) for layer in info["moe_layers"]}


def apply_sieve_lora(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig | None = None) -> nn.Module:
    """Freeze ``model`` and add LoRA to the selected experts (and optional attention/shared LoRA).

    ``selection`` maps MoE layer index to global expert ids. Everything is checked before the
    model is changed. The filled-in config is attached as ``model.moe_peft_config``.
    """
    cfg = cfg or AdapterConfig()
    backend = backend_for(model)  # raises for unsupported models before anything changes
    info = backend.describe(model)
    if getattr(model, "moe_peft_config", None) is not None:
        raise ValueError("this model already carries a moe_peft_ds adapter; load a fresh base model")
    selection = check_selection(selection, info["num_experts"])
    backend.inject_sieve(model, selection, cfg)
    cfg.selection = {k: v for k, v in sorted(selection.items()) if v}
    cfg.model_type, cfg.num_experts, cfg.hidden_size = info["model_type"], info["num_experts"], info["hidden_size"]
    cfg.base_model = cfg.base_model or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    model.moe_peft_config = cfg
    return model
