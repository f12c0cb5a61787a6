"""Hugging Face transformers (5.x) MoE models, found by their experts interface, and adapter injection.

transformers marks every fused experts class with ``use_experts_implementation``, which records
the layout on each instance (``has_gate``, ``is_transposed``, ``has_bias``,
``has_post_expert_norm``, and ``_apply_gate`` for the gated activation), and every MoE block
calls its experts as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. So a
model is supported when it holds such modules: no per-family registry. ``FusedExpertsWithLoRA``
replaces an experts module behind that same call, computes every expert from the frozen fused
tensors, and adds LoRA only for the selected experts on the tokens routed to them. Dense layers
(no experts module) and hybrid stacks (attention / linear attention / SSM layers) need nothing:
only blocks that hold fused experts are touched.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ATTENTION_TARGETS, AdapterConfig, ConfigError
from ..dispatch import ExpertParallelDispatch, copy_expert_slots, gather_expert_state, tag_expert_local
from ..lora import ExpertLoRA, LoRALinear, apply_expert_update, grouped_mm
from ..modules import UnsupportedModelError, layer_index, read_in_forward, wrap_linears
from ..placement import check_placement, contiguous, owned_by, rank_major
from ..routes import Routes
from .hf_replicas import ReplicaAdapters

SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")  # attributes of a block holding shared experts


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused experts module (``use_experts_implementation`` set its flags)."""
    down = getattr(module, "down_proj", None)
    flags = all(hasattr(module, f) for f in ("has_gate", "is_transposed", "has_bias"))
    return flags and isinstance(down, torch.Tensor) and len(full_shape(down)) == 3


def full_shape(t: torch.Tensor) -> torch.Size:
    """A tensor's shape, also while ZeRO-3 holds only this rank's partition of it (``ds_shape``)."""
    return getattr(t, "ds_shape", t.shape)


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its experts, read from its experts-interface flags."""

    up: str  # "gate_up_proj" (gated: ``[gate; up]`` or interleaved, split by ``_apply_gate``) or "up_proj"
    transposed: bool  # tensors stored ``[E, in, out]`` instead of ``[E, out, in]``
    has_bias: bool  # ``<tensor>_bias`` exist
    has_gate: bool  # gated activation ``_apply_gate``; else ``act_fn`` on the up projection
    post_norm: bool  # ``post_expert_norm`` after the down projection

    @classmethod
    def of(cls, experts: nn.Module) -> "ExpertsLayout":
        base = base_experts(experts)
        return cls(
            "gate_up_proj" if base.has_gate else "up_proj",
            bool(base.is_transposed),
            bool(base.has_bias),
            bool(base.has_gate),
            bool(getattr(base, "has_post_expert_norm", False)),
        )

    def tensor(self, target: str) -> str:
        """The module's tensor behind an expert target (``gate_up_proj`` means ``up_proj`` without a gate)."""
        return self.up if target == "gate_up_proj" else target

    def tensors(self, cfg: AdapterConfig) -> list[str]:
        """The module's tensors that ``cfg``'s expert targets put adapters on."""
        return [self.tensor(t) for t in cfg.expert_targets]

    def describe(self) -> str:
        parts = [self.up, "[E, in, out]" if self.transposed else "[E, out, in]"]
        parts += ["bias"] * self.has_bias + ["no gate"] * (not self.has_gate) + ["post-expert norm"] * self.post_norm
        return ", ".join(parts)


