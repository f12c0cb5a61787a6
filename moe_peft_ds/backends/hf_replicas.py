"""The adapters of experts that several expert-parallel ranks hold (``placement.replicated``).

A hot expert held by several ranks splits its routed rows over its copies, but its adapter lives
once, on its owner (``placement.owners``): DeepSpeed, ZeRO and checkpoints see one set of
parameters per expert, as without copies. Every forward, each owner sends the A/B (and DoRA
magnitude) of every adapted tensor of its selected experts that other ranks hold to those ranks, in
one differentiable all-to-all per layer (the dispatch's); its backward returns every copy's gradient to the owner,
where autograd sums it into the parameters. So the gradients equal one process's. Split sizes come
from the placement and the selection, on the host already: no host sync.

Every rank of the group calls the exchange at the layer's first adapted tensor, also a rank that
sends and receives nothing; its output always joins the rows' update, so its backward (a
collective as well) runs on every rank too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from ..dispatch import all_to_all_v
from ..lora import ExpertLoRA, adapter_dtype, apply_expert_update, stacked_lora_update
from ..placement import copies, owned_by, owners


class ReplicaAdapters(nn.Module):
    """One layer's exchange plan on this rank: which of its owned adapters go where, which copies'
    adapters arrive from where. Rebuilt when the selection changes."""

    def __init__(
        self,
        placement: list[list[int]],
        rank: int,
        selected: list[int],
        cfg: AdapterConfig | None,
        shapes: dict,
        base_dtype: torch.dtype,
        group,
    ):
        """``shapes``: ``{tensor: (out, in)}`` of the adapted expert tensors, in the order the experts
        compute them (``ExpertsLayout.tensors``); ``cfg``: the adapter config (None: no adapters)."""
        super().__init__()
        self.tensors, self.shapes, self.base_dtype = list(shapes), dict(shapes), base_dtype
        owner, count, held = owners(placement), copies(placement), placement[rank]
        chosen = set(selected)
        owned = [e for e in owned_by(placement, rank) if e in chosen]  # this rank's adapter slots, ascending
        # Slots of the owned adapters each rank holds a copy of; ids of the copies arriving from each owner.
        self.send = [[i for i, e in enumerate(owned) if e in other and r != rank] for r, other in enumerate(placement)]
        self.recv = [[e for e in held if e in chosen and owner[e] == r != rank] for r in range(len(placement))]
        self.active = any(count[e] > 1 for e in chosen)  # the same on every rank
        self.group, self.cfg = group, cfg
        arrived = [held.index(e) for ids in self.recv for e in ids]
        self.register_buffer("arrived", torch.tensor(arrived, dtype=torch.long), persistent=False)
        self.register_buffer(
            "sent", torch.tensor([i for s in self.send for i in s], dtype=torch.long), persistent=False
        )
        self.dropout = nn.Dropout(cfg.dropout) if cfg is not None and cfg.dropout else None
        self._fetched: dict[str, torch.Tensor] = {}  # this forward's fetched adapters, until each tensor takes its own

    def update(self, adapters: nn.ModuleDict, tensor: str, y, x, expert_of_row, counts, w) -> torch.Tensor:
        """``y`` (the base output of ``tensor``, ``w [E local, out, in]``, on rows sorted by local expert)
        plus the LoRA update of every selected expert this rank holds: its own ``adapters`` and the
        copies' fetched ones. The first adapted tensor of a forward fetches every tensor's."""
        if tensor not in self.tensors:
            return y
        if tensor == self.tensors[0]:
            self._fetched = self._fetch(adapters)
        fetched = self._fetched.pop(tensor)
        own = adapters[tensor] if tensor in adapters else None
        if own is None and not len(self.arrived):
            return y + fetched.sum().to(y.dtype) * 0  # joins the graph: the exchange's backward runs here too
        r, out_f, in_f = self.cfg.r, w.shape[1], w.shape[2]
        A = fetched[:, : r * in_f].view(-1, r, in_f)
        B = fetched[:, r * in_f : r * (in_f + out_f)].view(-1, out_f, r)
        magnitude = fetched[:, r * (in_f + out_f) :] if self.cfg.use_dora else None
        scaling = torch.full((len(self.arrived),), self.cfg.scaling, dtype=A.dtype, device=A.device)
        slots = self.arrived
        if own is not None:
            A, B = torch.cat([own.lora_A, A]), torch.cat([own.lora_B, B])
            scaling, slots = torch.cat([own.scaling, scaling]), torch.cat([own.ids, slots])
            magnitude = torch.cat([own.magnitude, magnitude]) if own.dora else None
        dropout = self.dropout if own is None else own.dropout
        base = w[slots] if magnitude is not None else None
        delta, scale = stacked_lora_update(
            x, expert_of_row, counts, (A, B, scaling, magnitude), slots, w.shape[0], dropout, base
        )
        return apply_expert_update(y, delta, scale)

    def _fetch(self, adapters: nn.ModuleDict) -> dict[str, torch.Tensor]:
        """``{tensor: [copies arriving, r*in + out*r (+ out)]}``: the flattened adapters of the copies
        this rank holds, from their owners (rows in ``arrived`` order), every tensor in one all-to-all."""
        widths = {t: self._width(t) for t in self.tensors}
        if adapters:
            parts = [p for t in self.tensors for p in _stacked(adapters[t])]
            rows = torch.cat([p.index_select(0, self.sent).flatten(1) for p in parts], 1)
        else:  # nothing to send; a leaf that wants a gradient, so the exchange has a backward here too
            kw = dict(dtype=adapter_dtype(self.cfg, self.base_dtype), device=self.arrived.device)
            rows = torch.zeros(0, sum(widths.values()), **kw, requires_grad=torch.is_grad_enabled())
        got = all_to_all_v(rows, [len(s) for s in self.send], [len(r) for r in self.recv], self.group)
        return dict(zip(self.tensors, got.split(list(widths.values()), 1)))

    def _width(self, tensor: str) -> int:
        out_f, in_f = self.shapes[tensor]
        return self.cfg.r * (out_f + in_f) + (out_f if self.cfg.use_dora else 0)


def _stacked(adapter: ExpertLoRA) -> list[torch.Tensor]:
    return [adapter.lora_A, adapter.lora_B] + ([adapter.magnitude] if adapter.dora else [])
