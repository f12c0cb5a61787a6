"""Routing profiler: how many tokens each expert of each MoE layer receives on a calibration set.

Hooks read the top-k choice of every MoE layer (for transformers models, the ``top_k_index`` /
``top_k_weights`` its experts module is called with) and count, per layer and per expert, the top-k assignments and the summed gate
weight of non-padding tokens. With ``torch.distributed`` initialised the counts are summed
over ranks, so every data-parallel rank selects the same experts.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .backends import backend_for
from .backends.deepspeed_moe import ds_moe_layers, gate_choice
from .backends.hf import find_moe_blocks, num_local_experts
from .backends.megatron import routers
from .device import model_device


@dataclass
class RoutingProfile:
    """Per-layer, per-expert routing statistics of one model on one calibration set."""

    counts: dict[int, list[int]]  # layer -> [E] routed top-k assignments
    gate_sums: dict[int, list[float]]  # layer -> [E] summed gate weights
    tokens: int  # non-padding tokens seen (each makes top_k assignments per layer)
    samples: int  # calibration samples seen
    num_experts: int
    top_k: int
    model_id: str = ""
    data_id: str = ""

    def __post_init__(self):
        self.counts = {int(k): [int(c) for c in v] for k, v in self.counts.items()}
        self.gate_sums = {int(k): [float(g) for g in v] for k, v in self.gate_sums.items()}
        bad = [layer for layer, c in self.counts.items() if len(c) != self.num_experts]
        if bad:
            raise ValueError(f"routing profile layers {bad} do not have num_experts={self.num_experts} counts")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RoutingProfile":
        try:
            raw = json.loads(Path(path).read_text())
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a routing profile written by profile_routing: {err}") from err

    def shares(self, layer: int) -> torch.Tensor:
        """``[E]`` share of this layer's routed assignments that each expert received."""
        c = torch.tensor(self.counts[layer], dtype=torch.float64)
        return c / c.sum().clamp_min(1)

    def skew(self, fraction: float = 0.25) -> dict[int, dict[str, float]]:
        """Per layer: share covered by the top ``fraction`` of experts, and normalised entropy.

        Uniform routing gives ``coverage == fraction`` and ``entropy == 1``.
        """
        n_top = max(1, math.ceil(fraction * self.num_experts - 1e-9))
        stats = {}
        for layer in sorted(self.counts):
            p = self.shares(layer)
            entropy = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(self.num_experts)
            stats[layer] = {"top_coverage": p.sort(descending=True).values[:n_top].sum().item(), "entropy": entropy}
        return stats


