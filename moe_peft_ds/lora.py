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
from transformers.integrations.moe import _grouped_mm as _transformers_grouped_mm

from .config import LoRAConfig


def adapter_dtype(cfg: LoRAConfig, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter over a base weight of ``base_dtype``: at least fp32 (a bf16/fp16 base
    gets fp32 LoRA, as PEFT's ``autocast_adapter_dtype`` and the MixLoRA reference do: small
    updates to A and B would round away in bf16), or the base's own with ``adapter_dtype="base"``."""
    if cfg.adapter_dtype == "base" or base_dtype.itemsize >= 4:
        return base_dtype
    return torch.float32


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x @ A.T @ B.T`` for x ``[T, in]`` -> ``[T, out]``, in the adapter's dtype."""
    return (x.to(A.dtype) @ A.t() @ B.t()) * scaling


def dora_scale(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA's per-output factor ``m / ||W + s B A||_row`` (``[out]``, or ``[n, out]`` for stacked experts,
    whose ``scaling`` may then be a tensor ``[n]``).

    The norm is detached, as in the DoRA paper's practical variant and PEFT, so the
    magnitude learns the length and LoRA the direction.
    """
    return magnitude / merged_row_norm(weight, A, B, scaling).detach()


def merged_row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling) -> torch.Tensor:
    """``||W + s B A||`` of every output row. A weight shared by all stacked experts (an
    ``expand``-ed view, stride 0: MixLoRA) is never copied n times: the square expands into
    ``||W||^2 + 2s<W, BA> + s^2 ||BA||^2``, whose terms need only ``W A^T`` and ``A A^T``."""
    s = scaling if not torch.is_tensor(scaling) else scaling.to(A.dtype)[:, None]  # [n, 1] against [n, out]
    if weight.dim() == 3 and weight.stride(0) == 0:
        w = weight[0].to(A.dtype)  # [out, in]
        cross = (torch.einsum("oi,nri->nor", w, A) * B).sum(-1)  # [n, out]: <W_o, (BA)_o>
        ba_sq = ((B @ (A @ A.transpose(1, 2))) * B).sum(-1)  # [n, out]: ||(BA)_o||^2
        return (w.pow(2).sum(-1) + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()
    s = s if not torch.is_tensor(s) else s[..., None]  # [n, 1, 1] against [n, out, in]
    return (weight.to(A.dtype) + s * (B @ A)).norm(dim=-1)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [S, in]`` (rows grouped by expert) times ``weight [E, in, out]`` -> ``[S, out]``.

    ``offsets [E]`` (int32) are the cumulative row counts; rows from ``offsets[-1]`` on belong to
    no group, and torch's kernel leaves their output (and their input gradient) uninitialised:
    callers that pass such rows mask them. Delegates to transformers' dispatcher, which uses
    torch's grouped GEMM kernel where the device supports it. That kernel needs operands laid out
    as ``_aligned`` says; others (a LoRA rank below 16 bytes: r < 8 in bf16, r < 4 in fp32) take
    transformers' per-expert loop, which reads ``offsets`` on the host (a device sync) and also
    computes the gradient of a frozen weight. On a GPU torch's kernel itself takes bf16 operands
    only (sm90/sm100): other dtypes loop over the groups after the same sync.
    """
    # The output [S, out] is an operand of the backward too: its rows must be 16-byte multiples.
    if _aligned(x) and _aligned(weight) and weight.shape[-1] * weight.element_size() % 16 == 0:
        return _transformers_grouped_mm(x, weight, offsets)
    return torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight, offs=offsets)


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped GEMM layout rule: a 16-byte aligned start, one of the last two strides 1
    (row- or column-major: ``w.transpose(1, 2)`` of a contiguous expert weight qualifies) and every
    other stride a multiple of 16 bytes."""
    *lead, rows, cols = (s * t.element_size() for s in t.stride())
    unit = t.element_size()
    inner_ok = (cols == unit and rows % 16 == 0) or (rows == unit and cols % 16 == 0)
    return t.data_ptr() % 16 == 0 and inner_ok and all(s % 16 == 0 for s in lead)


def apply_expert_update(base_out: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``base_out [S, out]`` with ``ExpertLoRA``'s update, ``+ delta`` (LoRA) or ``(base + delta) * scale``
    (DoRA). LoRA adds in place: grouped_mm keeps its inputs for backward, not its output."""
    delta = delta.to(base_out.dtype)
    if scale is None:
        return base_out.add_(delta)
    return (base_out + delta) * scale.to(base_out.dtype)


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, ranks: list[int] | None = None) -> None:
    """PEFT's default init: A Kaiming-uniform, B zero, so the adapter starts as the identity.

    Stacked experts of different ranks (``ranks[i] <= A.shape[1]``) are zero beyond their rank:
    those rows of A and columns of B get zero gradients and stay zero, so each expert is
    exactly a rank-``ranks[i]`` LoRA.
    """
    with torch.no_grad():
        A.zero_()
        for i in range(A.shape[0]) if A.dim() == 3 else [None]:
            rows = A if i is None else A[i, : (ranks[i] if ranks else A.shape[1])]
            nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        B.zero_()


