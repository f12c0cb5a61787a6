"""Continual learning with dynamic experts, on MixLoRA (``launch/continual.py`` runs a task sequence).

Tasks arrive one after another over a frozen base model. Before each task every MixLoRA layer
gets ``n`` fresh LoRA experts and router rows (``grow_experts``); all earlier experts become a
frozen group of their own (``requires_grad=False``: no optimizer, DeepSpeed's included, can
change them, so they stay bit-identical), and the router's earlier rows are frozen too unless
asked otherwise. Forgetting can still come from the router sending old-task tokens elsewhere;
two protections, combinable: ``router_kl`` (a KL penalty keeping the router's distribution on
replayed old-task samples close to what it was before the task, against ``router_targets``
computed before growing) and replaying a few old-task samples in training. ``prune_experts``
drops rarely routed experts and ``merge_experts`` merges near-duplicates, so the pool does not
grow without bound.

Experts are grown, pruned and merged column-wise: expert ``e`` of every layer was added for the
same task (``MixLoRAConfig.expert_tasks[e]``), so every layer keeps the same number of experts
and a checkpoint is a plain MixLoRA checkpoint (loadable by ``load_adapter``) with the
provenance in its ``adapter_config.json``. Attention LoRA, if any, trains in the first task
only. Several adapters on one model are refused.

Under expert parallelism (``parallel.shard_experts``) every task's experts are spread evenly
over the ranks (``MixLoRAFFN.shard``), so each rank keeps its share of every task. Growing,
pruning and merging gather the experts (adapters only, small) on every rank, change the pool
exactly as one process would, and shard it again; the pool must therefore stay a multiple of
``ep_size``: ``n`` per task is, and pruning and merging remove a multiple of it (the
candidates beyond are kept: the most used, the least similar).
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, MixLoRAConfig
from .device import model_device
from .lora import ExpertLoRA, LoRALinear
from .mixlora import (
    PROJECTIONS,
    ExpertLoRAPool,
    MixLoRAFFN,
    Router,
    RouterPool,
    _shared,
    expert_groups,
    mixlora_layers,
    router_blocks,
)
from .routing import route


def _layers(model: nn.Module) -> list[MixLoRAFFN]:
    """The model's MixLoRA layers, checked to be ones this module can change."""
    cfg = getattr(model, "moe_peft_config", None)
    layers = [layer for _, layer in mixlora_layers(model)]
    if not isinstance(cfg, MixLoRAConfig) or not layers:
        raise ConfigError(
            "continual learning needs a model with a MixLoRA adapter (apply_mixlora or load_adapter first)"
        )
    if len(getattr(model, "moe_peft_configs", None) or {}) > 1:
        raise ConfigError("continual learning on a model carrying several adapters is not supported; use one adapter")
    if cfg.expert_r or cfg.expert_alpha:
        raise ConfigError("continual learning needs one rank and alpha for every expert (no expert_r / expert_alpha)")
    return layers


def _ep_size(layers: list[MixLoRAFFN]) -> int:
    return layers[0].dispatch.ep_size if layers[0].dispatch is not None else 1


@contextmanager
def _unsharded(layers: list[MixLoRAFFN]):
    """Inside, every layer holds all its experts (gathered over its expert-parallel group, if
    any); on the way out, even on an error, each is sharded again over the same group."""
    groups = [layer.dispatch.group if layer.dispatch is not None else None for layer in layers]
    for layer, group in zip(layers, groups):
        if group is not None:
            layer.unshard()
    try:
        yield
    finally:
        for layer, group in zip(layers, groups):
            if group is not None:
                layer.shard(group)


def _set_num_experts(model: nn.Module, layers: list[MixLoRAFFN], tasks: list[str]) -> None:
    cfg = model.moe_peft_config
    for layer in layers:
        layer.num_experts = len(tasks)
        layer.local_experts = list(range(len(tasks)))
        for proj in PROJECTIONS:
            for group in expert_groups(layer.adapter.lora[proj]):
                group.set_layout(layer.local_experts)
    cfg.num_experts, cfg.expert_tasks = len(tasks), list(tasks)
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(f"top_k={cfg.top_k} exceeds the {cfg.num_experts} experts left")


def task_of_experts(model: nn.Module) -> list[str]:
    """The task of each expert id; experts of a MixLoRA adapter made without tasks belong to ''."""
    cfg = model.moe_peft_config
    return list(cfg.expert_tasks) or [""] * cfg.num_experts