@dataclass
class MoEBlock:
    """One MoE block found in a model: its decoder-layer index, its path, and the attribute of
    its experts module."""

    layer: int
    name: str
    module: nn.Module
    attr: str = "experts"
    decoder_layer: nn.Module | None = None  # the ``layers.N`` module holding the block

    @property
    def experts(self) -> nn.Module:
        return getattr(self.module, self.attr)

    @experts.setter
    def experts(self, new: nn.Module) -> None:
        setattr(self.module, self.attr, new)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of ``model`` (a module holding fused experts) in layer order."""
    blocks = []
    for name, module in model.named_modules():
        if getattr(module, "wraps_experts", False):
            continue  # our wrappers hold the experts module; their parent block is the one found
        for attr, child in module.named_children():
            if not is_fused_experts(base_experts(child)):
                continue
            layer = layer_index(f"{name}.{attr}")
            if layer is None:
                raise UnsupportedModelError(f"MoE experts {name}.{attr} are not under a 'layers.N.' path")
            decoder = model.get_submodule(name[: name.index(f"layers.{layer}") + len(f"layers.{layer}")])
            blocks.append(MoEBlock(layer, name, module, attr, decoder))
    if not blocks:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not a supported MoE model: it holds no fused experts module (transformers "
            "marks those with use_experts_implementation); supported: every transformers MoE family with fused experts, "
            "models built from deepspeed.moe.layer.MoE, and Megatron-core MoE layers"
        )
    return sorted(blocks, key=lambda b: b.layer)


def base_experts(experts: nn.Module) -> nn.Module:
    """The frozen fused experts module, however it is wrapped (adapters, several adapters, expert
    parallelism): every wrapper holds what it wraps as ``local`` (expert parallel) or ``base``."""
    while getattr(experts, "wraps_experts", False):
        experts = experts.local if hasattr(experts, "local") else experts.base
    return experts


def num_local_experts(experts: nn.Module) -> int:
    return full_shape(base_experts(experts).down_proj)[0]


def weight_out_in(experts: nn.Module, tensor: str, transposed: bool) -> torch.Tensor:
    """An expert tensor as ``[E, out, in]`` (a view for transposed layouts)."""
    w = getattr(experts, tensor)
    return w.transpose(1, 2) if transposed else w


class FusedExpertsWithLoRA(nn.Module):
    """A fused experts module whose selected experts carry LoRA (or DoRA).

    Called exactly like the module it wraps. Tokens are grouped by expert once per call
    (a stable sort of the flattened top-k assignments); the frozen experts run as one
    grouped GEMM per tensor, as in transformers, and only the rows routed to selected
    experts get the LoRA update (two more grouped GEMMs over the selected experts).
    """

    wraps_experts = True

    def __init__(
        self, base: nn.Module, expert_ids: list[int], cfg: AdapterConfig | None = None, held: list[int] | None = None
    ):
        """``base`` holds the experts ``held`` (global ids, ascending; default all of them, else
        this rank's under expert parallelism); ``expert_ids`` are global ids among those, possibly
        none (a rank without adapters; then ``cfg`` may be None)."""
        super().__init__()
        self.base = base
        self.layout = ExpertsLayout.of(base)
        self.num_experts = base.down_proj.shape[0]  # local experts
        self.held = list(range(self.num_experts)) if held is None else list(held)
        if len(self.held) != self.num_experts:
            raise ValueError(f"held names {len(self.held)} experts; the experts module has {self.num_experts}")
        self.adapters = nn.ModuleDict(
            {
                t: ExpertLoRA(expert_ids, weight_out_in(base, t, self.layout.transposed), cfg, held=self.held)
                for t in self.layout.tensors(cfg)
            }
            if expert_ids
            else {}
        )
        base.requires_grad_(False)
        read_in_forward(self, base.parameters())  # the base tensors are read here, not in base.forward

    @property
    def expert_ids(self) -> list[int]:
        """Global ids of the experts that carry adapters."""
        return next(iter(self.adapters.values())).expert_ids if self.adapters else []

    def _project(
        self, tensor: str, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor, update
    ) -> torch.Tensor:
        """``x [S, in]`` (rows sorted by expert) through each row's expert of ``tensor``, plus the LoRA
        ``update(tensor, y, x, expert_of_row, counts, w)`` adds."""
        w = weight_out_in(self.base, tensor, self.layout.transposed)  # [E, out, in]
        y = grouped_mm(x, w.transpose(1, 2), counts.cumsum(0).to(torch.int32))
        y = update(tensor, y, x, expert_of_row, counts, w)
        if self.layout.has_bias:
            y = y + getattr(self.base, f"{tensor}_bias")[expert_of_row]
        return y

    def own_update(self, tensor: str, y, x, expert_of_row, counts, w) -> torch.Tensor:
        """``y`` plus this module's adapter of ``tensor`` (if it has one) on every row."""
        if tensor not in self.adapters:
            return y
        return apply_expert_update(y, *self.adapters[tensor](x, expert_of_row, counts, w))

    def expert_rows(
        self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor, update=None
    ) -> torch.Tensor:
        """The expert FFN on rows ``x [S, H]`` sorted by (local) expert; ``counts [E]`` rows per expert.
        ``update`` (default ``own_update``) adds the LoRA of each projection."""
        update = update or self.own_update
        h = self._project(self.layout.up, x, expert_of_row, counts, update)
        h = self.base._apply_gate(h) if self.layout.has_gate else self.base.act_fn(h)
        y = self._project("down_proj", h, expert_of_row, counts, update)
        return self.base.post_expert_norm(y) if self.layout.post_norm else y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, row_update=None
    ) -> torch.Tensor:
        """``row_update(token_of_row)``, if given, returns the ``update`` of ``expert_rows`` for the
        batch's rows (several adapters: each row gets the adapter of its token)."""
        # A slot transformers masks (index E) runs on expert 0 with weight 0: every slot then has a
        # row, and how many there are is known without asking the device.
        masked = top_k_index == self.num_experts
        top_k_index, top_k_weights = top_k_index.masked_fill(masked, 0), top_k_weights.masked_fill(masked, 0)
        routes = Routes.of(top_k_index, self.num_experts, rows=top_k_index.numel())
        update = row_update(routes.token) if row_update is not None else None
        rows = self.expert_rows(routes.gather(hidden_states), routes.expert, routes.counts, update)
        return routes.combine(hidden_states, rows, top_k_weights)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Module:
        """Fold every adapter into the fused tensors and return the plain experts module."""
        for tensor, adapter in self.adapters.items():
            w = weight_out_in(self.base, tensor, self.layout.transposed)
            for e in adapter.expert_ids:
                local = self.held.index(e)
                w[local].copy_(adapter.merged_weight(e, w[local]))
        return self.base


