"""Adapters made elsewhere, as adapters of this project: PEFT LoRA adapters and ESFT expert selections.

- ``import_peft``: a PEFT LoRA directory on a transformers MoE model, as PEFT's ``get_peft_model``
  (and Unsloth) save it on transformers 5: ``target_parameters`` on the fused expert tensors (the
  layout ``export`` describes: ``A [E*r, in]`` expert-major, ``B [out, r*E]`` rank-major, nested
  ``base_layer.`` by declaration order) and ordinary LoRA on attention projections and shared
  experts. An expert whose LoRA is exactly zero changes nothing and is left out, so a layer keeps
  only the experts that carry an update (a sieve adapter exported as ``peft`` comes back as it
  was). Modules with a rank or alpha of their own (``rank_pattern`` / ``alpha_pattern``) are padded
  to the largest rank with zeros and their scale folded into B; attention or shared-expert modules
  the PEFT adapter lacks get an adapter that starts as the identity (B = 0). Refused with one
  line: DoRA, LoRA biases, ``modules_to_save``, pickled weights, and LoRA on modules an adapter
  of this project cannot hold (dense MLP layers, embeddings, the LM head).
- ``esft_selection``: the ``expert_config.json`` of deepseek-ai/ESFT (``{"experts": {layer: [ids]},
  "shared_experts": bool, "non_expert_modules": bool}``), as a selection for the sieve
  (``import_esft`` writes it as an untrained sieve adapter whose config ``--selection-file`` reads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .backends.hf import (
    ExpertsLayout,
    attention_modules,
    check_selection,
    check_shared_expert_lora,
    describe_model,
    find_moe_blocks,
    shared_experts,
    weight_out_in,
)
from .checkpoint import write_adapter
from .config import ATTENTION_TARGETS, STANDARD_ATTENTION, AdapterConfig, ConfigError, LoRAConfig
from .export import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, base_name, check_empty_dir, nested_paths, skeleton
from .lora import init_lora_pair

UNSUPPORTED = {  # PEFT config values an adapter of this project cannot hold
    "use_dora": (False, "DoRA on parameters (PEFT's target_parameters has none; ours trains with --use-dora)"),
    "lora_bias": (False, "LoRA biases"),
}


def import_peft(source: str | Path, output_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the PEFT adapter in ``source`` as an adapter of this project in ``output_dir``."""
    cfg, state = read_peft(source)
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{source}/{PEFT_CONFIG} names no base model; pass one (--base-model)")
    out = check_empty_dir(output_dir)
    model = skeleton(base)
    ours, tensors = from_peft(model, cfg, state, source)
    ours.base_model = base_name(base)
    return write_adapter(out, ours, tensors)