def grow_experts(model: nn.Module, n: int, task: str, train_old_router: bool = False) -> list[int]:
    """Add ``n`` fresh experts (ids ``E .. E+n-1``) and router rows for ``task`` to every MixLoRA
    layer; freeze every earlier expert, attention LoRA, and (unless ``train_old_router``) the
    earlier router rows. The new experts start as the frozen FFN (LoRA B = 0). Returns the new ids."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"experts per task must be an integer >= 1, got {n!r}")
    layers = _layers(model)
    tasks = task_of_experts(model)
    if task in tasks:
        raise ConfigError(f"task {task!r} already has experts; task names must be unique")
    if n % _ep_size(layers):
        raise ConfigError(
            f"experts per task ({n}) must be a multiple of ep_size={_ep_size(layers)}: "
            "every rank holds an equal share of each task's experts"
        )
    new_ids = list(range(len(tasks), len(tasks) + n))
    with _unsharded(layers):
        _grow(model, layers, new_ids, task, tasks, train_old_router)
    return new_ids


def _grow(
    model: nn.Module, layers: list[MixLoRAFFN], new_ids: list[int], task: str, tasks: list[str], train_old_router: bool
) -> None:
    cfg, old, n = model.moe_peft_config, len(tasks), len(new_ids)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.requires_grad_(False)
    for layer in layers:
        for proj in PROJECTIONS:
            groups = expert_groups(layer.adapter.lora[proj])
            for group in groups:
                group.requires_grad_(False)  # _set_num_experts below re-derives their index helpers
            fresh = ExpertLoRA(new_ids, _shared(getattr(layer.base, proj).weight, old + n), cfg)
            layer.adapter.lora[proj] = ExpertLoRAPool(groups + [fresh])
        blocks = router_blocks(layer.adapter.router)
        for block in blocks:
            block.requires_grad_(train_old_router)
        fresh = Router(blocks[0].in_features, n, cfg.router_init_range, device=blocks[0].weight.device)
        layer.adapter.router = RouterPool(blocks + [fresh])
    _set_num_experts(model, layers, tasks + [task] * n)


# ---------------------------------------------------------------------------------------------
# pool management: prune and merge rebuild every layer with one group per expert plan


def _expert_tensors(layer: MixLoRAFFN, proj: str, e: int) -> dict[str, torch.Tensor]:
    group = next(g for g in expert_groups(layer.adapter.lora[proj]) if e in g.slot)
    slot = group.slot[e]
    out = {"lora_A": group.lora_A[slot], "lora_B": group.lora_B[slot], "scaling": group.scaling[slot]}
    if group.magnitude is not None:
        out["magnitude"] = group.magnitude[slot]
    return out


def delta_weight(layer: MixLoRAFFN, proj: str, e: int) -> torch.Tensor:
    """Expert ``e``'s effective LoRA update ``s B A`` (``[out, in]``) on projection ``proj``."""
    t = _expert_tensors(layer, proj, e)
    return (t["scaling"] * (t["lora_B"] @ t["lora_A"])).detach().float()


def _merged_pair(tensors: list[dict[str, torch.Tensor]], r: int) -> dict[str, torch.Tensor]:
    """The documented merge rule: the mean of the experts' updates ``s B A``, brought back to rank
    ``r`` by a truncated SVD (exact when the mean has rank <= r; otherwise the closest rank-r
    matrix in Frobenius norm), split as ``B = U sqrt(S) / sqrt(s)``, ``A = sqrt(S) V^T / sqrt(s)``;
    DoRA magnitudes are averaged."""
    s = tensors[0]["scaling"].float()
    mean = sum(t["scaling"].float() * (t["lora_B"].float() @ t["lora_A"].float()) for t in tensors) / len(tensors)
    U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
    k = min(r, len(S))  # a rank above min(out, in) keeps zero rows
    root = (S[:k] / s).sqrt()
    merged = {"lora_B": mean.new_zeros(mean.shape[0], r), "lora_A": mean.new_zeros(r, mean.shape[1])}
    merged["lora_B"][:, :k], merged["lora_A"][:k] = U[:, :k] * root, root[:, None] * Vh[:k]
    if "magnitude" in tensors[0]:
        merged["magnitude"] = sum(t["magnitude"].float() for t in tensors) / len(tensors)
    return merged


def _rebuild(model: nn.Module, plan: list[list[int]], tasks: list[str]) -> None:
    """Every layer anew with ``len(plan)`` experts: new expert ``i`` is old expert ``plan[i][0]``
    or, for several, their merge (``_merged_pair``); router rows copied or averaged. The result is
    one frozen group per projection (a later ``grow_experts`` adds trainable ones)."""
    layers = _layers(model)
    cfg, n = model.moe_peft_config, len(plan)
    for layer in layers:
        for proj in PROJECTIONS:
            group = ExpertLoRA(list(range(n)), _shared(getattr(layer.base, proj).weight, n), cfg)
            with torch.no_grad():
                for i, sources in enumerate(plan):
                    olds = [_expert_tensors(layer, proj, e) for e in sources]
                    new = olds[0] if len(sources) == 1 else _merged_pair(olds, cfg.r)
                    group.lora_A[i].copy_(new["lora_A"])
                    group.lora_B[i].copy_(new["lora_B"])
                    if group.magnitude is not None:
                        group.magnitude[i].copy_(new["magnitude"])
            layer.adapter.lora[proj] = group.requires_grad_(False)
        weight = layer.adapter.router.weight.detach()
        router = Router(weight.shape[1], n, cfg.router_init_range, device=weight.device)
        with torch.no_grad():
            router.weight.copy_(torch.stack([weight[sources].mean(0) for sources in plan]))
        layer.adapter.router = router.requires_grad_(False)
    _set_num_experts(model, layers, tasks)