class ExpertParallelExperts(ExpertParallelDispatch):
    """The experts of one MoE block under expert parallelism; called like the module it replaces.

    ``local`` computes this rank's experts (global ids ``local.held``) on rows sorted by local
    expert; the dispatch routes rows to and from the owning ranks. ``placement`` holds every
    rank's experts (``placement.contiguous`` unless load-aware), the same on every rank. An expert
    several ranks hold (redundant slots) has its adapter on its owner only; the others fetch it
    every forward (``hf_replicas``).
    """

    wraps_experts = True

    def __init__(
        self,
        local: FusedExpertsWithLoRA,
        group,
        num_experts: int,
        placement: list[list[int]] | None = None,
        loaded: bool = False,
        selected: list[int] | None = None,
        cfg: AdapterConfig | None = None,
    ):
        """``loaded``: built by an expert-parallel load (``hf_load``), whose adapters come later;
        ``shard_moe_blocks`` then only tags them. ``selected``: the layer's experts with adapters
        (global ids; default those ``local`` carries), ``cfg`` their adapter config."""
        ep_size = dist.get_world_size(group)
        placement = placement or contiguous(num_experts, ep_size)
        check_placement(placement, num_experts, ep_size, redundant=True)
        if local.held != placement[dist.get_rank(group)]:
            raise ValueError(f"this rank holds experts {local.held}; the placement gives it {placement}")
        super().__init__(group, num_experts, rank_major(placement), device=local.base.down_proj.device)
        self.placement = placement
        self.local = local
        self.loaded = loaded
        self.plan_replicas(local.expert_ids if selected is None else selected, cfg)

    @property
    def owned(self) -> list[int]:
        """The experts this rank holds whose adapters live here (all it holds, without redundant slots)."""
        return owned_by(self.placement, dist.get_rank(self.group))

    def plan_replicas(self, selected: list[int], cfg: AdapterConfig | None) -> None:
        """Which adapters go to which copies, for the layer's ``selected`` experts (after each change)."""
        base = self.local.base
        layout = ExpertsLayout.of(base)
        tensors = layout.tensors(cfg) if cfg is not None else []
        shapes = {t: tuple(weight_out_in(base, t, layout.transposed).shape[1:]) for t in tensors}
        rank = dist.get_rank(self.group)
        self.replicas = ReplicaAdapters(self.placement, rank, selected, cfg, shapes, base.down_proj.dtype, self.group)
        self.replicas.to(base.down_proj.device)

    def add_adapters(self, expert_ids: list[int], cfg: AdapterConfig) -> None:
        """LoRA on the selected ``expert_ids`` (global, of the whole layer) that this rank owns,
        initialised exactly as ``FusedExpertsWithLoRA`` over the whole layer would be (the same
        random draws, in the same order, on every rank), then cut to the local experts."""
        base, local_ids = self.local.base, self.local.held
        full = whole_layer_lora(base, expert_ids, self.num_experts, cfg)
        owned = self.owned
        held = [e for e in expert_ids if e in owned]
        with no_random_draws(base.down_proj.device):
            self.local = FusedExpertsWithLoRA(base, held, cfg, held=local_ids)
        with torch.no_grad():
            for t, adapter in self.local.adapters.items():
                slots = [full[t].slot[e] for e in held]
                adapter.lora_A.copy_(full[t].lora_A[slots])
                adapter.lora_B.copy_(full[t].lora_B[slots])
        self.plan_replicas(expert_ids, cfg)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return super().forward(hidden_states, top_k_index, top_k_weights, self._expert_rows)

    def _expert_rows(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not self.replicas.active:
            return self.local.expert_rows(x, expert_of_row, counts)
        return self.local.expert_rows(x, expert_of_row, counts, self._replica_update)

    def _replica_update(self, tensor: str, y, x, expert_of_row, counts, w) -> torch.Tensor:
        return self.replicas.update(self.local.adapters, tensor, y, x, expert_of_row, counts, w)


def whole_layer_lora(base: nn.Module, expert_ids: list[int], num_experts: int, cfg: AdapterConfig) -> dict:
    """``{tensor: ExpertLoRA}`` on ``expert_ids`` of a whole layer of ``num_experts`` whose ``base``
    holds only some (one of them stands for all, expanded, never copied): the random draws that
    initialising the whole layer takes, the same on every rank, to cut each rank's slots from.
    Without DoRA: its magnitude draws nothing and is computed where the slots land."""
    layout = ExpertsLayout.of(base)
    whole = dataclasses.replace(cfg, use_dora=False)
    out = {}
    for t in layout.tensors(cfg):
        w = weight_out_in(base, t, layout.transposed)  # [E held, out, in]
        out[t] = ExpertLoRA(expert_ids, w[:1].expand(num_experts, *w.shape[1:]), whole)
    return out


@contextmanager
def no_random_draws(device: torch.device):
    """Restore the random generator of ``device`` (and the CPU's) afterwards: what is built inside
    draws nothing that the rest of the run sees."""
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        yield


def expert_tensors(module: nn.Module) -> list[str]:
    """The per-expert tensors of a fused experts module (weights and biases, experts on dim 0)."""
    num = module.down_proj.shape[0]
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == num]


