"""Backends: each knows one kind of MoE model's layout, and nothing of the methods built on it.

A backend is a module with the same functions (the protocol below), tried in order by
``backend_for`` the way PEFT tries its ``dispatch_*`` functions:

- ``NAME``; ``matches(model)``: whether it holds this model's MoE layers;
- ``describe(model)``: ``{"model_type", "num_experts", "hidden_size", "moe_layers"}`` (and
  ``"stage_layers_only"`` where a rank may hold only some layers);
- ``inject_sieve(model, selection, cfg)``: check, freeze, and wrap the selected experts with adapters;
- ``adapter_state(model)``: this rank's adapter tensors (views) under their global checkpoint keys;
  ``gathered_state(model)``: the whole adapter on CPU (collective under expert parallelism);
- ``held_experts(model)``: the ``(layer, expert)`` adapters this rank holds, or None for all.

Profiling hooks are the profiler's (``profiling``), chosen by ``NAME``.
"""

from __future__ import annotations

from torch import nn

from ..modules import UnsupportedModelError
from . import deepspeed_moe, hf, megatron

BACKENDS = (deepspeed_moe, megatron, hf)  # DeepSpeed's MoE layer and Megatron's experts first: hf is the broadest


def backend_for(model: nn.Module):
    """The backend whose layout ``model`` has, or one clear error."""
    for backend in BACKENDS:
        if backend.matches(model):
            return backend
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported MoE model: it holds no fused experts module (transformers "
        "marks those with use_experts_implementation), no deepspeed.moe.layer.MoE and no Megatron-core expert layer"
    )