@torch.no_grad()
def expert_usage(model: nn.Module, loader) -> torch.Tensor:
    """``[layers, E]``: each expert's share of the routed (token, expert) slots of its layer over
    ``loader``'s batches (padding excluded). Under torch.distributed every rank calls this, and the
    counts are summed over the ranks, so that all of them take the same pruning decision."""
    layers = _layers(model)
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
    was_training = model.training
    model.eval()
    device = model_device(model)
    cfg = model.moe_peft_config
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with _router_logits(model) as logits:  # routed again here, so training forwards pay nothing for it
            model(**batch)
        for row, x in enumerate(logits):
            index = route(x.float(), cfg, _valid(batch), sequence=batch["input_ids"].shape[-1]).index
            counts[row] += torch.bincount(index[index < x.shape[1]], minlength=x.shape[1]).double().cpu()
    model.train(was_training)
    if dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def prune_experts(model: nn.Module, usage: torch.Tensor, threshold: float) -> list[int]:
    """Remove every expert whose routed share, averaged over layers (``usage`` from
    ``expert_usage``), is below ``threshold``; the others keep their order and are renumbered.
    Keeps at least ``top_k`` experts, and under expert parallelism a multiple of ``ep_size``
    (the most used candidates stay). Returns the removed ids."""
    layers = _layers(model)
    if usage.shape != (len(layers), layers[0].num_experts):
        raise ValueError(f"usage has shape {tuple(usage.shape)}, expected {(len(layers), layers[0].num_experts)}")
    share = usage.mean(0)
    by_use = share.argsort(descending=True, stable=True).tolist()
    keep = max(int((share >= threshold).sum()), model.moe_peft_config.top_k)
    keep += -keep % _ep_size(layers)  # round up: the pool stays shardable
    kept = sorted(by_use[:keep])
    removed = sorted(by_use[keep:])
    if removed:
        tasks = task_of_experts(model)
        with _unsharded(layers):
            _rebuild(model, [[e] for e in kept], [tasks[e] for e in kept])
    return removed


@torch.no_grad()
def expert_similarity(model: nn.Module) -> torch.Tensor:
    """``[E, E]``: cosine similarity of the experts' effective updates ``s B A``, each projection's
    flattened and the three concatenated per layer, averaged over layers."""
    layers = _layers(model)
    sims = []
    with _unsharded(layers):
        for layer in layers:
            flat = torch.stack(
                [
                    torch.cat([delta_weight(layer, p, e).flatten() for p in PROJECTIONS])
                    for e in range(layer.num_experts)
                ]
            )
            flat = F.normalize(flat, dim=1)
            sims.append(flat @ flat.T)
    return torch.stack(sims).mean(0)


def merge_experts(model: nn.Module, threshold: float) -> list[tuple[int, int]]:
    """Merge pairs of experts whose ``expert_similarity`` is at least ``threshold``, most similar
    first, each expert at most once per call (rule: ``_merged_pair``; router rows averaged; the
    task becomes 'a+b'), under expert parallelism a multiple of ``ep_size`` pairs (the least
    similar wait). The merged expert takes the lower id's place. Returns the merged pairs (old ids)."""
    layers = _layers(model)
    ep_size = _ep_size(layers)
    with _unsharded(layers):  # once, for the similarity and the rebuild
        sim = expert_similarity(model)
        pairs = _most_similar_pairs(sim, threshold)
        pairs = pairs[: len(pairs) - len(pairs) % ep_size]
        n = sim.shape[0]
        if pairs and n - len(pairs) < model.moe_peft_config.top_k:
            raise ConfigError(
                f"merging {len(pairs)} pairs would leave {n - len(pairs)} experts, fewer than "
                f"top_k={model.moe_peft_config.top_k}; raise the merge threshold"
            )
        if pairs:
            partner = dict(pairs)
            tasks = task_of_experts(model)
            plan = [[e, partner[e]] if e in partner else [e] for e in range(n) if e not in partner.values()]
            _rebuild(model, plan, ["+".join(dict.fromkeys(tasks[e] for e in sources)) for sources in plan])
    return pairs


