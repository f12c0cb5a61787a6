"""Expert parallelism: the dropless all-to-all dispatch, the process groups and the parameter tags
DeepSpeed reads, and gathering expert-local state. Backends and methods build on it (the
transformers experts in ``backends.hf``, MixLoRA mixtures in ``mixlora``).

With ``ep_size`` N, every rank of an expert-parallel group keeps E/N experts of each MoE
layer (base weights and adapters); the router and everything else stay replicated. Each
rank routes its own tokens, sends every (token, expert) assignment to the rank that owns
the expert through one all-to-all with uneven split sizes (no capacity, no padding, no
dropped tokens), the owner runs its experts, and a second all-to-all brings the outputs
back for the weighted combine. Both all-to-alls are differentiable. A load-aware placement may
give hot experts copies on several ranks (``placement.replicated``); rows then go to one copy each.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from .routes import Routes, add_unrouted, unrouted_tokens
from .routing import expert_counts


class _AllToAllV(torch.autograd.Function):
    """All-to-all of rows with per-rank split sizes; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def all_to_all_v(x: torch.Tensor, send: list[int], recv: list[int], group=None) -> torch.Tensor:
    """Send ``x``'s rows ``[sum(send), ...]`` split by ``send`` to the ranks of ``group``;
    returns the ``[sum(recv), ...]`` rows received, ordered by source rank."""
    return _AllToAllV.apply(x, send, recv, group)