def read_peft(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory's config and tensors (keys without ``base_model.model.``), checked."""
    source = Path(source)
    if not (source / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{source} is not a PEFT adapter directory: it has no {PEFT_CONFIG}")
    if not (source / PEFT_WEIGHTS).is_file():
        pickled = (source / "adapter_model.bin").is_file()
        raise ConfigError(
            f"{source} has no {PEFT_WEIGHTS}"
            + (
                "; its adapter_model.bin is a pickle, which is never loaded here: re-save it with safetensors"
                if pickled
                else ""
            )
        )
    try:
        cfg = json.loads((source / PEFT_CONFIG).read_text())
        state = load_file(str(source / PEFT_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise ConfigError(f"{source} is not a readable PEFT adapter: {err}") from None
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{source} is a {cfg.get('peft_type')!r} adapter; only LoRA imports")
    for key, (allowed, what) in UNSUPPORTED.items():
        if cfg.get(key, allowed) != allowed:
            raise ConfigError(f"{source} uses {what}, which an adapter of this project cannot hold")
    if cfg.get("modules_to_save"):
        raise ConfigError(
            f"{source} trains whole modules too (modules_to_save={cfg['modules_to_save']}); not importable"
        )
    return cfg, {k.removeprefix(PREFIX): v for k, v in state.items()}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def from_peft(model: nn.Module, cfg: dict, state: dict, source) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """``(AdapterConfig, tensors)`` of this project for PEFT's ``cfg`` and ``state`` on ``model``."""
    rslora = bool(cfg.get("use_rslora", False))

    def scale_of(module: str, r: int) -> float:
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        return alpha / (r**0.5 if rslora else r)

    pairs = {
        k.removesuffix(".lora_A.weight"): (v, state.get(k.replace(".lora_A.", ".lora_B.")))
        for k, v in state.items()
        if k.endswith(".lora_A.weight")
    }
    stray = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if stray or any(b is None for _, b in pairs.values()):
        raise ConfigError(
            f"{source}: tensors that are not LoRA A/B pairs: {stray[:3] or [m for m, (_, b) in pairs.items() if b is None][:3]}"
        )
    experts, used = _expert_pairs(model, cfg, pairs, scale_of)
    linear = {m: (a, b, scale_of(m, a.shape[0])) for m, (a, b) in pairs.items() if m not in used}
    attention, shared = _place_linear(model, linear, source)
    r = max(
        [a.shape[0] for a, _, _ in linear.values()] + [a.shape[0] for e in experts.values() for a, _, _ in e.values()]
    )
    alpha = float(cfg.get("lora_alpha", 8))
    ours = AdapterConfig(
        method="sieve",
        r=r,
        alpha=alpha,
        use_rslora=rslora,
        attention_targets=[t for t in ATTENTION_TARGETS if t in {m.rsplit(".", 1)[1] for m in attention}],
        shared_expert_lora=bool(shared),
        expert_targets=sorted({t for (_, t) in experts}) or ["gate_up_proj", "down_proj"],
        selection=_selection(experts),
        **{k: v for k, v in describe_model(model).items() if k in ("model_type", "num_experts", "hidden_size")},
    )
    tensors = _our_tensors(model, ours, experts, linear)
    if all(len(ids) == ours.num_experts for ids in ours.selection.values()) and len(ours.selection) == len(
        find_moe_blocks(model)
    ):
        ours.method = "lora"
    return ours, tensors


def _expert_pairs(model, cfg: dict, pairs: dict, scale_of) -> tuple[dict, set]:
    """``{(layer, target): {expert: (A, B, scale)}}`` of the non-zero experts PEFT's
    ``target_parameters`` hold, and the PEFT module paths they came from."""
    targets = cfg.get("target_parameters") or []
    found, used = {}, set()
    for block in find_moe_blocks(model):
        path, module = f"{block.name}.{block.attr}", block.experts
        layout = ExpertsLayout.of(module)
        named = [
            t
            for t in (layout.up, "down_proj")
            if any(f"{path}.{t}" == p or f"{path}.{t}".endswith("." + p) for p in targets)
        ]
        for tensor, peft_path in nested_paths(path, module, named).items():
            if peft_path not in pairs:
                continue
            A, B = pairs[peft_path]
            num, out_f, in_f = weight_out_in(module, tensor, layout.transposed).shape
            r = A.shape[0] // num
            if A.shape != (num * r, in_f) or B.shape != (out_f, r * num):
                raise ConfigError(
                    f"{peft_path} ({tensor}) has LoRA shapes {tuple(A.shape)}, {tuple(B.shape)}; the model's {tensor} is {num} x [{out_f}, {in_f}]"
                )
            A, B = A.reshape(num, r, in_f), B.reshape(out_f, r, num)
            target = "gate_up_proj" if tensor == layout.up else tensor
            experts = {
                e: (A[e], B[:, :, e], scale_of(peft_path, r)) for e in range(num) if A[e].any() and B[:, :, e].any()
            }
            if experts:
                found[(block.layer, target)] = experts
            used.add(peft_path)
    return found, used


def _selection(experts: dict) -> dict[int, list[int]]:
    """Each layer's experts that carry an update in any of its targets."""
    selection: dict[int, set] = {}
    for (layer, _), found in experts.items():
        selection.setdefault(layer, set()).update(found)
    return {layer: sorted(ids) for layer, ids in sorted(selection.items())}


def _linear_modules(model) -> tuple[dict[str, nn.Linear], dict[str, nn.Linear]]:
    """``({path: nn.Linear}, {path: nn.Linear})``: the projections of the attention modules, and
    those of the shared experts: every plain LoRA place an adapter of this project can have."""
    names = {id(m): n for n, m in model.named_modules()}
    attention = {
        f"{names[id(a)]}.{t}": c
        for a in attention_modules(model)
        for t, c in a.named_children()
        if isinstance(c, nn.Linear)
    }
    shared = {
        f"{names[id(s)]}.{n}" if n else names[id(s)]: c
        for b in find_moe_blocks(model)
        for s in shared_experts(b)
        for n, c in s.named_modules()
        if isinstance(c, nn.Linear)
    }
    return attention, shared


def _place_linear(model, linear: dict, source) -> tuple[list[str], list[str]]:
    """Split the plain LoRA modules into attention projections and shared-expert projections;
    anything else cannot be held by an adapter of this project."""
    attention, shared = _linear_modules(model)
    other = sorted(set(linear) - attention.keys() - shared.keys())
    if other:
        raise ConfigError(
            f"{source} has LoRA on {other[:3]}{'...' if len(other) > 3 else ''}, which an adapter of this project "
            "cannot hold (it adapts experts, attention projections and shared experts)"
        )
    return [m for m in linear if m in attention], [m for m in linear if m in shared]


def _our_tensors(model, ours: AdapterConfig, experts: dict, linear: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our checkpoint keys for the imported pairs, padded to ``ours.r``, scale folded into B; the
    modules ours adapts that PEFT did not get identity adapters (B = 0)."""
    r, scale = ours.r, ours.scaling
    g = torch.Generator().manual_seed(seed)  # the identity adapters' A: reproducible

    def pad(a, b, s, shape=None):
        A = torch.zeros(r, a.shape[1], dtype=a.dtype)
        B = torch.zeros(b.shape[0], r, dtype=b.dtype)
        A[: a.shape[0]], B[:, : b.shape[1]] = a, b * (s / scale)
        return A, B

    tensors = {}
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    for layer, ids in ours.selection.items():
        module = blocks[layer].experts
        layout = ExpertsLayout.of(module)
        for target in ours.expert_targets:
            tensor = layout.tensor(target)
            _, out_f, in_f = weight_out_in(module, tensor, layout.transposed).shape
            for e in ids:
                found = experts.get((layer, target), {}).get(e)
                A, B = pad(*found) if found else _identity(r, in_f, out_f, g)
                tensors[f"layers.{layer}.experts.{e}.{tensor}.lora_A"] = A
                tensors[f"layers.{layer}.experts.{e}.{tensor}.lora_B"] = B
    for path, c in _linear_targets(model, ours).items():
        found = linear.get(path)
        A, B = pad(*found) if found else _identity(r, c.in_features, c.out_features, g)
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = A, B
    return tensors


def _identity(r: int, in_f: int, out_f: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = torch.empty(r, in_f), torch.empty(out_f, r)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        init_lora_pair(A, B)
    return A, B


def _linear_targets(model, cfg: AdapterConfig) -> dict[str, nn.Linear]:
    """``{path: nn.Linear}`` of every plain LoRA module ``cfg`` puts on ``model`` (as ``inject_sieve`` does)."""
    attention, shared = _linear_modules(model)
    found = {path: c for path, c in attention.items() if path.rsplit(".", 1)[1] in cfg.attention_targets}
    return {**found, **shared} if cfg.shared_expert_lora else found


def esft_selection(path: str | Path) -> tuple[dict[int, list[int]], bool, bool]:
    """``(selection, shared_experts, non_expert_modules)`` of an ESFT ``expert_config.json``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read ESFT expert config {path}: {err}") from None
    experts = raw.get("experts") if isinstance(raw, dict) else None
    if not isinstance(experts, dict):
        raise ConfigError(f"{path} is not an ESFT expert config: it needs an 'experts' object of layer -> expert ids")
    try:
        selection = {int(layer): sorted({int(e) for e in ids}) for layer, ids in experts.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: 'experts' must map layer numbers to lists of expert ids") from None
    return (
        {k: v for k, v in sorted(selection.items()) if v},
        bool(raw.get("shared_experts")),
        bool(raw.get("non_expert_modules")),
    )


def import_esft(
    path: str | Path, output_dir: str | Path, base_model: str, r: int = 8, alpha: float = 16.0, seed: int = 0
) -> Path:
    """An untrained sieve adapter (B = 0) on ESFT's selected experts of ``base_model``: shared-expert
    LoRA where ESFT trains the shared experts, attention LoRA where it trains the non-expert modules."""
    selection, shared, non_expert = esft_selection(path)
    out = check_empty_dir(output_dir)
    model = skeleton(base_model)
    check_shared_expert_lora(check_selection(model, selection), AdapterConfig(shared_expert_lora=shared))
    attention = (
        [t for t in STANDARD_ATTENTION if any(hasattr(a, t) for a in attention_modules(model))] if non_expert else []
    )
    facts = describe_model(model)
    cfg = AdapterConfig(
        method="sieve",
        r=r,
        alpha=alpha,
        attention_targets=attention,
        shared_expert_lora=shared,
        selection=selection,
        base_model=base_name(base_model),
        model_type=facts["model_type"],
        num_experts=facts["num_experts"],
        hidden_size=facts["hidden_size"],
    )
    return write_adapter(out, cfg, _our_tensors(model, cfg, {}, {}, seed))


def read_selection_file(path: str | Path) -> dict[int, list[int]]:
    """The experts a sieve run trains, from an ESFT ``expert_config.json`` or an ``adapter_config.json``
    of this project (its ``selection``); checked against the model when it is injected."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--selection-file {path}: cannot read it ({err})") from None
    if isinstance(raw, dict) and "method" in raw:
        cfg = LoRAConfig.from_dict(raw, source=str(path))
        if not isinstance(cfg, AdapterConfig):
            raise ConfigError(f"--selection-file {path} is a {cfg.method} adapter's config; it selects no experts")
        selection = cfg.selection
    else:
        selection = esft_selection(path)[0]
    if not selection:
        raise ConfigError(f"--selection-file {path} selects no experts")
    return selection
