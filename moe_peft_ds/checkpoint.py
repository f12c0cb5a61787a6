"""Adapter-only checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

Expert adapters are stored one tensor per selected expert, keyed by MoE layer and *global*
expert id (``layers.{L}.experts.{e}.{gate_up_proj|down_proj}.{lora_A|lora_B|magnitude}``),
so the file holds only the adapters that exist and does not depend on how experts are
stacked or sharded in memory. Plain LoRA layers (attention, shared experts) are keyed by
their module path (``model.layers.0.self_attn.q_proj.lora_A``). MixLoRA layers hold
``layers.{L}.mixlora.router.weight`` and ``layers.{L}.mixlora.experts.{e}.{gate_proj|up_proj|down_proj}.{...}``,
each expert's tensors at its own rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .backends import backend_for
from .backends.hf import FusedExpertsWithLoRA
from .backends.megatron import ExpertLinearLoRA, GroupedMLPWithLoRA
from .config import AdapterConfig, ConfigError, LoRAConfig, MixLoRAConfig
from .dispatch import gather_expert_state
from .lora import LoRALinear
from .mixlora import PROJECTIONS, MixLoRAFFN, apply_mixlora, describe_dense, expert_groups
from .modules import layer_index, replace_module
from .multi_adapter import adapter_sites, add_adapter, drop_adapter
from .sieve import apply_sieve_lora
from .state_file import check_finite, tensors_digest

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORA_PARAMS = ("lora_A", "lora_B", "magnitude")
_EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.")


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is loaded onto."""


def adapter_modules(model: nn.Module, adapter: str | None = None):
    """``(name, module)`` of every adapter-carrying module in ``model``; with several adapters
    (``multi_adapter``), those of ``adapter``, under the paths a single adapter would have."""
    if getattr(model, "moe_peft_configs", None):
        if adapter not in model.moe_peft_configs:
            raise ValueError(f"this model carries adapters {sorted(model.moe_peft_configs)}; name one (adapter=...)")
        for name, modules in adapter_sites(model).items():
            if isinstance(modules.get(adapter), (LoRALinear, MixLoRAFFN, FusedExpertsWithLoRA)):
                yield name, modules[adapter]
        return
    for name, module in model.named_modules():
        if isinstance(module, (FusedExpertsWithLoRA, LoRALinear, MixLoRAFFN, ExpertLinearLoRA, GroupedMLPWithLoRA)):
            yield name, module


def adapter_config(model: nn.Module, adapter: str | None = None) -> LoRAConfig:
    """The config of ``model``'s adapter (of adapter ``adapter`` when it carries several)."""
    configs = getattr(model, "moe_peft_configs", None)
    if configs and adapter not in configs:
        raise ValueError(f"this model carries adapters {sorted(configs)}; name one (adapter=...)")
    cfg = configs[adapter] if configs else getattr(model, "moe_peft_config", None)
    if cfg is None:
        raise ValueError(
            "this model carries no moe_peft_ds adapter; inject one first (apply_sieve_lora, apply_mixlora, load_adapter)"
        )
    return cfg


