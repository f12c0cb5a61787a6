"""The LoRA math: a dense linear adapter, and an expert-indexed adapter that holds A/B only
for selected experts of a fused expert tensor.

Orientation is always ``[out, in]`` here (as ``nn.Linear.weight``): ``A`` is ``[r, in]``,
``B`` is ``[out, r]`` and the update is ``delta_W = scaling * B @ A``. Callers whose base
weights are stored transposed (GPT-OSS) pass a transposed view.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x @ A.T @ B.T`` for x ``[T, in]`` -> ``[T, out]``, in the adapter's dtype."""
    return (x.to(A.dtype) @ A.t() @ B.t()) * scaling


def dora_scale(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output factor ``m / ||W + s B A||_row`` (``[out]``).

    The norm is detached, as in the DoRA paper's practical variant and PEFT, so the
    magnitude learns the length and LoRA the direction.
    """
    merged = weight.to(A.dtype) + scaling * (B @ A)  # [out, in]
    return magnitude / merged.norm(dim=1).detach()


def init_lora_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    """PEFT's default init: A Kaiming-uniform, B zero, so the adapter starts as the identity."""
    with torch.no_grad():
        for i in range(A.shape[0]) if A.dim() == 3 else [None]:
            nn.init.kaiming_uniform_(A if i is None else A[i], a=math.sqrt(5))
        B.zero_()


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA (optionally DoRA) update; the base layer stays frozen."""

    def __init__(self, base: nn.Linear, cfg: AdapterConfig):
        super().__init__()
        self.base = base
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, cfg.r, dtype=dtype, device=base.weight.device))
        init_lora_pair(self.lora_A, self.lora_B)
        self.magnitude = None
        if cfg.use_dora:
            self.magnitude = nn.Parameter(base.weight.detach().norm(dim=1).to(dtype))
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scaling).to(x.dtype)
        if self.magnitude is None:
            return self.base(x) + delta
        bias = self.base.bias
        plain = F.linear(x, self.base.weight)
        scale = dora_scale(self.base.weight, self.lora_A, self.lora_B, self.scaling, self.magnitude).to(x.dtype)
        out = scale * (plain + delta)
        return out if bias is None else out + bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with this adapter folded in (``[out, in]``)."""
        w = self.base.weight
        merged = w + (self.scaling * (self.lora_B @ self.lora_A)).to(w.dtype)
        if self.magnitude is not None:
            merged = dora_scale(w, self.lora_A, self.lora_B, self.scaling, self.magnitude).to(w.dtype)[:, None] * merged
        return merged


class ExpertLoRA(nn.Module):
    """LoRA for the selected experts of one fused expert tensor (e.g. ``gate_up_proj``).

    Parameters are stacked over the selected experts only: ``lora_A [n, r, in]``,
    ``lora_B [n, out, r]`` and, with DoRA, ``magnitude [n, out]``, where ``n`` is the number
    of selected experts, so memory grows with ``n``, not with ``E``. ``expert_ids`` holds the
    global expert id of each slot.
    """

    def __init__(self, expert_ids: list[int], weight_out_in: torch.Tensor, cfg: AdapterConfig):
        """``weight_out_in``: the base tensor as ``[E, out, in]`` (a view is fine)."""
        super().__init__()
        if not expert_ids:
            raise ValueError("ExpertLoRA needs at least one selected expert")
        n, (out_f, in_f) = len(expert_ids), weight_out_in.shape[1:]
        self.expert_ids = list(expert_ids)
        self.slot = {e: i for i, e in enumerate(self.expert_ids)}
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        kw = dict(dtype=weight_out_in.dtype, device=weight_out_in.device)
        self.lora_A = nn.Parameter(torch.empty(n, cfg.r, in_f, **kw))
        self.lora_B = nn.Parameter(torch.empty(n, out_f, cfg.r, **kw))
        init_lora_pair(self.lora_A, self.lora_B)
        self.magnitude = None
        if cfg.use_dora:
            norms = weight_out_in[self.expert_ids].detach().norm(dim=2)  # [n, out]
            self.magnitude = nn.Parameter(norms.clone())

    def project(self, expert: int, x: torch.Tensor, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W_e.T (+ LoRA) (+ bias)`` for the rows ``x [t, in]`` routed to ``expert``."""
        base = x @ weight_out_in.t()
        i = self.slot.get(expert)
        if i is not None:
            delta = lora_delta(self.dropout(x), self.lora_A[i], self.lora_B[i], self.scaling).to(x.dtype)
            base = base + delta
            if self.magnitude is not None:
                scale = dora_scale(weight_out_in, self.lora_A[i], self.lora_B[i], self.scaling, self.magnitude[i])
                base = base * scale.to(x.dtype)
        return base if bias is None else base + bias

    @torch.no_grad()
    def merged_weight(self, expert: int, weight_out_in: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s ``[out, in]`` weight with its adapter folded in."""
        i = self.slot[expert]
        A, B = self.lora_A[i], self.lora_B[i]
        merged = weight_out_in + (self.scaling * (B @ A)).to(weight_out_in.dtype)
        if self.magnitude is not None:
            scale = dora_scale(weight_out_in, A, B, self.scaling, self.magnitude[i])
            merged = scale.to(merged.dtype)[:, None] * merged
        return merged

    def extra_repr(self) -> str:
        return f"experts={self.expert_ids}, r={self.lora_A.shape[1]}, dora={self.magnitude is not None}"