class ExpertParallelDispatch(MoE):
    """The dropless dispatch of one MoE layer's routed tokens to the ranks of an expert-parallel
    group that own their experts, and back.

    It subclasses DeepSpeed's ``MoE`` only so that ``deepspeed.initialize`` sees an MoE model
    and reduces expert-local gradients over the expert-data-parallel group; DeepSpeed's own
    gate and capacity-padded dispatch are not used (``MoE.__init__`` is not called).

    Rank ``r`` holds the experts ``order[r * S : (r+1) * S]`` (ascending; default: the contiguous
    block ``r * E/N ..``, S = E/N), its local expert ``i`` being the ``i``-th of them. A MixLoRA
    pool grown task by task (``continual``) spreads every task's experts over the ranks. An expert
    may be held by several ranks (``placement.replicated``: S = E/N + R slots per rank); its rows
    are then split over its copies by token index (token t goes to copy ``t mod copies``).
    """

    def __init__(self, group, num_experts: int, order: list[int] | None = None, device=None):
        nn.Module.__init__(self)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_experts = num_experts  # global
        order = list(range(num_experts)) if order is None else list(order)
        if len(order) % self.ep_size or sorted(set(order)) != list(range(num_experts)):
            raise ValueError(f"order {order} does not hold each of the {num_experts} experts, in equal shares")
        self.num_slots = len(order)  # every rank's slots, rank-major
        self.num_local_experts = self.num_slots // self.ep_size
        self.expert_group_name = ep_group_name(self.ep_size)
        self.enable_expert_tensor_parallelism = False
        self.sent_rows = 0  # rows this rank sent by all-to-all since the last reset (for benchmarks)
        self.register_buffer("slot_of", _slot_table(order, num_experts, device), persistent=False)
        self.register_buffer("copies", None, persistent=False)
        if self.slot_of is not None and self.slot_of.shape[1] > 1:
            self.copies = (self.slot_of[:, :1] != self.slot_of).sum(1) + 1  # [E + 1]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``: the groups exist already (``deepspeed_expert_group``)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_rows,
        fallback=None,
    ) -> torch.Tensor:
        """``[T, H]``: every token's weighted sum of its experts' outputs, where
        ``expert_rows(x, local_expert_of_row, counts)`` computes this rank's experts on the rows
        it receives (sorted by local expert). Tokens routed to no expert get ``fallback(rows)``
        (MixLoRA: the frozen FFN) when it is given. One host sync: the split sizes."""
        n_local, ep = self.num_local_experts, self.ep_size
        top_k_index = self.slots(top_k_index)
        counts = expert_counts(top_k_index, self.num_slots)
        send_counts = counts.view(ep, n_local)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        unrouted = unrouted_tokens(top_k_index, self.num_slots) if fallback is not None else None
        sizes = [send_counts.sum(1), recv_counts.sum(1)] + ([unrouted.sum().view(1)] if fallback is not None else [])
        host = torch.cat(sizes).tolist()  # the one host sync
        send, recv = host[:ep], host[ep : 2 * ep]
        routes = Routes.of(top_k_index, self.num_slots, rows=sum(send), counts=counts)
        x = all_to_all_v(routes.gather(hidden_states), send, recv, self.group)  # grouped by source, then expert
        # Regroup the received rows by local expert (stable: sources stay in rank order).
        local_expert = torch.arange(n_local, device=x.device).repeat(ep)
        source_major = torch.repeat_interleave(local_expert, recv_counts.reshape(-1), output_size=sum(recv))
        local_of_row, perm = torch.sort(source_major, stable=True)
        y = expert_rows(x.index_select(0, perm), local_of_row, recv_counts.sum(0))
        y = all_to_all_v(torch.empty_like(y).index_copy_(0, perm, y), recv, send, self.group)  # back in the order sent
        self.sent_rows += sum(send) + sum(recv)
        out = routes.combine(hidden_states, y, top_k_weights)
        return out if fallback is None else add_unrouted(out, hidden_states, unrouted, host[-1], fallback)

    def slots(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` global expert ids (E: masked) -> rank-major slots (``num_slots``: masked)."""
        if self.slot_of is None:  # experts by id: slot = id
            return top_k_index
        if self.copies is None:
            return self.slot_of[top_k_index, 0]
        token = torch.arange(top_k_index.shape[0], device=top_k_index.device)[:, None]
        return self.slot_of[top_k_index, token % self.copies[top_k_index]]


def _slot_table(order: list[int], num_experts: int, device) -> torch.Tensor | None:
    """``[E + 1, C]``: row e lists expert e's rank-major slots (C: the most copies; an expert with
    fewer repeats its first slot, unused), row E the masked slot ``len(order)``. None for experts by id."""
    if order == list(range(num_experts)):
        return None
    slots = [[s for s, e in enumerate(order) if e == expert] for expert in range(num_experts)] + [[len(order)]]
    width = max(len(s) for s in slots)
    return torch.tensor([s + s[:1] * (width - len(s)) for s in slots], dtype=torch.long, device=device)


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of this size (its MoE layers use it too)."""
    return f"ep_size_{ep_size}"


@torch.no_grad()
def copy_expert_slots(src: nn.Module, dst: nn.Module) -> None:
    """Copy the slots of ``dst``'s experts (an ``ExpertLoRA`` over a subset) out of ``src``'s."""
    slots = [src.slot[e] for e in dst.expert_ids]
    for name, p in dst.named_parameters():
        p.copy_(getattr(src, name)[slots])


def tag_expert_local(params, ep_size: int) -> None:
    """DeepSpeed's tags for expert-local parameters: neither averaged over all ranks nor
    broadcast from rank 0 at initialize, but reduced over the expert-data-parallel group."""
    for p in params:
        p.allreduce = False
        p.group_name = ep_group_name(ep_size)


def deepspeed_expert_group(ep_size: int):
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups for
    ``ep_size`` and return the expert-parallel group of this rank, so that our dispatch and
    DeepSpeed's gradient reduction use the same layout."""
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide the number of ranks ({world})")
    name = ep_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def expert_parallel_group(model: nn.Module):
    """The expert-parallel group of ``model``'s sharded experts, or None."""
    return next((m.group for m in model.modules() if isinstance(m, ExpertParallelDispatch)), None)


def clip_grad_norm_expert_parallel(params: list[nn.Parameter], max_norm: float, group) -> torch.Tensor:
    """Clip by one global norm in which every gradient counts exactly once: replicated
    gradients (identical on every rank after the data-parallel reduction) locally, expert-local
    ones summed over the expert-parallel group. Returns the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    local = [p.grad for p in params if p.grad is not None and not getattr(p, "allreduce", True)]
    shared = [p.grad for p in params if p.grad is not None and getattr(p, "allreduce", True)]
    zero = torch.zeros((), device=params[0].device)  # on the device even where no gradient exists (NCCL)
    local_sq = torch.nn.utils.get_total_norm(local).double() ** 2 if local else zero.double()
    dist.all_reduce(local_sq, group=group)
    shared_sq = torch.nn.utils.get_total_norm(shared).double() ** 2 if shared else zero.double()
    total = (local_sq + shared_sq).sqrt().float()
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)  # takes parameters, scales their .grad
    return total


def zero3_gathered(model: nn.Module, modifier_rank: int | None = None):
    """Inside this context the adapter parameters of a ZeRO-3 model are whole on every rank
    (all ranks must enter it); with ``modifier_rank``, what that rank writes into them is
    kept everywhere. A no-op without ZeRO-3."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters([p for p in model.parameters() if p.requires_grad], modifier_rank=modifier_rank)


def gather_expert_state(model: nn.Module, local_state) -> dict[str, torch.Tensor]:
    """``local_state(model)`` (this rank's adapter tensors by global key) whole on CPU: ZeRO-3
    partitions gathered, and under expert parallelism every rank's experts merged (every rank of
    the group must call this)."""
    with zero3_gathered(model):  # copies: ZeRO-3 frees the gathered tensors at exit
        state = {k: v.to("cpu", copy=True) for k, v in local_state(model).items()}
    group = expert_parallel_group(model)
    if group is None:
        return state
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, state, group=group)
    return {k: v for part in parts for k, v in part.items()}