def _most_similar_pairs(sim: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, with similarity at least ``threshold``, most similar first, each expert once."""
    pairs, used = [], set()
    candidates = sorted(
        ((float(sim[i, j]), i, j) for i in range(len(sim)) for j in range(i + 1, len(sim))), reverse=True
    )
    for value, i, j in candidates:
        if value >= threshold and i not in used and j not in used:
            pairs.append((i, j))
            used |= {i, j}
    return pairs


# ---------------------------------------------------------------------------------------------
# router protection


@contextmanager
def _router_logits(model: nn.Module):
    """Collects each MixLoRA layer's router logits ``[T, E]`` of the forwards run inside. Those
    forwards add no router losses: the router KL runs one between a training step's forward and
    its backward, whose pooled losses must stay those of the training batch."""
    captured: list[torch.Tensor] = []
    layers = _layers(model)
    hooks = [layer.adapter.router.register_forward_hook(lambda m, args, out: captured.append(out)) for layer in layers]
    for layer in layers:
        layer.collect_router_losses = False
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.collect_router_losses = True


def _valid(batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return (torch.ones_like(batch["input_ids"]) if mask is None else mask).reshape(-1).bool()


@torch.no_grad()
def router_targets(model: nn.Module, batches: list[dict]) -> list[list[torch.Tensor]]:
    """For each batch, each layer's router distribution over the current experts on its real
    tokens, ``[T_real, E]``: what ``router_kl`` keeps the router close to. Call before growing."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    targets = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with _router_logits(model) as logits:
            model(**batch)
        valid = _valid(batch)
        targets.append([F.softmax(x.float(), dim=-1)[valid] for x in logits])
    model.train(was_training)
    return targets


def router_kl(model: nn.Module, batch: dict, targets: list[torch.Tensor]) -> torch.Tensor:
    """``KL(p_before || p_now)`` of every layer's router on ``batch``'s real tokens, averaged over
    tokens and layers. ``p_before`` covers the experts that existed then; the mass the router now
    puts on newer experts counts against it (``log p_now`` of the old experts falls)."""
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with _router_logits(model) as logits:
        model(**batch)
    valid = _valid(batch)
    terms = []
    for x, p in zip(logits, targets):
        log_now = F.log_softmax(x.float(), dim=-1)[valid][:, : p.shape[1]]
        terms.append((p * (p.clamp_min(1e-12).log() - log_now)).sum(-1).mean())
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------
# metrics


def continual_metrics(acc: list[list[float]]) -> dict:
    """Metrics of an accuracy matrix ``acc[i][j]``: accuracy on task ``j`` after training task
    ``i`` (``j <= i``; later entries are ignored).

    - ``average_accuracy[i]``: mean of ``acc[i][0..i]``;
    - ``forgetting[j]`` (``j < T-1``): best earlier accuracy ``max_{j<=k<T-1} acc[k][j]`` minus the
      final ``acc[T-1][j]``; ``average_forgetting`` their mean (0 for one task);
    - ``backward_transfer``: mean over ``j < T-1`` of ``acc[T-1][j] - acc[j][j]`` (negative: forgetting).
    """
    T = len(acc)
    if T == 0 or any(len(row) < i + 1 for i, row in enumerate(acc)):
        raise ValueError("acc must have a row per task, row i holding at least i+1 accuracies")
    average = [statistics.mean(acc[i][: i + 1]) for i in range(T)]
    forgetting = [max(acc[k][j] for k in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)]
    bwt = [acc[T - 1][j] - acc[j][j] for j in range(T - 1)]
    return {
        "average_accuracy": average,
        "final_average_accuracy": average[-1],
        "forgetting": forgetting,
        "average_forgetting": statistics.mean(forgetting) if forgetting else 0.0,
        "backward_transfer": statistics.mean(bwt) if bwt else 0.0,
    }


def adapter_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total adapter parameters (LoRA, DoRA magnitudes, routers) of ``model``, the
    experts of every expert-parallel rank included (every rank of the group calls this then)."""
    from .dispatch import expert_parallel_group

    params = {id(p): p for n, p in model.named_parameters() if any(k in n for k in ("lora_", "magnitude", "router"))}
    counts = torch.zeros(2, 2, dtype=torch.long, device=model_device(model))  # [replicated, expert-local]
    for p in params.values():
        local = int(not getattr(p, "allreduce", True))
        counts[local, 0] += p.numel() if p.requires_grad else 0
        counts[local, 1] += p.numel()
    group = expert_parallel_group(model)
    if group is not None:
        dist.all_reduce(counts[1], group=group)
    trainable, total = counts.sum(0).tolist()
    return {"trainable": trainable, "total": total}
