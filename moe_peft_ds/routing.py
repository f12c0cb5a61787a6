"""Routing for mixtures of LoRA experts: top-k, top-p ("dynamic") and switch (top-1 with
capacity), the load-balancing and z losses, and the autograd hook that lets those losses
reach the optimizer through the forward path.

Every strategy returns the same shape, ``index [T, k]`` with ``E`` marking a slot that goes
to no expert (padding, a top-p cut, a capacity drop), which ``backends.hf.Routes`` skips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def route(logits: torch.Tensor, cfg: MixLoRAConfig, valid: torch.Tensor, sequence: int | None = None) -> Routing:
    """Route tokens with router ``logits [T, E]`` (fp32); ``valid [T]`` is False for padding,
    which goes to no expert and takes no capacity. ``sequence``: tokens per sequence (``T`` is
    batch-major), used by switch routing's per-sequence capacity."""
    num_experts = logits.shape[1]
    if cfg.router_temperature:
        logits = logits / cfg.router_temperature
    probs = torch.softmax(logits, dim=-1)
    dropped = torch.zeros((), dtype=torch.long, device=logits.device)
    if cfg.routing == "topk":
        weights, index = probs.topk(cfg.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
    elif cfg.routing == "dynamic":
        weights, index = top_p(probs, cfg.top_p, cfg.top_p_max_experts or num_experts, cfg.top_p_renormalize)
    else:
        top, index = probs.max(dim=-1, keepdim=True)
        # Value 1, gradient that of the router probability (as Switch's p * E(x)): a token's
        # output starts as the frozen FFN's, instead of being scaled by p ~ 1/E at init.
        weights = top / top.detach()
    index = index.masked_fill(~valid[:, None], num_experts)
    assigned = index
    if cfg.routing == "switch":
        groups = 1 if cfg.capacity_scope == "batch" or sequence is None else index.shape[0] // sequence
        index = capacity_limit(index, num_experts, cfg.capacity_factor, valid, groups)
        dropped = (index != assigned).sum()
    weights = weights.masked_fill(index == num_experts, 0.0)
    return Routing(weights, index, probs, logits, assigned, dropped)


def top_p(probs: torch.Tensor, p: float, max_experts: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MixLoRA's dynamic routing: the most probable experts, in order, up to and including the
    first one at which their cumulative probability exceeds ``p`` (all of them if it never
    does), at most ``max_experts``; weights their router probabilities, renormalised over the
    kept experts only with ``renormalize``. Other slots get index E."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p, order = sorted_p[:, :max_experts], order[:, :max_experts]
    before = F.pad(sorted_p.cumsum(-1)[:, :-1], (1, 0))  # the mass of the more probable experts
    keep = before <= p
    keep[:, 0] = True
    weights = sorted_p * keep
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, order.masked_fill(~keep, probs.shape[1])


def capacity_limit(
    index: torch.Tensor, num_experts: int, factor: float, valid: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """Top-1 ``index [T, 1]`` with the tokens beyond an expert's capacity sent to no expert.
    The ``T`` tokens form ``groups`` equal groups (1: the batch; B: its sequences); within a
    group, capacity is ``ceil(factor * real tokens / E)`` and tokens queue in order. Stays on
    the device (no host sync)."""
    one_hot = (index == torch.arange(num_experts, device=index.device)).long()  # [T, E]; F.one_hot syncs
    one_hot = one_hot.view(groups, -1, num_experts)
    tokens = valid.view(groups, -1).sum(1, keepdim=True)  # [G, 1]
    capacity = torch.ceil(factor * tokens.double() / num_experts)
    position = (one_hot.cumsum(1) * one_hot).sum(-1)  # [G, T/G]: 1-based place of the token in its expert's queue
    return index.masked_fill((position > capacity).view(-1, 1), num_experts)


def load_balancing_loss(routing: Routing, valid: torch.Tensor) -> torch.Tensor:
    """One layer's ``E * sum_e f_e P_e`` over the non-padding tokens (Mixtral's form): ``f_e``
    the share of tokens assigned to expert e (all slots, before capacity drops), ``P_e`` its
    mean router probability. ``k`` when both are uniform with top-k. For logging and tests: training
    uses ``RouterLosses``, which pools the layers."""
    stats = router_stats(routing, valid)
    return balance(stats.counts, stats.probs, stats.tokens)


def z_loss(routing: Routing, valid: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, ``mean(logsumexp(logits)^2)`` over the non-padding tokens."""
    stats = router_stats(routing, valid)
    return stats.z_sum / stats.tokens.clamp_min(1)


def balance(counts: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``E * sum_e (counts_e / N) (probs_e / N)``: the balancing loss from assignment counts and
    summed router probabilities over ``N = tokens`` tokens."""
    n = tokens.clamp_min(1)
    return counts.shape[-1] * (counts / n * probs / n).sum()


@dataclass
class RouterStats:
    """What a layer's router losses need from one forward: all sums over its real tokens."""

    counts: torch.Tensor  # [E] assignments per expert (float, no gradient)
    probs: torch.Tensor  # [E] summed router probabilities (with the router's gradient)
    z_sum: torch.Tensor  # () summed logsumexp(logits)^2 (with the router's gradient)
    tokens: torch.Tensor  # () real tokens (float)


def router_loss(stats: RouterStats, aux_coef: float, z_coef: float) -> torch.Tensor:
    """``aux_coef * balance + z_coef * mean z`` of ``stats`` (one layer's, or the layers' totals)."""
    return aux_coef * balance(stats.counts, stats.probs, stats.tokens) + z_coef * stats.z_sum / stats.tokens.clamp_min(
        1
    )


def router_stats(routing: Routing, valid: torch.Tensor, with_z: bool = True) -> RouterStats:
    """Mask products, not indexing: no host sync. Padding's slots are index E, not counted.
    Without ``with_z`` (a zero z coefficient) the z sum is a constant 0, not computed."""
    mask = valid.to(routing.probs.dtype)
    counts = expert_counts(routing.assigned, routing.probs.shape[1]).to(routing.probs.dtype)
    z_sum = (torch.logsumexp(routing.logits, dim=-1).pow(2) * mask).sum() if with_z else mask.new_zeros(())
    return RouterStats(counts, (routing.probs * mask[:, None]).sum(0), z_sum, mask.sum())


class RouterLosses:
    """The load-balancing and z losses of all MixLoRA layers of one adapter.

    ``pooled`` (the default): one loss over every layer's tokens together, as transformers'
    ``load_balancing_loss_func`` and the MixLoRA reference compute it from all layers' router
    logits, ``coef * E * sum_e f_e P_e`` with ``f`` and ``P`` over the L layers' tokens, and the
    z-loss as the mean over the same tokens. Otherwise (``per_layer_sum``) each layer's own loss,
    summed over the layers: about L times stronger.

    Each layer records its statistics here during the forward and attaches its summed
    probabilities and z (``attach_loss``); their gradient, read at backward time when every
    layer has recorded, is the loss's derivative: ``coef * E * f / N`` for the probabilities
    (``f`` from the counts, which carry no gradient) and ``coef_z / N`` for z. A model forward
    starts a new pass (``new_pass``, from the model's forward pre-hook): each layer's gradient
    uses the pass it was recorded in, so several forwards before one backward each keep their
    own statistics. Within a pass entries are keyed by layer; the recomputation of activation
    checkpointing records the same values again into the latest pass (as the padding mask, it
    assumes each forward's backward runs before the next forward).
    """

    def __init__(self, pooled: bool = True):
        self.pooled = pooled
        self.layers: dict[int, RouterStats] = {}  # the latest pass

    def new_pass(self) -> None:
        self.layers = {}  # a new dict: the gradients of earlier passes keep theirs

    def record(self, layer: int, stats: RouterStats) -> dict[int, RouterStats]:
        """Record layer ``layer``'s statistics (detached) in the current pass, which is returned."""
        self.layers[layer] = RouterStats(
            stats.counts.detach(), stats.probs.detach(), stats.z_sum.detach(), stats.tokens.detach()
        )
        return self.layers

    def _totals(self, layers: dict[int, RouterStats], layer: int) -> RouterStats:
        if not self.pooled:
            return layers[layer]
        every = list(layers.values())
        if len({s.counts.shape for s in every}) > 1:
            raise ValueError(
                "pooled router losses need the same number of experts in every layer; "
                "use router_aux_loss_pooling='per_layer_sum'"
            )
        return RouterStats(
            *(torch.stack([getattr(s, f) for s in every]).sum(0) for f in ("counts", "probs", "z_sum", "tokens"))
        )

    def gradient(self, layers: dict[int, RouterStats], layer: int, aux_coef: float, z_coef: float) -> torch.Tensor:
        """``[E + 1]``: the derivative of the (pooled) losses of the pass ``layers`` with respect
        to layer ``layer``'s summed probabilities and summed z."""
        t = self._totals(layers, layer)
        n = t.tokens.clamp_min(1)
        return torch.cat([aux_coef * t.counts.shape[-1] * t.counts / (n * n), (z_coef / n).reshape(1)])

    def value(self, aux_coef: float, z_coef: float) -> torch.Tensor:
        """The latest pass's loss, the one its gradients belong to (detached): pooled, or the sum of the layers'."""
        keys = list(self.layers)[:1] if self.pooled else list(self.layers)
        parts = [self._totals(self.layers, k) for k in keys]
        return sum(router_loss(t, aux_coef, z_coef) for t in parts)


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
        scale = ctx.scale() if callable(ctx.scale) else ctx.scale  # a float, a tensor, or computed now
        return grad, torch.ones_like(loss) * scale, None


def attach_loss(out: torch.Tensor, loss: torch.Tensor, scale=1.0) -> torch.Tensor:
    """``out``, carrying ``loss`` into the backward pass (see ``_AttachLoss``). ``scale`` (a
    float, a tensor broadcast against ``loss``, or a function returning one, called in backward)
    is the gradient ``loss`` receives."""
    return _AttachLoss.apply(out, loss, scale)
