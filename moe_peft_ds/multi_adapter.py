"""Several MixLoRA adapters on one frozen base, trained in one batch.

Each adapter is built by the ordinary single-adapter injection (``apply_mixlora``) over the
*same* frozen base modules, and every place that carries an adapter becomes a
``MultiAdapter`` that holds each adapter's module there (or the bare base module where an
adapter has none). A batch holds samples of several adapters; ``adapter_names`` (one per
sample) says whose each sample is. Embeddings, norms, the LM head and every frozen weight
exist once and run once per token; at an adapted module the samples are split by adapter,
so each sample only sees its own adapter's LoRA, router and experts.

Training (``train.train_multi_adapter``) gives each adapter its own loss (per token of its
own samples), optimizer, schedule and clipping norm, so each adapter learns exactly what it
would learn alone on the same samples; ``save_adapter(model, dir, adapter=name)`` writes one.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRALinear
from .mixlora import MixLoRAFFN, apply_mixlora
from .modules import replace_module

ADAPTER_TYPES = (LoRALinear, MixLoRAFFN)


class MultiAdapter(nn.Module):
    """Stands where a single-adapter module stood. ``adapters[name]`` is adapter ``name``'s
    module here (a ``LoRALinear``/``MixLoRAFFN`` over ``base``, or ``base`` itself)."""

    def __init__(self, base: nn.Module, modules: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(modules)
        self.sample_adapters: list[str] | None = None  # set per forward by the model's hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.sample_adapters
        if names is None:
            raise ValueError(
                f"this model carries adapters {list(self.adapters)}: pass adapter_names=[...] with one "
                "name per sample to its forward"
            )
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} samples")
        groups = sample_groups(names, x.device)
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
    known = set(model.moe_peft_configs)
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise ValueError(f"adapter_names has {unknown}, which this model does not carry; it carries {sorted(known)}")
    for module in model.modules():
        if isinstance(module, MultiAdapter):
            module.sample_adapters = list(names) if names is not None else None
    return args, kwargs


def adapter_sites(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """``{path: {adapter: module}}`` of every adapted place in ``model``, multi-adapter or not."""
    sites, inside = {}, []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, MultiAdapter):
            sites[path] = dict(module.adapters.items())
            inside.append(path)
        elif isinstance(module, ADAPTER_TYPES):
            sites[path] = {adapter_name(model): module}
    return sites


def adapter_name(model: nn.Module) -> str:
    """The name of the first (or only) adapter of ``model``."""
    return getattr(model, "moe_peft_adapter_name", "default")


def add_adapter(model: nn.Module, name: str, cfg) -> nn.Module:
    """Add MixLoRA adapter ``name`` (config ``cfg``) next to the adapters ``model`` carries.

    The first adapter keeps its name, ``model.moe_peft_adapter_name`` (``"default"`` unless
    set). All adapters share the frozen base modules; nothing is copied."""
    configs = getattr(model, "moe_peft_configs", None) or {adapter_name(model): model.moe_peft_config}
    if name in configs:
        raise ValueError(f"the model carries an adapter named {name!r} already")
    if not name or not isinstance(name, str):
        raise ValueError(f"adapter name {name!r} must be a non-empty string")
    sites = adapter_sites(model)
    bases = {path: next(iter(mods.values())).base for path, mods in sites.items()}
    first_cfg, first_hook = model.moe_peft_config, getattr(model, "_mixlora_mask_hook", None)
    for path, base in bases.items():  # the bare base model, to inject the new adapter the usual way
        replace_module(model, path, base)
    model.moe_peft_config = None
    if first_hook is not None:
        first_hook.remove()
    apply_mixlora(model, cfg)
    new = adapter_sites(model)
    for path in sorted(set(sites) | set(new)):
        base = bases.get(path) or new[path][adapter_name(model)].base
        modules = {n: sites.get(path, {}).get(n, base) for n in configs}
        modules[name] = new.get(path, {}).get(adapter_name(model), base)
        replace_module(model, path, MultiAdapter(base, modules))
    model.moe_peft_config = first_cfg
    model.moe_peft_configs = {**configs, name: cfg}
    if getattr(model, "_adapter_names_hook", None) is None:
        model._adapter_names_hook = model.register_forward_pre_hook(
            _set_sample_adapters, with_kwargs=True, prepend=True
        )
    return model


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
        if isinstance(module, MultiAdapter) and name in module.adapters:
            del module.adapters[name]
    del configs[name]