def _expert_backend(model: nn.Module):
    """The backend of a model whose one adapter sits on its experts (the sieve), or None
    (MixLoRA, several adapters: the module walk below)."""
    if isinstance(getattr(model, "moe_peft_config", None), MixLoRAConfig) or getattr(model, "moe_peft_configs", None):
        return None
    return backend_for(model)


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` on this rank under its checkpoint key (see the module docstring)."""
    backend = _expert_backend(model)
    if backend is not None:
        return backend.adapter_state(model)
    state = {}
    for name, module in adapter_modules(model, adapter):
        if isinstance(module, LoRALinear):
            for p in LORA_PARAMS:
                if getattr(module, p) is not None:
                    state[f"{name}.{p}"] = getattr(module, p).detach()
        elif isinstance(module, MixLoRAFFN):
            layer = getattr(module, "layer_index", None)  # Megatron layers know theirs
            state.update(_mixlora_state(layer_index(name) if layer is None else layer, module))
        elif isinstance(module, FusedExpertsWithLoRA):  # one of several sieve adapters
            for tensor, experts in module.adapters.items():
                state.update(experts.expert_state(layer_index(name), tensor))
    return state


def _mixlora_state(layer: int, module: MixLoRAFFN) -> dict[str, torch.Tensor]:
    """One MixLoRA layer's router and experts (views, each expert cut to its own rank)."""
    prefix = f"layers.{layer}.mixlora"
    state = {f"{prefix}.router.weight": module.adapter.router.weight.detach()}
    for proj in PROJECTIONS:
        for lora in expert_groups(module.adapter.lora[proj]):
            for slot, (e, r) in enumerate(zip(lora.expert_ids, lora.ranks)):
                key = f"{prefix}.experts.{e}.{proj}"
                state[f"{key}.lora_A"] = lora.lora_A[slot, :r].detach()
                state[f"{key}.lora_B"] = lora.lora_B[slot, :, :r].detach()
                if lora.magnitude is not None:
                    state[f"{key}.magnitude"] = lora.magnitude[slot].detach()
    return state


def _assign(model: nn.Module, state: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy ``state`` into the adapters of ``model``; keys and shapes must match exactly."""
    own = adapter_state_dict(model, adapter)  # views into the live parameters
    backend = _expert_backend(model)
    held = backend.held_experts(model) if backend is not None else None
    if held is not None:  # under expert parallelism this rank loads only the experts it holds (of its stage)
        state = {k: v for k, v in state.items() if (m := _EXPERT.match(k)) is None or (int(m[1]), int(m[2])) in held}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter tensors do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise AdapterMismatchError(
            f"{len(bad)} adapter tensors have the wrong shape, e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def gathered_adapter_state(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The whole adapter on CPU; under expert parallelism every rank of the group must call
    this, and each gets the experts of all ranks (keys are global, so shards just merge)."""
    backend = _expert_backend(model)
    if backend is not None:
        return backend.gathered_state(model)
    return gather_expert_state(model, lambda m: adapter_state_dict(m, adapter))


def save_adapter(model: nn.Module, output_dir: str | Path, adapter: str | None = None) -> Path:
    """Write the adapter of ``model`` (and only it) to ``output_dir``; a model that carries
    several adapters writes the one named ``adapter``.

    Under ``torch.distributed`` only global rank 0 writes. Expert-parallel models: call on
    every rank; the shards are gathered and rank 0 writes the same files a single process would.
    """
    cfg = adapter_config(model, adapter)
    state = gathered_adapter_state(model, adapter)
    out = Path(output_dir)
    if dist.is_initialized() and dist.get_rank() != 0:  # ranks hold the same adapter (gathered above); one writes
        return out
    return write_adapter(out, cfg, state)


def write_adapter(out: Path, cfg: LoRAConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write the two files of an adapter directory, so that a kill never leaves a mixed pair."""
    check_finite(state)
    out.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = out / f".{WEIGHTS_NAME}.tmp", out / f".{CONFIG_NAME}.tmp"
    try:
        dtypes = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}))
        meta = {"format": "pt", "library": "moe_peft_ds", "dtype": dtypes, "sha256": tensors_digest(state)}
        save_file(state, str(weights_tmp), metadata=meta)
        cfg.to_json(config_tmp)
    except BaseException:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
        raise
    # The config goes first and comes back last: a kill in between leaves no loadable
    # adapter (load_adapter needs both files), never old config with new weights.
    (out / CONFIG_NAME).unlink(missing_ok=True)
    os.replace(weights_tmp, out / WEIGHTS_NAME)
    os.replace(config_tmp, out / CONFIG_NAME)
    return out


def convert_adapter(path: str | Path, output_dir: str | Path, model_type: str, base_model: str = "") -> Path:
    """Rewrite a sieve adapter for the other framework: Megatron-core (``model_type="megatron"``)
    from a transformers one, or a transformers MoE family (``"mixtral"``, ...) from a Megatron one.

    Both store expert ``e`` of layer ``L`` as ``layers.L.experts.e.{gate_up_proj|down_proj}``
    in ``[out, in]`` orientation, Megatron's ``linear_fc1`` being ``[gate; up]`` like the fused
    tensor of the Mixtral-style families, so only the config changes. Families laid out
    otherwise (GPT-OSS: transposed, interleaved, biased), adapters with LoRA outside the routed
    experts (attention, shared experts) and MixLoRA adapters are refused.
    """
    from .backends.hf_families import discover_families, megatron_compatible
    from .config import AdapterConfig

    cfg, state = read_adapter(path)
    if (Path(output_dir) / CONFIG_NAME).exists():  # never overwrite an adapter, the one converted least of all
        raise AdapterMismatchError(f"{output_dir} already holds an adapter; choose another output directory")
    if not isinstance(cfg, AdapterConfig):
        raise AdapterMismatchError(
            f"{path} holds a {cfg.method} adapter; only expert (sieve/lora/dora) adapters convert"
        )
    hf_type = model_type if cfg.model_type == "megatron" else cfg.model_type
    if (cfg.model_type == "megatron") == (model_type == "megatron"):
        raise AdapterMismatchError(
            f"{path} is a {cfg.model_type!r} adapter; convert it to 'megatron' or from 'megatron' to a transformers family"
        )
    layouts = [f.model_type for f in discover_families() if megatron_compatible(f)]
    if hf_type not in layouts:
        raise AdapterMismatchError(
            f"model_type {hf_type!r} has no Megatron counterpart here; Mixtral-style families: {layouts}"
        )
    other = sorted(k for k in state if not _EXPERT.match(k))
    if other:
        raise AdapterMismatchError(
            f"{path} has LoRA outside the routed experts ({other[:3]}...), which Megatron's expert backend does not hold"
        )
    cfg.model_type, cfg.base_model = model_type, base_model or cfg.base_model
    return write_adapter(Path(output_dir), cfg, state)


_MIXLORA_EXPERT = re.compile(r"mixlora\.experts\.(\d+)\.")


def check_header(path: Path, cfg: LoRAConfig, shapes: dict[str, list[int]]) -> None:
    """The tensor shapes of an adapter file's header against its config: a rank or a selection the
    tensors do not have (a config edited, or taken from another adapter) is refused before a
    module of that size is allocated."""
    for key, shape in shapes.items():
        found = _MIXLORA_EXPERT.search(key)
        r = cfg.rank_of(int(found.group(1))) if found else cfg.r
        dim = {"lora_A": 0, "lora_B": -1}.get(key.rsplit(".", 1)[-1])
        if dim is not None and (len(shape) != 2 or shape[dim] != r):
            raise AdapterMismatchError(
                f"{path}: {key} has shape {shape} but {CONFIG_NAME} says r={r}: the two files do not belong together"
            )
    if isinstance(cfg, AdapterConfig):
        stored = {(int(layer), int(e)) for layer, e in (_EXPERT.match(k).groups() for k in shapes if _EXPERT.match(k))}
        named = {(layer, e) for layer, ids in cfg.selection.items() for e in ids}
        if stored != named:
            raise AdapterMismatchError(
                f"{path}: {CONFIG_NAME} selects (layer, expert) {sorted(named - stored)} that "
                f"{WEIGHTS_NAME} lacks, and it holds {sorted(stored - named)} that the config does not select"
            )


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory without touching any model."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg = LoRAConfig.from_json(path / CONFIG_NAME)  # AdapterConfig or MixLoRAConfig, by its method
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            recorded = (f.metadata() or {}).get("sha256")  # adapters written before checksums have none
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterMismatchError(f"{path / WEIGHTS_NAME} is corrupt or truncated: {err}") from err
    check_header(path, cfg, shapes)  # before any module of the config's size is allocated
    if recorded is not None and recorded != tensors_digest(state):
        raise AdapterMismatchError(
            f"{path / WEIGHTS_NAME} is corrupt: its tensors do not match the checksum written with them"
        )
    return cfg, state


def check_compatible(model: nn.Module, cfg: LoRAConfig) -> None:
    """Raise if the adapter was made for another architecture, width or expert count."""
    if isinstance(cfg, MixLoRAConfig):
        for key, value in describe_dense(model).items():
            if getattr(cfg, key) != value:
                raise AdapterMismatchError(
                    f"adapter was made for {key}={getattr(cfg, key)!r}, but the model has {key}={value!r}"
                )
        return
    info = backend_for(model).describe(model)
    for key in ("model_type", "num_experts", "hidden_size"):
        if getattr(cfg, key) != info[key]:
            raise AdapterMismatchError(
                f"adapter was made for {key}={getattr(cfg, key)!r}, but the model has {key}={info[key]!r}"
            )
    if info.get("stage_layers_only"):  # under pipeline parallelism the other stages hold the other layers
        return
    extra = sorted(set(cfg.selection) - set(info["moe_layers"]))
    if extra:
        raise AdapterMismatchError(
            f"adapter has layers {extra} that are not MoE layers of this model ({info['moe_layers']})"
        )


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> nn.Module:
    """Inject the adapter saved in ``path`` into a fresh base ``model`` and load its weights.

    With ``adapter_name``, an adapter may also join the adapters ``model`` carries already, under
    that name (MixLoRA next to MixLoRA, sieve next to sieve: ``multi_adapter``). On any mismatch
    the model is left exactly as it was.
    """
    cfg, state = read_adapter(path)
    check_compatible(model, cfg)
    if adapter_name is not None and getattr(model, "moe_peft_config", None) is not None:
        add_adapter(model, adapter_name, cfg)
        try:
            _assign(model, state, adapter_name)
        except AdapterMismatchError:
            drop_adapter(model, adapter_name)
            raise
        return model
    if adapter_name is not None:
        model.moe_peft_adapter_name = adapter_name
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if isinstance(cfg, MixLoRAConfig):
        apply_mixlora(model, cfg)
    else:
        apply_sieve_lora(model, cfg.selection, cfg)
    try:
        _assign(model, state)
    except AdapterMismatchError:
        remove_adapter(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Take every adapter out of ``model`` without merging (the base model is restored)."""
    multi = bool(getattr(model, "moe_peft_configs", None))
    for name, _ in list(adapter_sites(model).items() if multi else adapter_modules(model)):
        module = model.get_submodule(name)
        replace_module(model, name, module.unwrapped() if hasattr(module, "unwrapped") else module.base)
    for hook in ("_mixlora_mask_hook", "_mixlora_pass_hook", "_adapter_names_hook", "_megatron_grad_hooks"):
        if getattr(model, hook, None) is not None:
            getattr(model, hook).remove()
            delattr(model, hook)
    model.__dict__.pop("generate", None)  # multi_adapter's generate taking adapter_names
    model.moe_peft_config = model.moe_peft_configs = None
    return model


@torch.no_grad()
def merge_adapter(model: nn.Module, attention_only: bool = False) -> nn.Module:
    """Fold every adapter into the base weights; the result is a plain transformers model
    that ``save_pretrained`` writes with its original keys.

    A MixLoRA mixture is routed per token and cannot be folded into one FFN: it is refused,
    unless ``attention_only``, which folds the attention LoRA and keeps the mixture."""
    cfg = getattr(model, "moe_peft_config", None)
    if cfg is None:
        raise ValueError("this model carries no moe_peft_ds adapter to merge")
    if isinstance(cfg, MixLoRAConfig) and not attention_only:
        raise ValueError(
            f"a {cfg.method} adapter cannot be merged: its FFN is a routed mixture of experts, not one "
            "weight update. merge_adapter(model, attention_only=True) folds the attention LoRA alone."
        )
    for name, module in list(adapter_modules(model)):
        if isinstance(module, LoRALinear):
            module.base.weight.copy_(module.merged_weight())
            replace_module(model, name, module.base)
        elif not attention_only:
            replace_module(model, name, module.merge_into_base())
    if attention_only and isinstance(cfg, MixLoRAConfig):
        cfg.attention_targets = []
    else:
        model.moe_peft_config = None
    return model


def adapter_nbytes(model: nn.Module) -> int:
    """Bytes of adapter tensors, as stored in the checkpoint."""
    return sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())


__all__ = [
    "save_adapter",
    "load_adapter",
    "convert_adapter",
    "merge_adapter",
    "remove_adapter",
    "read_adapter",
    "AdapterMismatchError",
    "ConfigError",
]