class _Counter:
    """Routing counts ``[L, E]`` accumulated by forward hooks while a token mask is set."""

    def __init__(self, model: nn.Module, layers: list[int], num_experts: int, top_k: int):
        self.layers, self.num_experts, self.top_k = layers, num_experts, top_k
        device = model_device(model)
        self.counts = torch.zeros(len(layers), num_experts, dtype=torch.int64, device=device)
        self.gate_sums = torch.zeros(len(layers), num_experts, dtype=torch.float64, device=device)
        self.mask: torch.Tensor | None = None  # [B, S] True for real (non-padding) tokens
        self.handles = []

    def token_mask(self) -> torch.Tensor | None:
        """``[T]``: the batch's mask in the order the routers see its tokens (batch-major)."""
        return None if self.mask is None else self.mask.reshape(-1)

    def reduce(self, totals: torch.Tensor) -> None:
        """Sum counts and ``totals`` (samples, tokens) over all ranks: each routed its own tokens."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.counts, self.gate_sums, totals):
                dist.all_reduce(t)

    def add(self, row: int, weights: torch.Tensor, index: torch.Tensor) -> None:
        """Count the top-k choices ``[T, k]`` of the unmasked tokens of one layer."""
        mask = self.token_mask()
        if mask is not None and mask.numel() == index.shape[0]:
            weights, index = weights[mask], index[mask]
        index, weights = index.reshape(-1), weights.reshape(-1)
        keep = index < self.num_experts  # transformers marks masked slots with index E
        self.counts[row] += torch.bincount(index[keep], minlength=self.num_experts)
        self.gate_sums[row].index_add_(0, index[keep], weights[keep].to(torch.float64))

    def remove(self):
        for h in self.handles:
            h.remove()


class _ExpertsCounter(_Counter):
    """Pre-hooks on the experts modules of a transformers MoE model: every family calls them as
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``, so the choice is read
    where it is used, whatever router produced it."""

    def __init__(self, model: nn.Module):
        blocks = find_moe_blocks(model)
        experts = blocks[0].experts
        num_experts = experts.num_experts if hasattr(experts, "local") else num_local_experts(experts)
        super().__init__(model, [b.layer for b in blocks], num_experts, top_k=0)  # k: read off the first call
        self.handles = [
            b.experts.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)
        ]

    def _hook(self, row: int):
        def count(module, args, kwargs):
            named = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
            index, weights = named["top_k_index"], named["top_k_weights"]
            self.top_k = index.shape[-1]
            self.add(row, weights.reshape(-1, self.top_k), index.reshape(-1, self.top_k))

        return count


class _GateCounter(_Counter):
    """Hooks on the gates of DeepSpeed ``MoE`` layers (the layer index is their order)."""

    def __init__(self, model: nn.Module):
        moes = ds_moe_layers(model)
        super().__init__(model, list(range(len(moes))), moes[0].num_experts, moes[0].deepspeed_moe.gate.k)
        self.handles = [m.deepspeed_moe.gate.register_forward_hook(self._hook(i)) for i, m in enumerate(moes)]

    def _hook(self, row: int):
        return lambda gate, args, output: self.add(row, *gate_choice(gate, args[0]))


class _RoutingMapCounter(_Counter):
    """Hooks on the ``TopKRouter`` of every Megatron ``MoELayer``: it returns ``(probs [T, E],
    routing_map [T, E])`` for tokens in Megatron's sequence-major ``[S, B]`` order.

    Rows are kept for every decoder layer, so pipeline stages (each holding some layers) and
    data-parallel ranks (each routing its own tokens) merge by one sum over all ranks; tensor-
    parallel ranks route the same tokens and are counted once. Context and sequence parallelism
    split a sequence over ranks in ways the padding mask does not follow, and are refused.
    """

    def __init__(self, model: nn.Module):
        found = routers(model)
        if not found:
            raise ValueError("this Megatron model has no MoELayer with a router to profile")
        config = found[0][1].config
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise ValueError(
                "routing profiles of Megatron models need sequence_parallel=False and context_parallel_size=1 "
                "(the padding mask is not split like the sequence); profile with a copy built without them"
            )
        if config.moe_expert_capacity_factor is not None:
            warnings.warn(
                "moe_expert_capacity_factor is set: the routing map, and so the profile, leaves out the tokens "
                "Megatron drops at capacity; profile with a dropless configuration to count every choice"
            )
        super().__init__(model, list(range(config.num_layers)), config.num_moe_experts, config.moe_router_topk)
        self.present = torch.zeros(config.num_layers, dtype=torch.int64, device=self.counts.device)
        self.present[[layer for layer, _ in found]] = 1
        self.handles = [r.register_forward_hook(self._hook(layer)) for layer, r in found]

    def token_mask(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.t().reshape(-1)

    def _hook(self, row: int):
        def count(router, args, output):
            probs, routing_map = output
            mask = self.token_mask()
            if mask is not None:
                if mask.numel() != routing_map.shape[0]:
                    raise ValueError(f"the router saw {routing_map.shape[0]} tokens, the batch has {mask.numel()}")
                probs, routing_map = probs[mask], routing_map[mask]
            self.counts[row] += routing_map.sum(0)
            self.gate_sums[row] += (probs.double() * routing_map).sum(0)

        return count

    def reduce(self, totals: torch.Tensor) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        from megatron.core import parallel_state

        tp, dp_group = 1, None
        if parallel_state.model_parallel_is_initialized():
            tp, dp_group = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_data_parallel_group(),
            )
        for t in (self.counts, self.gate_sums, self.present):
            dist.all_reduce(t)
        self.counts //= tp
        self.gate_sums /= tp
        dist.all_reduce(totals, group=dp_group)
        keep = self.present.nonzero().squeeze(1)
        self.layers = keep.tolist()
        self.counts, self.gate_sums = self.counts[keep], self.gate_sums[keep]


COUNTERS = {
    "transformers": _ExpertsCounter,
    "deepspeed_moe": _GateCounter,
    "megatron": _RoutingMapCounter,
}  # by backend


def megatron_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """One forward of a Megatron ``GPTModel`` on a right-padded batch: positions ``0..S-1`` and a
    causal mask that also hides padding keys (Megatron's boolean masks are True where masked);
    ``kwargs`` (``labels=``) go to the model."""
    S = input_ids.shape[1]
    position_ids = torch.arange(S, device=input_ids.device).expand_as(input_ids)
    causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).triu(1)
    hidden = causal[None, None] | ~attention_mask.bool()[:, None, None, :]
    return model(input_ids, position_ids, attention_mask=hidden, **kwargs)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def profile_routing(
    model: nn.Module,
    batches: Iterable[dict],
    max_samples: int | None = None,
    model_id: str = "",
    data_id: str = "",
    progress: bool = True,
    forward: Callable | None = None,
) -> RoutingProfile:
    """Run ``model`` over ``batches`` (dicts with ``input_ids`` and optional ``attention_mask``)
    and count routed tokens per layer and expert, ignoring padding. A batch with ``counted:
    False`` runs its forward and counts nothing: the ranks of an expert-parallel model must all
    run the same number of forwards, whatever their share of the calibration set.

    ``max_samples`` caps the calibration samples (rows) used on this rank. Counts are summed
    over all ranks when ``torch.distributed`` is initialised. ``forward(model, input_ids,
    attention_mask)`` runs one batch (default: the transformers call, or ``megatron_forward``
    for a Megatron GPTModel); models built from DeepSpeed's ``MoE`` layer are counted at their
    gates, Megatron models at their routers' routing maps.
    """
    name = backend_for(model).NAME
    counter = COUNTERS[name](model)
    forward = forward or (
        megatron_forward if name == "megatron" else lambda m, ids, mask: m(input_ids=ids, attention_mask=mask)
    )
    samples = tokens = 0
    try:
        with _eval_mode(model):
            for batch in tqdm(batches, desc="profiling routing", disable=not progress, unit="batch"):
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                if max_samples is not None:
                    room = max_samples - samples
                    if room <= 0:
                        break
                    ids, mask = ids[:room], None if mask is None else mask[:room]
                mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                counted = batch.get("counted", True)
                counter.mask = (mask if counted else torch.zeros_like(mask)).to(counter.counts.device)
                forward(model, ids.to(counter.counts.device), mask.long().to(counter.counts.device))
                if counted:
                    samples += ids.shape[0]
                    tokens += int(mask.sum())
    finally:
        counter.remove()
    totals = torch.tensor([samples, tokens], dtype=torch.int64, device=counter.counts.device)
    counter.reduce(totals)
    samples, tokens = totals.tolist()
    if tokens == 0:
        raise ValueError(
            "the calibration set is empty (no non-padding tokens were seen); give --calibration-samples > 0 and non-empty data"
        )
    layers = counter.layers
    return RoutingProfile(
        counts={l: c for l, c in zip(layers, counter.counts.tolist())},
        gate_sums={l: g for l, g in zip(layers, counter.gate_sums.tolist())},
        tokens=tokens,
        samples=samples,
        num_experts=counter.num_experts,
        top_k=counter.top_k,
        model_id=model_id,
        data_id=data_id,
    )


def plot_heatmap(profile: RoutingProfile, path: str | Path) -> None:
    """Layer x expert heatmap of routed-token shares, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(profile.counts)
    grid = torch.stack([profile.shares(layer) for layer in layers]).numpy()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * profile.num_experts + 2), max(2.5, 0.4 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(f"routed-token share per expert ({profile.tokens} tokens)")
    fig.colorbar(im, ax=ax, label="share of layer's assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_skew(profile: RoutingProfile, fraction: float = 0.25) -> str:
    """A short table of per-layer skew, for logs."""
    rows = [f"layer  top-{fraction:.0%} coverage  entropy"]
    for layer, s in profile.skew(fraction).items():
        rows.append(f"{layer:>5}  {s['top_coverage']:>16.3f}  {s['entropy']:.3f}")
    return "\n".join(rows)