def _keep_experts(base: nn.Module, held: list[int]) -> None:
    """Keep only the experts ``held`` (indices into its tensors) of a fused experts module; the
    full tensors are released."""
    index = torch.tensor(held, dtype=torch.long, device=base.down_proj.device)
    for name in expert_tensors(base):
        p = getattr(base, name)
        setattr(base, name, nn.Parameter(p.detach().index_select(0, index), requires_grad=False))
    base.num_experts = len(held)


def _shard_block(experts: nn.Module, cfg: AdapterConfig, held: list[int], owned: list[int]) -> FusedExpertsWithLoRA:
    """This rank's share (global ids ``held``) of one block's experts, the adapters of those it
    ``owned`` included (copied, so the initialisation matches the unsharded model exactly)."""
    full = experts if isinstance(experts, FusedExpertsWithLoRA) else None
    base = full.base if full else experts
    local_ids = [e for e in (full.expert_ids if full else []) if e in owned]
    _keep_experts(base, held)
    with no_random_draws(base.down_proj.device):  # as a partial load's adapters: no draw beyond the whole layer's
        local = FusedExpertsWithLoRA(base, local_ids, cfg, held=held)
    for tensor, adapter in local.adapters.items():
        copy_expert_slots(full.adapters[tensor], adapter)
    return local