def stacked_lora_update(
    x: torch.Tensor,
    expert_of_row: torch.Tensor,
    counts: torch.Tensor,
    stacked: tuple,
    slots: torch.Tensor | None,
    num_local: int,
    dropout=None,
    base: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ExpertLoRA.forward``'s update of rows ``x [S, in]`` sorted by expert, from the ``stacked``
    adapters ``(A [n, r, in], B [n, out, r], scaling [n], magnitude [n, out] or None)`` of the
    experts at local indices ``slots [n]`` (None: every one of the ``num_local``, in order); ``base``
    ``[n, out, in]``: their base weights (DoRA only). ``groups``: ``(lora_groups(slots), scalings)``
    for ascending ``slots``, ``scalings [num_local]`` each local expert's scaling, 0 without an
    adapter: the GEMMs then run over n groups, one per adapter (default: one group per local
    expert, zero adapters spread to the unadapted ones, which unsorted ``slots`` need)."""
    A, B, scaling, magnitude = stacked
    offsets = counts.cumsum(0)
    if groups is None:
        A_g, B_g, scalings = (_spread(t, slots, num_local) for t in (A, B, scaling))
    else:
        # Each adapter's group also holds the rows of the unadapted experts after it (before the first,
        # the first's): n products instead of one per expert (a CPU's grouped GEMM is a loop of one
        # matrix product per group). Their scaling is 0, so their update and every gradient they feed
        # (A's, B's, x's) is exactly zero.
        (ends, scalings), A_g, B_g = groups, A, B
        offsets = offsets[ends]
    offsets = offsets.to(torch.int32)
    x = dropout(x) if dropout is not None else x
    dtype = lora_gemm_dtype(x.dtype, A_g.dtype, x.device)
    hidden = grouped_mm(x.to(dtype), A_g.to(dtype).transpose(1, 2), offsets)  # [S, r]
    # Each row's scaling multiplies its [S, r] hidden activations, so A needs no scaled copy. B
    # enters as a row-major [n, r, out] copy (adapter-sized): with B's own column-major view
    # autograd computes B's gradient as [out, S] x [S, r] products, which a CPU runs several times
    # slower than the [r, S] x [S, out] it computes for a row-major operand (docs/design.md, "one
    # training step"; on a GPU, cuBLAS takes either layout).
    hidden = hidden * scalings[expert_of_row, None].to(dtype)
    delta = grouped_mm(hidden, _row_major(B_g.transpose(1, 2), dtype), offsets)  # [S, out]
    if magnitude is None:
        return delta, None
    scale = dora_scale(base, A, B, scaling, magnitude)  # [n, out]
    return delta, _spread(scale, slots, num_local, fill=1.0)[expert_of_row]


def lora_gemm_dtype(activations: torch.dtype, adapter: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the LoRA's grouped GEMMs run in: the adapter's, except over bf16 activations on a
    GPU, where they run on bf16 casts of A and B (as under autocast; the parameters and their
    gradients stay in the adapter's dtype). torch's GPU grouped GEMM has a kernel for bf16 only: any
    other dtype loops over the groups after copying the offsets to the host, a sync per GEMM. A CPU
    loops either way, without a sync, and there the fp32 products were faster in a training step
    (docs/design.md, "fp32 adapters over a bf16 base")."""
    return torch.bfloat16 if activations == torch.bfloat16 and device.type == "cuda" else adapter


def _row_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor, in one copy (``.to`` ignores the memory format when the
    dtype is already right)."""
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def lora_groups(slots: list[int], num_local: int) -> list[int]:
    """The groups ``stacked_lora_update`` runs its GEMMs over for adapters at the ascending local
    indices ``slots`` among ``num_local`` experts, as the last local expert of each: one group per
    adapter, holding its expert and the unadapted experts up to the next adapter's (those before
    the first adapter's join the first group).

    >>> lora_groups([2, 3, 7], 10)
    [2, 6, 9]
    """
    if not slots or any(b <= a for a, b in zip(slots, slots[1:])) or slots[-1] >= num_local:
        raise ValueError(f"slots must be ascending local indices below {num_local}: {slots}")
    return [s - 1 for s in slots[1:]] + [num_local - 1]


def _spread(t: torch.Tensor, slots: torch.Tensor | None, num_local: int, fill: float = 0.0) -> torch.Tensor:
    """``t [n, ...]`` (one row per adapted expert) laid out over the ``num_local`` experts of the base
    tensor at ``slots``, ``fill`` elsewhere (zero A, B and scaling give an expert no update). A small
    copy of the adapter, not of any activation; ``t`` itself when ``slots`` is None (every expert)."""
    if slots is None:
        return t
    return t.new_full((num_local, *t.shape[1:]), fill).index_copy(0, slots, t)


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA (optionally DoRA) update; the base layer stays frozen."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base = base
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        dtype = adapter_dtype(cfg, base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, cfg.r, dtype=dtype, device=base.weight.device))
        init_lora_pair(self.lora_A, self.lora_B)
        self.magnitude = None
        if cfg.use_dora:
            # ||W|| exactly as the forward computes it (B = 0), in the adapter's dtype: the scale starts at 1
            self.magnitude = nn.Parameter(
                merged_row_norm(base.weight.detach(), self.lora_A, self.lora_B, 1.0).detach()
            )
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
            merged = (
                dora_scale(w, self.lora_A, self.lora_B, self.scaling, self.magnitude).to(w.dtype)[:, None] * merged
            )
        return merged


class ExpertLoRA(nn.Module):
    """LoRA for the selected experts of one fused expert tensor (e.g. ``gate_up_proj``).

    Parameters are stacked over the selected experts only: ``lora_A [n, r, in]``,
    ``lora_B [n, out, r]`` and, with DoRA, ``magnitude [n, out]``, where ``n`` is the number
    of selected experts, so memory grows with ``n``, not with ``E``. ``expert_ids`` holds the
    global expert id of each slot, in ascending order. Experts may have their own rank and
    alpha (``cfg.rank_of`` / ``cfg.scaling_of``): ``r`` is then the largest rank, and the
    others are zero-padded (see ``init_lora_pair``).

    The base tensor may be one weight shared by all experts, ``W.expand(E, out, in)``
    (MixLoRA): it is never copied per expert, DoRA included.

    Under expert parallelism the base tensor holds only this rank's experts, global ids
    ``first_expert .. first_expert + E_local - 1``, or the ascending ids ``held`` (a load-aware
    placement, ``set_layout``); ``expert_ids`` stay global.
    """

    def __init__(
        self,
        expert_ids: list[int],
        weight_out_in: torch.Tensor,
        cfg: LoRAConfig,
        first_expert: int = 0,
        held: list[int] | None = None,
    ):
        """``weight_out_in``: the (local) base tensor as ``[E, out, in]`` (a view is fine)."""
        super().__init__()
        num_experts, out_f, in_f = weight_out_in.shape
        if not expert_ids:
            raise ValueError("ExpertLoRA needs at least one selected expert")
        # Ascending ids: the rows of the selected experts, sorted by expert, then line up with the slots.
        self.expert_ids = sorted(expert_ids)
        self.slot = {e: i for i, e in enumerate(self.expert_ids)}
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        kw = dict(dtype=adapter_dtype(cfg, weight_out_in.dtype), device=weight_out_in.device)
        ranks = [cfg.rank_of(e) for e in self.expert_ids]
        self.lora_A = nn.Parameter(torch.empty(len(expert_ids), max(ranks), in_f, **kw))
        self.lora_B = nn.Parameter(torch.empty(len(expert_ids), out_f, max(ranks), **kw))
        init_lora_pair(self.lora_A, self.lora_B, ranks)
        self.ranks = ranks
        self.magnitude = None
        self.register_buffer(
            "scaling", torch.tensor([cfg.scaling_of(e) for e in self.expert_ids], **kw), persistent=False
        )
        self.set_layout(list(range(first_expert, first_expert + num_experts)) if held is None else held)
        if cfg.use_dora:
            # [n, out]: ||W|| as the forward computes it (B = 0); a shared weight is not copied per expert
            self.magnitude = nn.Parameter(
                merged_row_norm(self._base(weight_out_in).detach(), self.lora_A, self.lora_B, 1.0).detach()
            )

    def set_layout(self, local_experts) -> None:
        """Derive the index helpers for a base tensor whose experts are the global ids
        ``local_experts`` (ascending), in that order: ``first_expert ..`` at construction, and
        again when a MixLoRA layer's pool grows, shrinks or is sharded (``expert_ids`` stay)."""
        local = {e: i for i, e in enumerate(local_experts)}
        if any(e not in local for e in self.expert_ids):
            held = f"[{local_experts[0]}, {local_experts[-1]}]" if local_experts else "none"
            raise ValueError(f"expert ids {self.expert_ids} are not all among the base tensor's experts {held}")
        device = self.lora_A.device
        slots = [local[e] for e in self.expert_ids]  # local indices, ascending with the ids
        self.num_local = len(local)
        self.all_experts = len(slots) == len(local)  # then the adapter's slots are the base tensor's experts, in order
        # Derived from expert_ids: not saved, but moved with the module.
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("ids", torch.tensor(slots, **long), persistent=False)
        self.register_buffer("group_ends", torch.tensor(lora_groups(slots, len(local)), **long), persistent=False)
        scalings = torch.zeros(len(local), dtype=self.scaling.dtype, device=device).index_copy_(
            0, self.ids, self.scaling
        )
        self.register_buffer("scalings", scalings, persistent=False)  # each local expert's, 0 without an adapter

    def forward(
        self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor, weight_out_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The update of every row: ``(delta [S, out], scale)``, zero (scale 1) on the rows of
        experts without an adapter.

        ``x [S, in]`` holds the routed rows sorted by expert, ``expert_of_row [S]`` the expert
        of each row and ``counts [E]`` the rows per expert. ``scale [S, out]`` is the DoRA factor
        (None without DoRA); ``apply_expert_update`` combines both with the base output. Only
        ``x`` enters here with a gradient, so ZeRO-3 keeps this module's parameters gathered
        until its whole backward has run.

        The two LoRA GEMMs run on ``x`` itself, with offsets from the base GEMM's, one group per
        adapter (``lora_groups``; the rows of experts without an adapter ride in a neighbour's group,
        their hidden activations scaled by 0): no host sync (how many rows the selected experts
        have is never read) and no copy of ``x`` kept for backward. Picking the selected experts'
        rows instead would need either their count on the host or a gathered copy of the rows.
        """
        return stacked_lora_update(
            x,
            expert_of_row,
            counts,
            (self.lora_A, self.lora_B, self.scaling, self.magnitude),
            None if self.all_experts else self.ids,
            self.num_local,
            self.dropout,
            self._base(weight_out_in) if self.dora else None,
            (self.group_ends, self.scalings),
        )

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def _base(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """The selected experts' base weights ``[n, out, in]``; a weight shared by all experts (stride 0)
        stays a view, never n copies."""
        if self.all_experts:
            return weight_out_in
        if weight_out_in.stride(0) == 0:
            return weight_out_in[0].expand(len(self.ids), *weight_out_in.shape[1:])
        return weight_out_in[self.ids]

    def expert_state(self, layer: int, tensor: str) -> dict[str, torch.Tensor]:
        """Each selected expert's tensors (views) under their checkpoint keys
        ``layers.{layer}.experts.{global id}.{tensor}.{lora_A|lora_B|magnitude}``."""
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}
        return {
            f"layers.{layer}.experts.{e}.{tensor}.{name}": p[slot].detach()
            for slot, e in enumerate(self.expert_ids)
            for name, p in params.items()
            if p is not None
        }

    @torch.no_grad()
    def merged_weight(self, expert: int, weight_out_in: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s (global id) ``[out, in]`` weight with its adapter folded in."""
        i = self.slot[expert]
        A, B, scaling = self.lora_A[i], self.lora_B[i], float(self.scaling[i])
        merged = weight_out_in + (scaling * (B @ A)).to(weight_out_in.dtype)
        if self.magnitude is not None:
            scale = dora_scale(weight_out_in, A, B, scaling, self.magnitude[i])
            merged = scale.to(merged.dtype)[:, None] * merged
        return merged

    def extra_repr(self) -> str:
        ranks = self.ranks[0] if len(set(self.ranks)) == 1 else self.ranks
        return f"experts={self.expert_ids}, r={ranks}, dora={self.magnitude is not None}"
