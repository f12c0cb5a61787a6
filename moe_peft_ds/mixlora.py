"""MixLoRA / MixDoRA: the FFN of a dense transformers model becomes a routed mixture of LoRA
experts over the frozen FFN, plus plain LoRA on attention.

Expert ``e`` is the frozen gated FFN ``W2 (act(W1 x) * W3 x)`` with its own LoRA (or DoRA)
on W1/W2/W3 (``gate_proj``/``down_proj``/``up_proj``). A trainable fp32 router picks experts
per token (``routing``); the layer's output is the weighted sum of the chosen experts.
Tokens are grouped by expert once per layer (``backends.hf.Routes``) and the experts' LoRA
runs as grouped GEMMs over their rows (``lora.ExpertLoRA``, on the shared weight expanded,
never copied), so the expert LoRA is the same code as the sieve's.

Two execution paths give one result: the reference path runs every chosen expert's full
FFN on its rows; the fast path (default) computes the shared W1 and W3 projections once
per token and adds each expert's LoRA delta on its rows only. The frozen W2 is linear, so
``sum_j w_j W2 h_j = W2 (sum_j w_j h_j)``: the fast path mixes the experts' intermediate
activations per token and runs the frozen W2 once per token too, with only the experts'
W2 LoRA per routed row. (DoRA scales each expert's W2 output, which rules this out: MixDoRA's
fast path runs W2 per routed row, as the MixLoRA paper does.)

A dense family is one ``DenseFamily`` entry: where the decoder layer keeps its gated MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backends.hf import inject_attention_lora
from .backends.megatron import MODEL_TYPE as MEGATRON
from .backends.megatron import MegatronGatedMLP, dense_mlps, is_megatron_model
from .config import MixLoRAConfig
from .dispatch import ExpertParallelDispatch, copy_expert_slots, tag_expert_local
from .lora import ExpertLoRA, apply_expert_update
from .modules import UnsupportedModelError, layer_index, read_in_forward, replace_module
from .placement import check_placement, rank_major
from .routes import Routes, add_unrouted, unrouted_tokens
from .routing import RouterLosses, attach_loss, route, router_loss, router_stats

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # W1, W3, W2


@dataclass(frozen=True)
class DenseFamily:
    """A dense transformers family whose decoder layers hold a gated MLP at ``mlp``."""

    name: str
    model_types: tuple[str, ...]
    mlp: str = "mlp"


DENSE_FAMILIES = (
    DenseFamily("llama", ("llama",)),
    DenseFamily("mistral", ("mistral",)),
    DenseFamily("qwen2", ("qwen2",)),
    DenseFamily("qwen3", ("qwen3",)),
    DenseFamily("gemma", ("gemma",)),
    DenseFamily("gemma2", ("gemma2",)),
    DenseFamily("gemma3", ("gemma3_text",)),
)


def dense_family_of(model: nn.Module) -> DenseFamily:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in DENSE_FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for fam in DENSE_FAMILIES for t in fam.model_types)
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported dense family for MixLoRA; supported: {known}. "
        "Add a DenseFamily entry in moe_peft_ds/mixlora.py to support another layout."
    )


def _shared(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The frozen ``[out, in]`` weight seen as ``[E, out, in]`` by every expert (a view)."""
    return weight.expand(num_experts, *weight.shape)