def shard_moe_blocks(model: nn.Module, cfg: AdapterConfig, group, placements: dict | None = None) -> None:
    """Make every MoE block expert-parallel over ``group``: each rank keeps E/N experts per layer
    (base tensors and adapters), tagged for DeepSpeed; which ones, per layer, ``placements``
    says (``{layer: placement}``; default and missing layers: contiguous by id). A model loaded
    expert-parallel (``hf_load``) holds its experts already: its adapters are only tagged."""
    ep_size, rank = dist.get_world_size(group), dist.get_rank(group)
    placements = placements or {}
    for block in find_moe_blocks(model):
        experts = block.experts
        if isinstance(experts, ExpertParallelExperts):
            if not experts.loaded or experts.group is not group:
                raise ValueError("this model is already expert-parallel")
            wanted = placements.get(block.layer)
            if wanted is not None and wanted != experts.placement:
                raise ValueError(f"layer {block.layer} was loaded with placement {experts.placement}, not {wanted}")
            tag_expert_local(experts.local.parameters(), ep_size)  # loaded expert-parallel: adapters added since
            continue
        num_experts = num_local_experts(experts)
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts per layer cannot be split over ep_size={ep_size}")
        placement = placements.get(block.layer) or contiguous(num_experts, ep_size)
        check_placement(placement, num_experts, ep_size, redundant=True)
        owned = owned_by(placement, rank)
        selected = experts.expert_ids if isinstance(experts, FusedExpertsWithLoRA) else []
        local = _shard_block(experts, cfg, placement[rank], owned)
        # Expert-local, frozen base included: DeepSpeed must neither average these gradients over
        # all ranks nor broadcast rank 0's experts over the others at initialize.
        tag_expert_local(local.parameters(), ep_size)
        block.experts = ExpertParallelExperts(local, group, num_experts, placement, selected=selected, cfg=cfg)


@torch.no_grad()
def _grown(
    local: FusedExpertsWithLoRA, new_ids: list[int], num_experts: int, cfg: AdapterConfig, seed: int, owned: list[int]
):
    """``local`` with adapters on ``new_ids`` (global ids of a layer of ``num_experts``) as well:
    the trained adapters are copied, the new ones initialised from ``seed`` with the draws a whole
    layer's adapters on ``new_ids`` would take, on every rank alike (each keeps those it holds),
    whatever else has drawn from the random generators before. ``owned``: the experts whose
    adapters live in ``local`` (those it holds, but for copies of another rank's)."""
    base = local.base
    with no_random_draws(base.down_proj.device):
        torch.manual_seed(seed)
        fresh = whole_layer_lora(base, new_ids, num_experts, cfg)
    held = [e for e in new_ids if e in owned]
    with no_random_draws(base.down_proj.device):
        grown = FusedExpertsWithLoRA(base, sorted(set(local.expert_ids) | set(held)), cfg, held=local.held)
    for t, adapter in grown.adapters.items():
        for e, slot in adapter.slot.items():
            if e in local.expert_ids:
                old = local.adapters[t]
                for name, p in adapter.named_parameters():
                    p[slot].copy_(getattr(old, name)[old.slot[e]])
            else:  # a DoRA magnitude stays as computed (||W|| while B = 0)
                adapter.lora_A[slot].copy_(fresh[t].lora_A[fresh[t].slot[e]])
                adapter.lora_B[slot].copy_(fresh[t].lora_B[fresh[t].slot[e]])
    return grown


