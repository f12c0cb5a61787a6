"""Routing for mixtures of LoRA experts: top-k, top-p ("dynamic") and switch (top-1 with
capacity), the load-balancing and z losses, and the autograd hook that lets those losses
reach the optimizer through the forward path.

Every strategy returns the same shape, ``index [T, k]`` with ``E`` marking a slot that goes
to no expert (padding, a top-p cut, a capacity drop), which ``backends.hf.Routes`` skips.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MixLoRAConfig


@dataclass
class Routing:
    """The routing of ``T`` tokens over ``E`` experts."""

    weights: torch.Tensor  # [T, k] combine weights (fp32), 0 on empty slots
    index: torch.Tensor  # [T, k] expert per slot, E for none
    probs: torch.Tensor  # [T, E] router softmax
    logits: torch.Tensor  # [T, E] router logits
    assigned: torch.Tensor  # [T, k] expert per slot before capacity drops (what the balancing loss counts)
    dropped: torch.Tensor  # () tokens dropped by the capacity limit (switch)


def expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` assignments per expert of ``top_k_index [T, k]``; index E (a masked slot) is not
    counted. A scatter-add, not ``bincount``, which reads the largest index on the host on GPUs."""
    flat = top_k_index.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def route(logits: torch.Tensor, cfg: MixLoRAConfig, valid: torch.Tensor) -> Routing:
    """Route tokens with router ``logits [T, E]`` (fp32); ``valid [T]`` is False for padding,
    which goes to no expert and takes no capacity."""
    num_experts = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    dropped = torch.zeros((), dtype=torch.long, device=logits.device)
    if cfg.routing == "topk":
        weights, index = probs.topk(cfg.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
    elif cfg.routing == "dynamic":
        weights, index = _top_p(probs, cfg.top_p, cfg.top_k)
    else:
        top, index = probs.max(dim=-1, keepdim=True)
        # Value 1, gradient that of the router probability (as Switch's p * E(x)): a token's
        # output starts as the frozen FFN's, instead of being scaled by p ~ 1/E at init.
        weights = top / top.detach()
    index = index.masked_fill(~valid[:, None], num_experts)
    assigned = index
    if cfg.routing == "switch":
        index = _capacity_limit(index, num_experts, cfg.capacity_factor, valid.sum())
        dropped = (index != assigned).sum()
    weights = weights.masked_fill(index == num_experts, 0.0)
    return Routing(weights, index, probs, logits, assigned, dropped)


def _top_p(probs: torch.Tensor, top_p: float, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable experts until their probability reaches ``top_p`` (at least one, at
    most ``max_k``), weights renormalised over them; other slots get index E."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p, order = sorted_p[:, :max_k], order[:, :max_k]
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the mass before this expert has not reached top_p
    keep[:, 0] = True
    weights = sorted_p * keep
    return weights / weights.sum(-1, keepdim=True), order.masked_fill(~keep, probs.shape[1])


def _capacity_limit(index: torch.Tensor, num_experts: int, factor: float, tokens: torch.Tensor) -> torch.Tensor:
    """Top-1 ``index [T, 1]`` with the tokens beyond each expert's capacity
    ``ceil(factor * tokens / E)`` (in token order) sent to no expert. ``tokens`` stays on the device."""
    capacity = torch.ceil(factor * tokens.double() / num_experts)
    # [T, E]; a comparison, not F.one_hot, which checks the index range on the host
    one_hot = (index == torch.arange(num_experts, device=index.device)).long()
    position = (one_hot.cumsum(0) * one_hot).sum(-1)  # 1-based place of the token in its expert's queue
    return index.masked_fill((position > capacity)[:, None], num_experts)


def load_balancing_loss(routing: Routing, valid: torch.Tensor) -> torch.Tensor:
    """Mixtral's form ``E * sum_e f_e P_e`` over the non-padding tokens: ``f_e`` the share of
    tokens assigned to expert e (all slots, before capacity drops), ``P_e`` its mean router
    probability. 1.0 when both are uniform with top-1."""
    num_experts = routing.probs.shape[1]
    n = valid.sum().clamp_min(1)
    counts = expert_counts(routing.assigned, num_experts)  # padding's slots are index E: not counted
    probs = (routing.probs * valid[:, None]).sum(0)  # a mask product, not indexing: no host sync
    return num_experts * (counts.to(routing.probs.dtype) / n * probs / n).sum()


def z_loss(routing: Routing, valid: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, ``mean(logsumexp(logits)^2)`` over the non-padding tokens."""
    return (torch.logsumexp(routing.logits, dim=-1).pow(2) * valid).sum() / valid.sum().clamp_min(1)


class _AttachLoss(torch.autograd.Function):
    """Return ``out`` unchanged; in backward, give ``loss`` the gradient ``scale`` as if it had
    been added to the training loss. The loss thus reaches the optimizer through the forward
    path: recomputed with the layer under activation checkpointing (re-entrant or not),
    never kept on a module where re-entrant checkpointing would turn it into a constant."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss) * ctx.scale, None  # scale: a float, or a tensor on the device


def attach_loss(out: torch.Tensor, loss: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``out``, carrying ``loss`` into the backward pass (see ``_AttachLoss``)."""
    return _AttachLoss.apply(out, loss, scale)