def _rng_untouched(device: torch.device):
    """Building experts that are then overwritten (sharding, gathering) must not move the seeded
    RNG: an expert-parallel run then draws what one process draws (e.g. experts added later)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class Router(nn.Linear):
    """A MixLoRA router (no bias): logits in fp32 whatever dtype its weight was cast to
    (DeepSpeed's bf16/fp16 configs cast every module; the routing stays in full precision)."""

    def __init__(self, hidden: int, num_experts: int, std: float, device=None):
        super().__init__(hidden, num_experts, bias=False, dtype=torch.float32, device=device)
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MixLoRAExperts(nn.Module):
    """One adapter's router and LoRA experts for one FFN."""

    def __init__(self, mlp: nn.Module, cfg: MixLoRAConfig):
        super().__init__()
        hidden = mlp.gate_proj.in_features
        self.router = Router(hidden, cfg.num_experts, cfg.router_init_range, device=mlp.gate_proj.weight.device)
        experts = list(range(cfg.num_experts))
        self.lora = nn.ModuleDict(
            {
                name: ExpertLoRA(experts, _shared(getattr(mlp, name).weight, cfg.num_experts), cfg)
                for name in PROJECTIONS
            }
        )


class ExpertLoRAPool(nn.Module):
    """One projection's LoRA experts of a layer, held as groups of ``ExpertLoRA`` with disjoint
    expert ids: continual learning adds a group per task, and an earlier group is frozen by
    ``requires_grad`` (no optimizer, DeepSpeed's included, sees it). Called like ``ExpertLoRA``:
    the groups cover disjoint experts, so their updates (zero elsewhere) add up."""

    def __init__(self, groups: list[ExpertLoRA]):
        super().__init__()
        self.groups = nn.ModuleList(groups)

    @property
    def dora(self) -> bool:
        return self.groups[0].dora

    def forward(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor, weight_out_in: torch.Tensor):
        parts = [g(x, expert_of_row, counts, weight_out_in) for g in self.groups]
        if len(parts) == 1:
            return parts[0]
        # Each row belongs to one group: the others give it delta 0 and scale 1.
        delta = torch.stack([delta for delta, _ in parts]).sum(0)
        return delta, torch.stack([scale for _, scale in parts]).prod(0) if self.dora else None


class RouterPool(nn.Module):
    """A router whose rows come in blocks, one per expert group, so that earlier experts' rows can
    be frozen (``requires_grad``) while new rows train: the logits are the blocks' outputs side by side."""

    def __init__(self, blocks: list[nn.Linear]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([b.weight for b in self.blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.blocks], dim=-1)


def expert_groups(lora: nn.Module) -> list[ExpertLoRA]:
    """The ``ExpertLoRA`` groups behind one projection of a MixLoRA layer."""
    return list(lora.groups) if isinstance(lora, ExpertLoRAPool) else [lora]


def router_blocks(router: nn.Module) -> list[nn.Linear]:
    return list(router.blocks) if isinstance(router, RouterPool) else [router]


class MixLoRAFFN(nn.Module):
    """Replaces a gated MLP; called like it, ``forward(x [..., H]) -> [..., H]``.

    The router's auxiliary losses are attached to the output (``routing.attach_loss``) and
    reach the optimizer through the forward path. ``token_mask`` (set for each forward by the
    hook that ``apply_mixlora`` registers on the model) marks padding, which is routed to no
    expert (it gets the frozen FFN) and left out of the losses. ``last_stats`` keeps the
    last forward's loss values and capacity drops, detached, for logging only.
    """

    def __init__(self, mlp: nn.Module, cfg: MixLoRAConfig, fast: bool = True):
        super().__init__()
        self.base = mlp
        self.cfg = cfg
        self.fast = fast
        self.num_experts = cfg.num_experts
        self.adapter = MixLoRAExperts(mlp, cfg)
        self.dispatch = None  # expert parallel: a parallel.ExpertParallelDispatch (see shard)
        self.local_experts = list(range(cfg.num_experts))  # global ids of the LoRA experts held here
        mlp.requires_grad_(False)
        self.aux_loss_scale = (
            1.0  # set per step under DeepSpeed: this rank's share of real tokens / accumulation steps
        )
        # Its own until apply_mixlora pools every layer's router losses (share_router_losses).
        self.router_losses, self.loss_slot = RouterLosses(cfg.router_aux_loss_pooling == "pooled"), 0
        self.collect_router_losses = True  # off for forwards outside the training loss (continual's router KL)
        self.token_mask: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}
        read_in_forward(self, mlp.parameters())  # the base weights are read here, not in base.forward

    @property
    def num_local(self) -> int:
        return len(self.local_experts)

    def _valid(self, x: torch.Tensor) -> torch.Tensor:
        """``[T]``: True for real tokens of ``x [B, S, H]`` (all of them without a mask)."""
        tokens = x.shape[:-1].numel()
        mask = self.token_mask
        if (
            mask is None
            or mask.dim() != 2
            or x.dim() != 3
            or mask.shape[0] != x.shape[0]
            or mask.shape[1] < x.shape[1]
        ):
            return torch.ones(tokens, dtype=torch.bool, device=x.device)
        return (
            mask[:, -x.shape[1] :].reshape(-1).to(device=x.device, dtype=torch.bool)
        )  # generation: the last S positions

    def _lora(
        self, name: str, y: torch.Tensor, rows: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """``y``, the frozen projection ``name`` of ``rows`` (no bias), with each row's expert
        LoRA/DoRA applied, plus the bias. Rows are sorted by (local) expert."""
        linear = getattr(self.base, name)
        shared = _shared(linear.weight, self.num_local)
        y = apply_expert_update(y, *self.adapter.lora[name](rows, expert_of_row, counts, shared))
        return y if linear.bias is None else y + linear.bias

    def expert_rows(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each row's whole expert FFN (frozen + its LoRA) for rows ``x [S, H]`` sorted by (local)
        expert, ``counts`` rows per expert: the reference path, and what the expert-parallel
        dispatch runs on the rows this rank receives."""
        gate = self._lora("gate_proj", F.linear(x, self.base.gate_proj.weight), x, expert_of_row, counts)
        h = self.base.act_fn(gate) * self._lora(
            "up_proj", F.linear(x, self.base.up_proj.weight), x, expert_of_row, counts
        )
        return self._lora("down_proj", F.linear(h, self.base.down_proj.weight), h, expert_of_row, counts)

    def _fast(self, flat: torch.Tensor, routes: Routes, weights: torch.Tensor) -> torch.Tensor:
        """The fast path (see the module docstring): W1 and W3 once per token, and W2 too for LoRA experts."""
        rows = routes.gather(flat)
        projected = {
            name: routes.gather(F.linear(flat, getattr(self.base, name).weight)) for name in ("gate_proj", "up_proj")
        }
        gate, up = (self._lora(n, projected[n], rows, routes.expert, routes.counts) for n in ("gate_proj", "up_proj"))
        h = self.base.act_fn(gate) * up
        if not self.adapter.lora["down_proj"].dora:
            return self._mixed_down(h, routes, weights, flat.shape[0]).to(flat.dtype)
        down = self._lora("down_proj", F.linear(h, self.base.down_proj.weight), h, routes.expert, routes.counts)
        return routes.combine(flat, down, weights)

    def _mixed_down(self, h: torch.Tensor, routes: Routes, weights: torch.Tensor, tokens: int) -> torch.Tensor:
        """``sum_j w_j (W2 + s B_j A_j) h_j`` per token: the frozen W2 once per token on the
        mixed activations, each expert's LoRA on its rows (LoRA only; see the module docstring)."""
        down = self.base.down_proj
        out = F.linear(routes.mix(h, weights, tokens).to(h.dtype), down.weight)
        delta, _ = self.adapter.lora["down_proj"](
            h, routes.expert, routes.counts, _shared(down.weight, self.num_local)
        )
        out = out + routes.mix(delta, weights, tokens).to(out.dtype)
        if down.bias is not None:  # weights sum to 1 on routed tokens, 0 on the others
            out = out + routes.mix(down.bias.expand(h.shape[0], -1), weights, tokens).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        valid = self._valid(x)
        if self.training and self.cfg.jitter_noise > 0:
            noise = torch.empty_like(flat).uniform_(1 - self.cfg.jitter_noise, 1 + self.cfg.jitter_noise)
            router_in = flat.float() * noise
            if (
                self.cfg.routing != "switch"
            ):  # the reference perturbs the experts' input too, except with switch routing
                flat = flat * noise
        else:
            router_in = flat.float()
        routing = route(self.adapter.router(router_in), self.cfg, valid, sequence=x.shape[-2] if x.dim() > 2 else None)
        if self.dispatch is not None:  # each expert's rows go to the rank that holds it, and come back
            out = self.dispatch(flat, routing.index, routing.weights, self.expert_rows, fallback=self.base)
        else:
            unrouted = unrouted_tokens(routing.index, self.num_experts)  # padding, capacity drops
            rows, n_unrouted = torch.stack(
                [(routing.index < self.num_experts).sum(), unrouted.sum()]
            ).tolist()  # the one host sync
            routes = Routes.of(routing.index, self.num_experts, rows)
            out = (
                self._fast(flat, routes, routing.weights)
                if self.fast
                else routes.combine(
                    flat, self.expert_rows(routes.gather(flat), routes.expert, routes.counts), routing.weights
                )
            )
            out = add_unrouted(out, flat, unrouted, n_unrouted, self.base)
        if self.collect_router_losses:
            out = self._router_losses(out, routing, valid)
        return out.reshape(x.shape)

    def _router_losses(self, out: torch.Tensor, routing, valid: torch.Tensor) -> torch.Tensor:
        """Record this layer's router statistics in ``router_losses`` and attach its summed router
        probabilities and z to ``out``, with the gradient the (pooled) losses give them."""
        aux_coef, z_coef = self.cfg.router_aux_loss_coef, self.cfg.router_z_loss_coef
        stats = router_stats(routing, valid, with_z=bool(z_coef))
        recorded = self.router_losses.record(self.loss_slot, stats)
        own = router_loss(recorded[self.loss_slot], aux_coef, z_coef)  # detached: for logging only
        self.last_stats = {"aux_loss": own, "dropped": routing.dropped}
        if not (aux_coef or z_coef) or not stats.probs.requires_grad:
            return out
        pool, slot, scale = self.router_losses, self.loss_slot, self.aux_loss_scale
        gradient = lambda: pool.gradient(recorded, slot, aux_coef, z_coef) * scale  # noqa: E731 (every layer has recorded by then)
        return attach_loss(out, torch.cat([stats.probs, stats.z_sum.reshape(1)]), gradient)

    def shard(self, group, placement: list[list[int]] | None = None) -> None:
        """Keep only this rank's ``E/N`` LoRA experts, tagged for DeepSpeed; the router, the frozen
        FFN and attention stay replicated. Every expert group (one, or one per task after
        ``continual.grow_experts``) is split evenly, so that every rank keeps its share of each
        task and frozen groups stay frozen: rank ``r`` holds ``placement[r]`` (default: the
        ``r``-th slice of each group; ``placement.balanced(loads, N, groups)`` spreads measured
        loads). Routed rows then reach their expert's rank by the dropless all-to-all
        (``parallel.ExpertParallelDispatch``) and run there row by row (``expert_rows``): a token's
        experts may sit on different ranks, so the fast path's once-per-token projections do not apply."""
        ep_size, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.dispatch is not None:
            raise ValueError("this MixLoRA layer is expert-parallel already")
        groups = {name: expert_groups(self.adapter.lora[name]) for name in PROJECTIONS}
        sizes = [len(g.expert_ids) for g in groups["gate_proj"]]
        if any(size % ep_size for size in sizes):
            raise ValueError(f"LoRA expert groups of {sizes} experts cannot be split over ep_size={ep_size}")
        placement = placement or [
            [e for g in groups["gate_proj"] for e in _part(g.expert_ids, r, ep_size)] for r in range(ep_size)
        ]
        check_placement(placement, self.num_experts, ep_size)
        for g in groups["gate_proj"]:
            if any(len(set(g.expert_ids) & set(held)) != len(g.expert_ids) // ep_size for held in placement):
                raise ValueError(f"placement {placement} does not give every rank an equal share of {g.expert_ids}")
        self.local_experts = placement[rank]
        for name in PROJECTIONS:
            weight = getattr(self.base, name).weight
            local = []
            for full in groups[name]:
                ids = [e for e in full.expert_ids if e in self.local_experts]
                with _rng_untouched(weight.device):  # overwritten below
                    shard = ExpertLoRA(ids, _shared(weight, ids[-1] + 1), self.cfg)
                copy_expert_slots(full, shard)
                shard.set_layout(self.local_experts)
                tag_expert_local(shard.requires_grad_(full.lora_A.requires_grad).parameters(), ep_size)
                local.append(shard)
            self.adapter.lora[name] = local[0] if len(local) == 1 else ExpertLoRAPool(local)
        self.dispatch = ExpertParallelDispatch(
            group, self.num_experts, rank_major(placement), device=self.adapter.router.weight.device
        )

    @torch.no_grad()
    def unshard(self) -> None:
        """The inverse of ``shard``: every rank of the group gathers all the LoRA experts (each group
        kept, with its ``requires_grad``) and runs them locally again. Call on every rank."""
        if self.dispatch is None:
            raise ValueError("this MixLoRA layer is not expert-parallel")
        group = self.dispatch.group

        def gathered(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            return torch.cat(parts)

        for name in PROJECTIONS:
            weight = getattr(self.base, name).weight
            whole = []
            for shard in expert_groups(self.adapter.lora[name]):
                ids = gathered(torch.tensor(shard.expert_ids, device=shard.lora_A.device))
                by_id = ids.argsort()  # ranks' slices side by side; a balanced placement interleaves them
                with _rng_untouched(weight.device):  # overwritten below
                    full = ExpertLoRA(ids.tolist(), _shared(weight, self.num_experts), self.cfg)
                for pname, p in full.named_parameters():
                    p.copy_(gathered(getattr(shard, pname))[by_id])
                whole.append(full.requires_grad_(shard.lora_A.requires_grad))
            self.adapter.lora[name] = whole[0] if len(whole) == 1 else ExpertLoRAPool(whole)
        self.local_experts, self.dispatch = list(range(self.num_experts)), None


@torch.no_grad()
def routing_counts(model: nn.Module, batches) -> dict[int, list[int]]:
    """``{decoder layer: [E] routed assignments per LoRA expert}`` of ``model``'s MixLoRA routers
    over ``batches`` (``input_ids``, ``attention_mask``; padding is routed nowhere), summed over
    the ranks when ``torch.distributed`` is initialised: the loads of a balanced placement."""
    layers = mixlora_layers(model)
    device = layers[0][1].adapter.router.weight.device
    totals = torch.zeros(len(layers), layers[0][1].num_experts, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            if batch.get("counted", True):
                for row, (_, layer) in enumerate(layers):
                    totals[row] += layer.router_losses.layers[layer.loss_slot].counts.double()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return {index: [round(c) for c in row] for (index, _), row in zip(layers, totals.tolist())}


def pool_groups(layer: MixLoRAFFN) -> list[list[int]]:
    """The global ids of each expert group of ``layer`` (one per task of a continual pool), gathered
    from every rank when it is expert-parallel (every rank of its group must call this)."""
    local = [g.expert_ids for g in expert_groups(layer.adapter.lora["gate_proj"])]
    if layer.dispatch is None:
        return local
    parts = [None] * dist.get_world_size(layer.dispatch.group)
    dist.all_gather_object(parts, local, group=layer.dispatch.group)
    return [sorted(e for part in parts for e in part[i]) for i in range(len(local))]


def _part(ids: list[int], r: int, n: int) -> list[int]:
    """The ``r``-th of ``n`` equal slices of ``ids``."""
    share = len(ids) // n
    return ids[r * share : (r + 1) * share]


def mixlora_layers(model: nn.Module) -> list[tuple[int, MixLoRAFFN]]:
    """``(decoder layer index, layer)`` of every MixLoRA FFN in ``model``."""
    return [(layer_index(n), m) for n, m in model.named_modules() if isinstance(m, MixLoRAFFN)]


def share_router_losses(layers: list[MixLoRAFFN], cfg: MixLoRAConfig) -> None:
    """Give one adapter's MixLoRA layers one ``RouterLosses``: pooled over them all by default."""
    pool = RouterLosses(cfg.router_aux_loss_pooling == "pooled")
    for slot, layer in enumerate(layers):
        layer.router_losses, layer.loss_slot = pool, slot


def router_loss_value(model: nn.Module) -> torch.Tensor | None:
    """The router losses of ``model``'s last forward (detached), as the optimizer saw them:
    pooled over the layers, or summed, as configured; None without MixLoRA layers."""
    layers = [layer for _, layer in mixlora_layers(model)]
    if not layers:
        return None
    cfg = layers[0].cfg
    pools = {id(layer.router_losses): layer.router_losses for layer in layers}
    return sum(pool.value(cfg.router_aux_loss_coef, cfg.router_z_loss_coef) for pool in pools.values())


def _decoder_mlps(model: nn.Module, fam: DenseFamily) -> list[tuple[nn.Module, nn.Module]]:
    """``(decoder layer, gated MLP)`` of every decoder layer."""
    found = []
    for name, module in model.named_modules():
        mlp = getattr(module, fam.mlp, None)
        if name.rpartition(".")[0].endswith("layers") and mlp is not None:
            if not all(isinstance(getattr(mlp, p, None), nn.Linear) for p in PROJECTIONS):
                raise UnsupportedModelError(f"{name}.{fam.mlp} is not a gated MLP with {PROJECTIONS}")
            found.append((module, mlp))
    if not found:
        raise UnsupportedModelError(f"no decoder layers with a gated '{fam.mlp}' found in this {fam.name} model")
    return found


def _capture_token_mask(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: hand the batch's 2-D attention mask to every MixLoRA layer, and start a
    new pass of their router losses."""
    for layer in new_router_loss_pass(model):
        layer.token_mask = kwargs.get("attention_mask")


def new_router_loss_pass(model: nn.Module) -> list[MixLoRAFFN]:
    """Start a new pass of every MixLoRA layer's router losses (``RouterLosses.new_pass``), as
    each model forward does; returns the layers."""
    layers = [m for m in model.modules() if isinstance(m, MixLoRAFFN)]  # every forward: a type check, not name parsing
    for pool in {id(layer.router_losses): layer.router_losses for layer in layers}.values():
        pool.new_pass()
    return layers


def apply_mixlora(model: nn.Module, cfg: MixLoRAConfig | None = None, fast: bool = True) -> nn.Module:
    """Freeze ``model`` (a dense transformers causal LM, or a Megatron-core model: see
    ``_apply_mixlora_megatron``) and turn every FFN into a MixLoRA (MixDoRA) layer, with plain LoRA
    on ``cfg.attention_targets``. Checks everything before changing the model; attaches the
    filled-in config as ``model.moe_peft_config``."""
    cfg = cfg or MixLoRAConfig()
    if is_megatron_model(model):
        return _apply_mixlora_megatron(model, cfg, fast=fast)
    fam = dense_family_of(model)
    if getattr(model, "moe_peft_config", None) is not None:
        raise ValueError("this model already carries a moe_peft_ds adapter; load a fresh base model")
    layers = _decoder_mlps(model, fam)
    model.requires_grad_(False)
    for layer, mlp in layers:
        setattr(layer, fam.mlp, MixLoRAFFN(mlp, cfg, fast=fast))
    share_router_losses([getattr(layer, fam.mlp) for layer, _ in layers], cfg)
    inject_attention_lora(model, cfg)
    model._mixlora_mask_hook = model.register_forward_pre_hook(_capture_token_mask, with_kwargs=True)
    cfg.model_type, cfg.hidden_size = model.config.model_type, model.config.hidden_size
    cfg.base_model = cfg.base_model or str(getattr(model.config, "_name_or_path", "") or "")
    model.moe_peft_config = cfg
    return model


def describe_dense(model: nn.Module) -> dict:
    """What a MixLoRA adapter must match: ``model_type`` and ``hidden_size`` (a clear error for
    models MixLoRA does not take)."""
    if is_megatron_model(model):
        return {"model_type": MEGATRON, "hidden_size": model.config.hidden_size}
    dense_family_of(model)
    return {"model_type": model.config.model_type, "hidden_size": model.config.hidden_size}


def set_fast_path(model: nn.Module, fast: bool) -> None:
    """Switch every MixLoRA layer between the fast and the reference path (same result)."""
    for _, layer in mixlora_layers(model):
        layer.fast = fast


class MegatronMixLoRAFFN(MixLoRAFFN):
    """MixLoRA over a Megatron dense MLP, called like it: ``forward(hidden [S, B, H]) -> (out, None)``
    (the frozen fc2 bias is in ``out``). ``layer_index`` keys its checkpoint tensors."""

    def __init__(self, mlp: nn.Module, cfg, layer: int, fast: bool = True):
        super().__init__(MegatronGatedMLP(mlp), cfg, fast=fast)
        self.layer_index = layer

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise ValueError("a MixLoRA FFN replaces a dense MLP, which is never called with per_token_scale")
        # Megatron is sequence-first; the mixture and its padding mask are batch-first
        return super().forward(hidden_states.transpose(0, 1)).transpose(0, 1), None

    def unwrapped(self) -> nn.Module:
        return self.base.mlp


def _new_router_loss_pass(model: nn.Module, args) -> None:
    """Forward pre-hook: each forward is a new pass of the router losses (the padding mask is the
    caller's to set on Megatron, see the module docstring)."""
    new_router_loss_pass(model)


def _apply_mixlora_megatron(model: nn.Module, cfg, fast: bool = True) -> nn.Module:
    """Freeze a Megatron model and turn every dense MLP into a MixLoRA (MixDoRA) layer.
    Checked before anything changes; LoRA on Megatron's attention is not built (attention_targets=[])."""
    sites = dense_mlps(model)
    if not sites:
        raise UnsupportedModelError(
            "the Megatron model has no dense MLP (megatron.core.transformer.mlp.MLP) for MixLoRA"
        )
    if getattr(model, "moe_peft_config", None) is not None:
        raise ValueError("this model already carries a moe_peft_ds adapter; load a fresh base model")
    if cfg.attention_targets:
        raise ValueError("MixLoRA on Megatron models has no attention LoRA; set attention_targets=[]")
    config = sites[0][2].config
    if not config.gated_linear_unit:
        raise UnsupportedModelError("MixLoRA needs gated MLPs (gated_linear_unit=True); this Megatron model's are not")
    if config.tensor_model_parallel_size > 1:
        raise UnsupportedModelError("MixLoRA on Megatron models needs tensor_model_parallel_size=1")
    model.requires_grad_(False)
    layers = [MegatronMixLoRAFFN(mlp, cfg, layer, fast=fast) for _, layer, mlp in sites]
    for (path, _, _), layer in zip(sites, layers):
        replace_module(model, path, layer)
    share_router_losses(layers, cfg)
    model._mixlora_pass_hook = model.register_forward_pre_hook(_new_router_loss_pass)
    cfg.model_type, cfg.hidden_size = MEGATRON, config.hidden_size
    model.moe_peft_config = cfg
    return model