def grow_expert_adapters(model: nn.Module, experts: dict[int, list[int]], cfg: AdapterConfig, seed: int = 0) -> None:
    """Add adapters on ``experts`` (``{layer: global ids}``, not yet selected) of a sieve model,
    keeping the trained ones, expert-parallel or not, the new ones drawn from ``seed`` (and the
    layer); ``cfg.selection`` grows with them. The optimizer must be built again afterwards."""
    blocks = {b.layer: b for b in check_selection(model, experts)}
    for layer, ids in experts.items():
        block = blocks[layer]
        wrapper = block.experts
        parallel = isinstance(wrapper, ExpertParallelExperts)
        local = wrapper.local if parallel else wrapper
        if not isinstance(local, FusedExpertsWithLoRA):
            raise ValueError(f"layer {layer} carries no expert adapters to grow")
        total = wrapper.num_experts if parallel else local.num_experts
        new = [e for e in ids if e not in cfg.selection.get(layer, [])]
        owned = wrapper.owned if parallel else local.held
        grown = _grown(local, new, total, cfg, seed * 1000 + layer, owned)
        cfg.selection[layer] = sorted(set(cfg.selection.get(layer, [])) | set(ids))
        if parallel:
            tag_expert_local(grown.parameters(), wrapper.ep_size)
            wrapper.local = grown
            wrapper.plan_replicas(cfg.selection[layer], cfg)
        else:
            block.experts = grown


def adapter_flops_share(model: nn.Module, cfg: AdapterConfig) -> float:
    """The LoRA GEMMs' FLOPs per routed row of an expert with an adapter, over its frozen GEMMs'
    (``r * (in + out)`` against ``in * out`` per tensor): the extra work a selected expert's rows cost."""
    experts = base_experts(find_moe_blocks(model)[0].experts)
    layout = ExpertsLayout.of(experts)
    shapes = {t: weight_out_in(experts, t, layout.transposed).shape[1:] for t in (layout.up, "down_proj")}
    frozen = sum(o * i for o, i in shapes.values())
    return sum(cfg.r * (o + i) for t, (o, i) in shapes.items() if t in layout.tensors(cfg)) / frozen


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules (softmax, MLA, linear attention) of every decoder layer."""
    return [
        m for n, m in model.named_modules() if layer_index(n) is not None and "attention" in type(m).__name__.lower()
    ]


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the nn.Linear projections the attention modules of ``model`` hold, among ``ATTENTION_TARGETS``."""
    found = {n for m in attention_modules(model) for n, c in m.named_children() if isinstance(c, nn.Linear)}
    return [t for t in ATTENTION_TARGETS if t in found]


def check_attention_targets(model: nn.Module, targets: list[str]) -> None:
    """Raise if ``targets`` names projections this model's attention does not have; changes nothing."""
    missing = sorted(set(targets) - set(attention_projections(model)))
    if missing:
        raise UnsupportedModelError(
            f"attention_targets {missing} are not attention projections of this model; "
            f"it has {attention_projections(model)}"
        )


def inject_attention_lora(model: nn.Module, cfg: AdapterConfig) -> int:
    """Plain LoRA on the attention projections named in ``cfg.attention_targets``."""
    check_attention_targets(model, cfg.attention_targets)
    targets = tuple(cfg.attention_targets)
    return sum(wrap_linears(m, targets, cfg) for m in attention_modules(model))


def shared_experts(block: MoEBlock) -> list[nn.Module]:
    """The shared experts of a block (plain MLPs every token goes through), held by the block or,
    in some families (Granite-MoE-Hybrid), by its decoder layer beside it."""
    holders = [block.module] + ([block.decoder_layer] if block.decoder_layer not in (None, block.module) else [])
    return [
        m for holder in holders for attr in SHARED_EXPERTS if isinstance(m := getattr(holder, attr, None), nn.Module)
    ]


