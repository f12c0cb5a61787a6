"""Token routes: the top-k assignments of a batch grouped by expert, gathered into rows and combined
back per token. Shared by every experts module (the sieve's fused experts, MixLoRA's mixtures) and
by the expert-parallel dispatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import expert_counts


@dataclass
class Routes:
    """The top-k assignments of a batch, grouped by expert once (a stable sort)."""

    order: torch.Tensor  # [S] flat (token, slot) index of each assignment, sorted by expert
    expert: torch.Tensor  # [S] expert of each sorted assignment
    token: torch.Tensor  # [S] token of each sorted assignment
    counts: torch.Tensor  # [E] assignments per expert

    @classmethod
    def of(
        cls, top_k_index: torch.Tensor, num_experts: int, rows: int, counts: torch.Tensor | None = None
    ) -> "Routes":
        """``rows`` is how many slots go to an expert (``top_k_index.numel()`` when none is masked):
        the caller knows it on the host, so building the routes never syncs with the device.
        Index E (one past the last expert) marks a masked slot: it sorts last and is dropped.
        ``counts``: ``expert_counts`` of ``top_k_index``, if the caller has them already."""
        expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
        order, expert = order[:rows], expert[:rows]
        counts = expert_counts(top_k_index, num_experts) if counts is None else counts
        return cls(order, expert, order // top_k_index.shape[1], counts)

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """The row of each assignment, in sorted order: ``per_token [T, D]`` -> ``[S, D]``.
        ``index_select``, not ``per_token[token]``: its backward is an ``index_add``, which on
        CPU is several times faster than indexing's accumulating put."""
        return per_token.index_select(0, self.token)

    def combine(self, hidden_states: torch.Tensor, y: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Weight the expert outputs ``y [S, H]`` (in sorted order) and sum them per token."""
        return self.mix(y, top_k_weights, hidden_states.shape[0]).to(hidden_states.dtype)

    def mix(self, y: torch.Tensor, top_k_weights: torch.Tensor, tokens: int) -> torch.Tensor:
        """``[tokens, D]``: the rows ``y [S, D]`` (in sorted order) weighted and summed per token.
        With every slot routed, the rows go back to slot order and each token sums its k rows
        (deterministic, as transformers does); masked slots make S smaller and take an index_add."""
        k = top_k_weights.shape[-1]
        if y.shape[0] == tokens * k:
            slotted = torch.empty_like(y).index_copy_(0, self.order, y).view(tokens, k, -1)  # [T, k, D]
            return (slotted * top_k_weights.reshape(tokens, k, 1)).sum(1)
        y = y * top_k_weights.reshape(-1)[self.order, None]
        return y.new_zeros((tokens, y.shape[1])).index_add_(0, self.token, y)


def unrouted_tokens(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T]``: True for tokens whose every slot is masked (index E): MixLoRA's padding and capacity drops."""
    return (top_k_index == num_experts).all(-1)


def add_unrouted(
    out: torch.Tensor, hidden: torch.Tensor, unrouted: torch.Tensor, count: int, fallback
) -> torch.Tensor:
    """``out [T, H]`` plus ``fallback(rows)`` on the ``count`` tokens ``unrouted [T]`` marks; ``count``
    comes from the host already, so picking them does not sync."""
    if not count:
        return out
    tokens = torch.argsort(~unrouted, stable=True)[:count]
    return out.index_add(0, tokens, fallback(hidden.index_select(0, tokens)).to(out.dtype))
