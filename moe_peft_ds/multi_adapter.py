"""Several adapters on one frozen base: MixLoRA adapters trained in one batch, sieve adapters
served in one batch.

Each adapter is built by the ordinary single-adapter injection (``apply_mixlora``) over the
*same* frozen base modules, and every place that carries an adapter becomes a
``MultiAdapter`` that holds each adapter's module there (or the bare base module where an
adapter has none). A batch holds samples of several adapters; ``adapter_names`` (one per
sample) says whose each sample is. Embeddings, norms, the LM head and every frozen weight
exist once and run once per token; at an adapted module the samples are split by adapter,
so each sample only sees its own adapter's LoRA, router and experts.

Sieve adapters (several ``AdapterConfig`` adapters, e.g. one per task, each on its own experts)
share every MoE layer's frozen experts: ``MultiAdapterExperts`` routes the batch once, runs the
frozen experts once on every routed row, and adds to each row the LoRA of its token's adapter (the
rows of one adapter, still sorted by expert, through that adapter's grouped LoRA GEMMs).
``generate(..., adapter_names=[...])`` serves a batch that mixes them.

Training (``train.train_multi_adapter``) gives each adapter its own loss (per token of its
own samples), optimizer, schedule and clipping norm, so each adapter learns exactly what it
would learn alone on the same samples; ``save_adapter(model, dir, adapter=name)`` writes one.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .backends.hf import ExpertParallelExperts, FusedExpertsWithLoRA
from .config import AdapterConfig, MixLoRAConfig
from .lora import LoRALinear, apply_expert_update
from .mixlora import MixLoRAFFN, apply_mixlora
from .modules import replace_module
from .sieve import apply_sieve_lora

ADAPTER_TYPES = (LoRALinear, MixLoRAFFN, FusedExpertsWithLoRA)


def per_row_names(names: list[str] | None, rows: int, adapters) -> list[str]:
    """``names`` (one per sample) for an input of ``rows`` rows: one per sample, or one per token of a
    sample-major flattened ``[samples * tokens, H]`` input (MoE blocks flatten before their experts)."""
    if names is None:
        raise ValueError(
            f"this model carries adapters {list(adapters)}: pass adapter_names=[...] with one name per sample to its forward"
        )
    if not names or rows % len(names):
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows")
    per = rows // len(names)
    return names if per == 1 else [n for n in names for _ in range(per)]


class MultiAdapter(nn.Module):
    """Stands where a single-adapter module stood. ``adapters[name]`` is adapter ``name``'s
    module here (a ``LoRALinear``/``MixLoRAFFN`` over ``base``, or ``base`` itself)."""

    def __init__(self, base: nn.Module, modules: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(modules)
        self.sample_adapters: list[str] | None = None  # set per forward by the model's hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = sample_groups(per_row_names(self.sample_adapters, x.shape[0], self.adapters), x.device)
        if all(isinstance(samples, slice) for samples in groups.values()):
            # Each adapter's samples side by side, in order (as train_multi_adapter builds its batches):
            # views in, one concatenation out. Nothing is copied per adapter, so backward keeps no
            # second copy of x per adapted module (index-selected inputs would be saved as copies).
            return torch.cat([self._run(self.adapters[name], x, samples) for name, samples in groups.items()])
        out = None
        for name, samples in groups.items():
            y = self._run(self.adapters[name], x, samples)
            out = (y.new_zeros(x.shape[:-1] + y.shape[-1:]) if out is None else out).index_copy(0, samples, y)
        return out

    @staticmethod
    def _run(module: nn.Module, x: torch.Tensor, samples: torch.Tensor | slice) -> torch.Tensor:
        """``module`` on the samples ``samples`` of ``x``, its padding mask cut to them too."""
        if not isinstance(module, MixLoRAFFN) or module.token_mask is None:
            return module(x[samples])
        full = module.token_mask
        module.token_mask = full[samples if isinstance(samples, slice) else samples.to(full.device)]
        try:
            return module(x[samples])
        finally:
            module.token_mask = full


class MultiAdapterExperts(nn.Module):
    """Stands where a sieve adapter's ``FusedExpertsWithLoRA`` stood, called like it; ``adapters[name]``
    is adapter ``name``'s ``FusedExpertsWithLoRA`` over ``base`` (or ``base`` itself: no experts of
    this layer carry that adapter). The frozen experts run once for the whole batch."""

    wraps_experts = True

    def __init__(self, base: nn.Module, modules: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(modules)
        self.frozen = FusedExpertsWithLoRA(base, [])  # the shared base computation, no adapter
        self.sample_adapters: list[str] | None = None

    def forward(self, hidden_states, top_k_index, top_k_weights):
        names = per_row_names(self.sample_adapters, hidden_states.shape[0], self.adapters)
        index = {name: i for i, name in enumerate(self.adapters)}
        token_adapter = torch.tensor([index[n] for n in names], device=hidden_states.device)
        return self.frozen(
            hidden_states, top_k_index, top_k_weights, row_update=lambda t: self._update(token_adapter[t])
        )

    def _update(self, row_adapter: torch.Tensor):
        """The ``update`` of ``FusedExpertsWithLoRA.expert_rows``: each adapter's LoRA on its own rows."""
        groups = [
            (module, rows)
            for i, module in enumerate(self.adapters.values())
            if isinstance(module, FusedExpertsWithLoRA) and len(rows := (row_adapter == i).nonzero().squeeze(1))
        ]

        def update(tensor, y, x, expert_of_row, counts, w):
            for module, rows in groups:
                if tensor in module.adapters:
                    experts = expert_of_row[rows]  # still sorted by expert
                    lora = module.adapters[tensor](x[rows], experts, torch.bincount(experts, minlength=len(counts)), w)
                    y = y.index_copy(0, rows, apply_expert_update(y[rows], *lora))
            return y

        return update