def check_shared_expert_lora(blocks: list[MoEBlock], cfg: AdapterConfig) -> None:
    """Raise if ``cfg`` asks for shared-expert LoRA that this model cannot take; changes nothing."""
    if not getattr(cfg, "shared_expert_lora", False):
        return
    shared = [s for b in blocks for s in shared_experts(b)]
    if not shared:
        raise UnsupportedModelError(
            f"shared_expert_lora: this model's MoE blocks have no shared experts (one of {SHARED_EXPERTS})"
        )
    if not any(isinstance(m, nn.Linear) for s in shared for m in s.modules()):
        raise UnsupportedModelError(
            "shared_expert_lora: this model's shared experts are fused tensors, not nn.Linear "
            "projections; LoRA on them is not supported"
        )


def check_selection(model: nn.Module, selection: dict[int, list[int]]) -> list[MoEBlock]:
    """Raise if ``selection`` names layers or experts the model does not have; changes nothing."""
    blocks = find_moe_blocks(model)
    layers = {b.layer for b in blocks}
    unknown = sorted(set(selection) - layers)
    if unknown:
        raise ConfigError(
            f"selection names layers {unknown} that are not MoE layers of this model; MoE layers: {sorted(layers)}"
        )
    num_experts = describe_model(model)["num_experts"]
    for layer, ids in selection.items():
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ConfigError(f"selection for layer {layer} has expert ids {bad} outside [0, {num_experts})")
    return blocks


def inject_expert_lora(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Wrap the experts of every selected layer; layers with no selected expert stay untouched.
    A model loaded expert-parallel gets the adapters of the experts each rank holds."""
    for block in check_selection(model, selection):
        ids = selection.get(block.layer, [])
        if ids and isinstance(block.experts, ExpertParallelExperts):
            block.experts.add_adapters(sorted(ids), cfg)
        elif ids:
            block.experts = FusedExpertsWithLoRA(block.experts, sorted(ids), cfg)
        if cfg.shared_expert_lora:
            for parent in [m for shared in shared_experts(block) for m in shared.modules()]:
                wrap_linears(parent, None, cfg)


def text_config(model: nn.Module):
    """The config of the language model (the text config of a multimodal one)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def describe_model(model: nn.Module) -> dict:
    """Facts about an MoE model that an adapter must match."""
    blocks = find_moe_blocks(model)
    experts = blocks[0].experts
    # Expert-parallel blocks hold E/N experts; their wrapper knows the global count.
    num_experts = experts.num_experts if hasattr(experts, "local") else num_local_experts(experts)
    return {
        "model_type": model.config.model_type,
        "num_experts": num_experts,
        "hidden_size": text_config(model).hidden_size,
        "moe_layers": [b.layer for b in blocks],
    }


def inject_sieve(model: nn.Module, selection: dict[int, list[int]], cfg: AdapterConfig) -> None:
    """Freeze ``model`` and wrap the selected experts (and the attention / shared-expert LoRA ``cfg``
    asks for); everything is checked before the model changes."""
    check_attention_targets(model, cfg.attention_targets)
    check_shared_expert_lora(check_selection(model, selection), cfg)
    model.requires_grad_(False)
    inject_expert_lora(model, selection, cfg)
    inject_attention_lora(model, cfg)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (views) under their checkpoint keys: experts as
    ``layers.{L}.experts.{global id}.{tensor}.{...}``, attention and shared-expert LoRA by module path."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state.update({f"{name}.{p}": t.detach() for p, t in module.named_parameters(recurse=False)})
        elif isinstance(module, FusedExpertsWithLoRA):
            for tensor, adapter in module.adapters.items():
                state.update(adapter.expert_state(layer_index(name), tensor))
    return state


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter on CPU (every rank of an expert-parallel group must call this)."""
    return gather_expert_state(model, adapter_state)


def held_experts(model: nn.Module) -> None:
    """Every rank holds every expert's adapter when one is loaded (sharding comes after)."""
    return None


def matches(model: nn.Module) -> bool:
    return any(is_fused_experts(m) for m in model.modules())


describe = describe_model
NAME = "transformers"
