"""Loading a transformers MoE model expert-parallel: each rank reads the non-expert weights and
only its own E/N experts of every MoE layer, never the whole model.

transformers (5.x) already knows how to read a slice of a checkpoint tensor: a parameter that is
a ``DTensor`` sharded on dim 0 is filled by reading only the rows this rank owns from the
memory-mapped safetensors shards, and for hub checkpoints that store experts one by one its
weight conversion skips the experts another rank owns before fusing the rest. Its own
expert-parallel mode (``DistributedConfig(ep_size=...)``) cannot be used here: it ties the EP
degree to its tensor/FSDP mesh (DeepSpeed runs EP groups inside a data-parallel world) and
replaces the experts' forward. So this module shards exactly the fused expert tensors by expert
(``Shard(0)``, as transformers' ``grouped_gemm`` rule does) on a mesh of DeepSpeed's
expert-parallel group, between model init (on the meta device) and weight loading, through the
hook transformers calls there (``maybe_distribute_model``), and turns them into plain local
tensors afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from .hf import ExpertParallelExperts, FusedExpertsWithLoRA, expert_tensors, find_moe_blocks, is_fused_experts


def _shard_experts_on_meta(model: nn.Module, mesh) -> int:
    """Make every fused expert tensor of the (meta) ``model`` a DTensor sharded by expert over
    ``mesh`` (what transformers' ``grouped_gemm`` rule does), so that its loader reads only this
    rank's rows; returns how many experts modules were marked."""
    from torch.distributed.tensor import Shard, distribute_tensor

    found = 0
    for module in model.modules():
        if not is_fused_experts(module):
            continue
        num = module.down_proj.shape[0]
        if num % mesh.size():
            raise ConfigError(f"--ep-size {mesh.size()} does not divide the {num} experts per layer of this model")
        for name in expert_tensors(module):
            meta = module._parameters[name]
            module._parameters[name] = nn.Parameter(
                distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None), requires_grad=False
            )
        found += 1
    return found


def _to_local(model: nn.Module, ep_rank: int) -> None:
    """Replace the loaded DTensor expert tensors by plain local parameters and record which global
    experts each module holds (``held``, ``global_experts``)."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
        if not params:
            continue
        for name, p in params.items():
            setattr(module, name, nn.Parameter(p.to_local(), requires_grad=False))
        local = module.down_proj.shape[0]
        module.held = list(range(ep_rank * local, (ep_rank + 1) * local))
        module.global_experts = next(iter(params.values())).shape[0]
        module.num_experts = local


def loading_problem(info: dict, source: str) -> str | None:
    """What keeps the checkpoint from filling the model, in one line (None if nothing): a missing
    tensor, or one whose shape disagrees with the config (for experts stored one by one, also an
    expert missing from the checkpoint). transformers would initialise those at random."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"--model {source}: the checkpoint lacks {', '.join(missing[:3])}{more}"
    if mismatched:
        key, checkpoint, model = mismatched[0]
        return (
            f"--model {source}: checkpoint tensors disagree with the config's shapes ({key}: checkpoint "
            f"{list(checkpoint)}, model {list(model)}; an expert missing from the checkpoint, or another model's config)"
        )
    return None


def load_local_experts(source: str, dtype: torch.dtype, group, device: torch.device) -> nn.Module:
    """The model at ``source`` with every MoE layer holding only this rank's experts of ``group``
    (rank r of N holds global experts ``r*E/N .. (r+1)*E/N - 1``), read from the checkpoint
    without the other ranks' experts ever being loaded; everything else whole."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import AutoConfig, AutoModelForCausalLM, DistributedConfig
    from transformers.models.auto.auto_factory import _get_model_class

    config = AutoConfig.from_pretrained(source)
    mesh = DeviceMesh.from_group(group, device.type)
    model_cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)

    def distribute(cls, model, distributed_config, mesh_manager):
        # Called by from_pretrained after building the model on the meta device, before any weight is read.
        if not _shard_experts_on_meta(model, mesh):
            raise ConfigError(f"--model {source}: no fused experts to load expert-parallel (a dense model?)")
        return model

    # transformers calls this hook only when a distributed_config is given; one of size 1 changes nothing else.
    # The same name and module as the model class: transformers finds a family's checkpoint conversions by them.
    hooks = {"maybe_distribute_model": classmethod(distribute), "__module__": model_cls.__module__}
    loader = type(model_cls.__name__, (model_cls,), hooks)
    try:
        model, info = loader.from_pretrained(
            source,
            dtype=dtype,
            distributed_config=DistributedConfig(),
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as one line, on every rank alike
        )
        problem = loading_problem(info, source)
    except RuntimeError as err:  # transformers' load report raises for tensors its conversion could not fuse
        model, problem = (
            None,
            f"--model {source}: transformers could not load the checkpoint: {str(err).splitlines()[0]}",
        )
    # Each rank read other experts: a problem one rank met must stop all of them.
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    if any(problems):
        raise ConfigError(next(p for p in problems if p))
    model.__class__ = model_cls
    vars(model.config).pop("distributed_config", None)
    _to_local(model, dist.get_rank(group))
    model.to(device)
    for block in find_moe_blocks(model):  # tokens reach the experts through the dispatch from the first forward
        base = block.experts
        local = FusedExpertsWithLoRA(base, [], held=base.held)
        block.experts = ExpertParallelExperts(local, group, base.global_experts, loaded=True)
    return model


@torch.no_grad()
def place_loaded_experts(model: nn.Module, placements: dict[int, list[list[int]]]) -> None:
    """Move the experts of a model loaded expert-parallel (each rank holding a contiguous block)
    to ``placements`` (``{layer: placement}``, redundant slots allowed), before any adapter is added:
    every rank sends each other rank the experts it will hold (an expert with copies to each of them), one all-to-all per expert tensor (at most one layer's
    tensor in flight beside the kept one). Call on every rank of the group."""
    import torch.distributed as dist

    for block in find_moe_blocks(model):
        experts, placement = block.experts, placements.get(block.layer)
        if not isinstance(experts, ExpertParallelExperts) or not experts.loaded:
            raise ValueError("place_loaded_experts takes a model loaded expert-parallel (load_local_experts)")
        if experts.local.adapters:
            raise ValueError("place the experts before adding adapters")
        if placement is None or placement == experts.placement:
            continue
        group, rank = experts.group, dist.get_rank(experts.group)
        base, now = experts.local.base, experts.placement
        # Rows sent: for each destination, the experts I hold now that it will hold (in my order).
        sends = [[e for e in now[rank] if e in wanted] for wanted in placement]
        recvs = [[e for e in held if e in placement[rank]] for held in now]
        arrived = [e for ids in recvs for e in ids]  # grouped by source rank
        order = torch.tensor(sorted(range(len(arrived)), key=arrived.__getitem__), device=base.down_proj.device)
        for name in expert_tensors(base):
            p = getattr(base, name)
            index = torch.tensor([now[rank].index(e) for ids in sends for e in ids], device=p.device)
            out = p.new_empty((len(placement[rank]), *p.shape[1:]))  # more with redundant slots
            dist.all_to_all_single(
                out,
                p.detach().index_select(0, index).contiguous(),
                output_split_sizes=[len(i) for i in recvs],
                input_split_sizes=[len(i) for i in sends],
                group=group,
            )
            setattr(base, name, nn.Parameter(out.index_select(0, order), requires_grad=False))
        base.held = placement[rank]
        block.experts = ExpertParallelExperts(
            FusedExpertsWithLoRA(base, [], held=placement[rank]), group, experts.num_experts, placement, loaded=True
        )