def sample_groups(names: list[str], device) -> dict[str, torch.Tensor | slice]:
    """Sample indices of each adapter, in the order the adapters first appear; a ``slice`` for every
    adapter when each one's samples are contiguous and the adapters come in that order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    if all(idx[-1] - idx[0] == len(idx) - 1 for idx in groups.values()):  # contiguous, and first appearance = order
        return {name: slice(idx[0], idx[-1] + 1) for name, idx in groups.items()}
    return {name: torch.tensor(idx, device=device) for name, idx in groups.items()}


def _set_sample_adapters(model: nn.Module, args, kwargs):
    """Forward pre-hook: take ``adapter_names`` out of the model's kwargs and hand it to every ``MultiAdapter``."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        names = model.__dict__.get("_generating_for")  # set by generate(adapter_names=...) for its forwards
    known = set(model.moe_peft_configs)
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise ValueError(f"adapter_names has {unknown}, which this model does not carry; it carries {sorted(known)}")
    for module in model.modules():
        if isinstance(module, (MultiAdapter, MultiAdapterExperts)):
            module.sample_adapters = list(names) if names is not None else None
    return args, kwargs


def adapter_sites(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """``{path: {adapter: module}}`` of every adapted place in ``model``, multi-adapter or not."""
    sites, inside = {}, []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (MultiAdapter, MultiAdapterExperts)):
            sites[path] = dict(module.adapters.items())
            inside.append(path)
        elif isinstance(module, ADAPTER_TYPES):
            sites[path] = {adapter_name(model): module}
    return sites


def adapter_name(model: nn.Module) -> str:
    """The name of the first (or only) adapter of ``model``."""
    return getattr(model, "moe_peft_adapter_name", "default")


def add_adapter(model: nn.Module, name: str, cfg) -> nn.Module:
    """Add adapter ``name`` (config ``cfg``: MixLoRA, or sieve next to sieve adapters) next to the
    adapters ``model`` carries.

    The first adapter keeps its name, ``model.moe_peft_adapter_name`` (``"default"`` unless
    set). All adapters share the frozen base modules; nothing is copied."""
    configs = getattr(model, "moe_peft_configs", None) or {adapter_name(model): model.moe_peft_config}
    if name in configs:
        raise ValueError(f"the model carries an adapter named {name!r} already")
    if not name or not isinstance(name, str):
        raise ValueError(f"adapter name {name!r} must be a non-empty string")
    kinds = {type(c) for c in configs.values()} | {type(cfg)}
    if kinds - {MixLoRAConfig, AdapterConfig} or len(kinds) > 1:
        raise ValueError(
            f"a {cfg.method} adapter cannot join {sorted({c.method for c in configs.values()})} adapters: "
            "several adapters on one model are all MixLoRA or all sieve/LoRA"
        )
    if any(isinstance(m, ExpertParallelExperts) for m in model.modules()):
        raise ValueError("several adapters on one expert-parallel model are not supported; load a base model whole")
    sites = adapter_sites(model)
    bases = {path: model.get_submodule(path).base for path in sites}  # every site module holds its base
    first_cfg, first_hook = model.moe_peft_config, getattr(model, "_mixlora_mask_hook", None)
    for path, base in bases.items():  # the bare base model, to inject the new adapter the usual way
        replace_module(model, path, base)
    model.moe_peft_config = None
    if first_hook is not None:
        first_hook.remove()
    if isinstance(cfg, MixLoRAConfig):
        apply_mixlora(model, cfg)
    else:
        apply_sieve_lora(model, cfg.selection, cfg)
    new = adapter_sites(model)
    for path in sorted(set(sites) | set(new)):
        base = bases.get(path) or new[path][adapter_name(model)].base
        modules = {n: sites.get(path, {}).get(n, base) for n in configs}
        modules[name] = new.get(path, {}).get(adapter_name(model), base)
        experts = any(isinstance(m, FusedExpertsWithLoRA) for m in modules.values())
        replace_module(model, path, (MultiAdapterExperts if experts else MultiAdapter)(base, modules))
    model.moe_peft_config = first_cfg
    model.moe_peft_configs = {**configs, name: cfg}
    if getattr(model, "_adapter_names_hook", None) is None:
        model._adapter_names_hook = model.register_forward_pre_hook(
            _set_sample_adapters, with_kwargs=True, prepend=True
        )
        if hasattr(model, "generate"):
            model.generate = _generate_with_names(model.generate, model)
    return model


def _generate_with_names(generate, model: nn.Module):
    """``model.generate`` taking ``adapter_names`` (one per prompt; transformers refuses arguments its
    forward does not declare): every forward of the generation gets them, expanded with the batch
    for beams and several returned sequences (transformers repeats each prompt in place)."""

    @functools.wraps(generate)
    def with_names(*args, adapter_names=None, **kwargs):
        model.__dict__["_generating_for"] = list(adapter_names) if adapter_names is not None else None
        try:
            return generate(*args, **kwargs)
        finally:
            model.__dict__.pop("_generating_for", None)

    return with_names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``name``."""
    seen, params = set(), []
    for mods in adapter_sites(model).values():
        module = mods.get(name)
        if isinstance(module, ADAPTER_TYPES):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def drop_adapter(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` out of a model that carries several (its modules are discarded)."""
    configs = getattr(model, "moe_peft_configs", None) or {}
    if name not in configs or len(configs) < 2:
        raise ValueError(f"adapter {name!r} is not one of several adapters of this model ({sorted(configs)})")
    for path, module in model.named_modules():
        if isinstance(module, (MultiAdapter, MultiAdapterExperts)) and name in module.adapters:
            del module.adapters[name]
    del configs[name]
