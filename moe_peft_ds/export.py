"""Adapters for the places a fine-tuned model is served: vLLM, SGLang, PEFT, or a merged model.

An adapter of this project keys each selected expert by MoE layer and global expert id
(``layers.L.experts.e.gate_up_proj.lora_A``, ``checkpoint``). Other tools key LoRA by a module
path, so every export reads the base model's layout from its config (built on the meta device:
no weight is loaded) and writes a PEFT-style directory (``adapter_config.json`` +
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_{A,B}.weight``):

- ``peft``: PEFT's ``target_parameters`` layout for fused experts, on transformers' module paths.
  One ``ParamWrapper`` per fused tensor holds every expert of the layer: ``lora_A [E*r, in]``
  expert-major (rows ``e*r .. e*r+r-1``) and ``lora_B [out, r*E]`` rank-major (column ``j*E + e``),
  ``in``/``out`` the true input/output sizes whether or not the family stores the tensor
  transposed. Two tensors of one module nest: the one the module declares first is innermost,
  its keys carry one more ``base_layer.`` per targeted tensor declared after it.
  Plain LoRA (attention, shared experts) is PEFT's ordinary LoRA on the same module paths.
- ``vllm``: vLLM's model code loads the hub checkpoint's names and layout, and its LoRA follows
  them, so the export is keyed by the names transformers writes with ``save_pretrained`` (its
  weight-conversion mapping reversed, ``hub_layout``). A family whose checkpoint holds one tensor
  per expert (Mixtral ``block_sparse_moe.experts.E.w1``, Qwen/OLMoE/DeepSeek
  ``mlp.experts.E.gate_proj``) gets one 2D LoRA per expert projection, gate and up cut from the
  fused ``[gate; up]`` rows as the checkpoint cuts them; vLLM packs them per layer and asserts that
  every expert has all three, so experts without adapters (and untargeted projections) are zero.
  A family whose checkpoint holds fused 3D experts (GPT-OSS, Qwen3.5-MoE: vLLM's
  ``is_3d_moe_weight``) gets the 3D layout above under the checkpoint's path, gate/up as
  ``experts.base_layer`` and down as ``experts``, both always present.
- ``sglang``: SGLang's MoE LoRA reads the per-expert 2D keys (``experts.E.<proj>``) of the
  ``vllm`` export; families with fused 3D checkpoints are refused.
- ``merged``: the base model with the adapter folded in, written by ``save_pretrained``.

For the servers the LoRA scaling is folded into ``lora_B`` and written as ``lora_alpha = r``
without rsLoRA: SGLang and older vLLM MoE layers ignore ``use_rslora``. DoRA goes only to
``merged`` (vLLM and PEFT's parameter LoRA have none), MixLoRA nowhere: its FFN is a routed
mixture of LoRA experts, which none of these formats expresses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .backends.hf import ExpertsLayout, find_moe_blocks, weight_out_in
from .checkpoint import _EXPERT, check_compatible, load_adapter, merge_adapter, read_adapter
from .config import AdapterConfig, ConfigError, LoRAConfig
from .models import DTYPES, resolve_model

FORMATS = ("vllm", "sglang", "peft", "merged")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT (0.21) reads a target_modules entry named like an expert projection, on the MoE families
# whose experts transformers 5 fused, as a transformers-4 routed-expert target and moves it onto
# the fused experts at twice the rank. Plain LoRA on modules of these names (shared experts, dense
# MLP layers) is therefore written as target_parameters ``<module>.weight``: the same keys and
# tensors, which PEFT leaves alone.
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def export_adapter(
    adapter: str | Path, fmt: str, output_dir: str | Path, base_model: str | None = None, dtype: str = "fp32"
) -> Path:
    """Write the adapter in ``adapter`` as ``fmt`` (one of ``FORMATS``) to ``output_dir``.

    ``base_model`` (default: the one the adapter records) supplies the module layout, and for
    ``merged`` the weights; ``dtype`` is that of the written tensors. Everything is checked
    before anything is written; ``output_dir`` must not hold anything yet."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    out = check_empty_dir(output_dir)
    cfg, state = read_adapter(adapter)
    check_exportable(cfg, fmt, adapter)
    base = base_model or cfg.base_model
    if not base:
        raise ConfigError(f"{adapter} records no base model; name it (--base-model)")
    model = skeleton(base)
    check_compatible(model, cfg)
    if fmt == "merged":
        return _write_merged(adapter, base, dtype, out)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    if fmt == "peft":
        tensors, targets = peft_state(model, cfg, state)
        config = peft_config(base_name(base), cfg.r, cfg.alpha, cfg.use_rslora, tensors, target_parameters=targets)
    else:
        tensors = serving_state(model, cfg, state, fmt)
        config = peft_config(base_name(base), cfg.r, cfg.r, False, tensors)  # scaling folded into B
    return _write_dir(out, lambda tmp: _write_peft_files(tmp, tensors, config))


def check_empty_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a Path, if it does not exist or is an empty directory; else raise."""
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already holds something; write into a new or empty directory")
    return out


def check_exportable(cfg: LoRAConfig, fmt: str, source) -> None:
    """Raise if ``fmt`` cannot express the adapter in ``source``."""
    if not isinstance(cfg, AdapterConfig):
        raise ConfigError(
            f"{source} holds a {cfg.method} adapter: its FFN is a routed mixture of LoRA experts, which no "
            "export format expresses (expert adapters export: sieve, lora, dora)"
        )
    if cfg.use_dora and fmt != "merged":
        target = "PEFT's parameter LoRA (target_parameters)" if fmt == "peft" else fmt
        raise ConfigError(f"{source} is a DoRA adapter and {target} has no DoRA; export it with --format merged")


def skeleton(base: str) -> nn.Module:
    """The base model built from its config on the meta device: module paths and layouts, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(base))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def base_name(base: str) -> str:
    """What the export records as its base model: a local (or bundled) model by its absolute path."""
    resolved = resolve_model(base)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else base


def expert_adapters(state: dict[str, torch.Tensor]) -> dict[tuple[int, str], dict[int, tuple]]:
    """``{(layer, tensor): {expert: (A [r, in], B [out, r])}}`` of an adapter's expert tensors."""
    found: dict[tuple[int, str], dict[int, tuple]] = {}
    for key in state:
        m = _EXPERT.match(key)
        if m and key.endswith(".lora_A"):
            stem = key.removesuffix(".lora_A")
            found.setdefault((int(m[1]), stem.rsplit(".", 1)[1]), {})[int(m[2])] = (
                state[key],
                state[f"{stem}.lora_B"],
            )
    return found


def linear_adapters(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """``{module path: (A, B)}`` of the plain LoRA layers (attention, shared experts)."""
    return {
        k.removesuffix(".lora_A"): (v, state[k.removesuffix("lora_A") + "lora_B"])
        for k, v in state.items()
        if not _EXPERT.match(k) and k.endswith(".lora_A")
    }


def stacked(adapters: dict[int, tuple], r: int, num: int, out_f: int, in_f: int, scale: float = 1.0):
    """PEFT's (and vLLM's 3D) per-layer tensors: ``A [E*r, in]`` expert-major, ``B [out, r*E]``
    rank-major; experts without an adapter are zero."""
    dtype = next(iter(adapters.values()))[0].dtype
    A, B = torch.zeros(num, r, in_f, dtype=dtype), torch.zeros(out_f, r, num, dtype=dtype)
    for e, (a, b) in adapters.items():
        A[e], B[:, :, e] = a, b * scale
    return A.reshape(num * r, in_f), B.reshape(out_f, r * num)


def _blocks(model: nn.Module) -> dict[int, tuple[str, nn.Module, ExpertsLayout]]:
    return {b.layer: (f"{b.name}.{b.attr}", b.experts, ExpertsLayout.of(b.experts)) for b in find_moe_blocks(model)}


def nested_paths(path: str, experts: nn.Module, tensors: list[str]) -> dict[str, str]:
    """``{tensor: module path of its PEFT ParamWrapper}`` when PEFT targets ``tensors`` of the
    experts module at ``path``: the tensor declared first is wrapped first, innermost."""
    targeted = [t for t, _ in experts.named_parameters(recurse=False) if t in tensors]
    return {t: path + ".base_layer" * (len(targeted) - 1 - i) for i, t in enumerate(targeted)}


def peft_state(model: nn.Module, cfg: AdapterConfig, state: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapter under PEFT's keys (module docstring) and its ``target_parameters``."""
    linear = linear_adapters(state)
    out = {f"{PREFIX}{path}.lora_{n}.weight": t for path, ab in linear.items() for n, t in zip("AB", ab)}
    blocks, targets = _blocks(model), [f"{p}.weight" for p in linear if p.rsplit(".", 1)[-1] in EXPERT_NAMES]
    for (layer, tensor), adapters in expert_adapters(state).items():
        path, experts, layout = blocks[layer]
        module = nested_paths(path, experts, layout.tensors(cfg))[tensor]
        A, B = stacked(adapters, cfg.r, *weight_out_in(experts, tensor, layout.transposed).shape)
        out[f"{PREFIX}{module}.lora_A.weight"], out[f"{PREFIX}{module}.lora_B.weight"] = A, B
        targets.append(f"{path}.{tensor}")
    return out, sorted(targets)


@dataclass
class HubTensor:
    """Where a checkpoint (``save_pretrained``) puts the rows of one fused expert tensor."""

    key: str  # the checkpoint key, e.g. model.layers.0.block_sparse_moe.experts.3.w1.weight
    expert: int | None  # the expert it holds; None: all of them, stacked on dim 0 (a fused 3D tensor)
    rows: torch.Tensor  # the fused tensor's output rows it holds, in its order


def hub_layout(model: nn.Module, tensors: dict[str, tuple[int, int]]) -> dict[str, list[HubTensor]]:
    """``{module tensor: [HubTensor]}`` for module tensors ``{path: (experts or 0, out)}`` (0: a 2D
    weight), learnt from transformers' own reversal of its checkpoint conversion: a probe whose
    values encode (expert, output row, input column) goes through ``revert_weight_conversion``
    and is read back wherever it lands. The input size is 2 whatever the real one (conversions
    split and stack experts and output rows, never inputs), so the probe stays small."""
    from transformers.core_model_loading import revert_weight_conversion

    probes, starts, start = {}, {}, 0
    for name, (num, out_f) in tensors.items():  # each probe's codes from its own start: found by value
        size = max(num, 1) * out_f * 2
        codes = torch.arange(start, start + size, dtype=torch.float64).reshape(max(num, 1), out_f, 2)
        probes[name], starts[name], start = (codes if num else codes[0]), start, start + size
    found: dict[str, list[HubTensor]] = {name: [] for name in tensors}
    for key, t in revert_weight_conversion(model, dict(probes)).items():
        name = max((n for n in tensors if starts[n] <= t.min()), key=starts.get)
        found[name].append(_decode(key, t - starts[name], *tensors[name][::-1]))
    return found


def _decode(key: str, t: torch.Tensor, out_f: int, num: int) -> HubTensor:
    """Read a converted probe: which expert, which output rows, whether it was transposed."""
    code = t.long()
    if code.shape[-1] != 2 or not torch.equal(code[..., 1] - code[..., 0], torch.ones_like(code[..., 0])):
        code = code.transpose(-1, -2)  # stored [in, out]
    if code.shape[-1] != 2:
        raise ConfigError(f"checkpoint tensor {key} splits expert inputs; no export layout for it")
    expert, rows = code[..., 0] // (2 * out_f), code[..., 0] // 2 % out_f
    if code.dim() == 3 and num:
        if not torch.equal(expert[:, 0], torch.arange(num)) or not (rows == rows[:1]).all():
            raise ConfigError(f"checkpoint tensor {key} mixes experts; no export layout for it")
        return HubTensor(key, None, rows[0])
    if not (expert == expert[0]).all():
        raise ConfigError(f"checkpoint tensor {key} mixes experts; no export layout for it")
    return HubTensor(key, int(expert[0]) if num else None, rows)


def serving_state(model: nn.Module, cfg: AdapterConfig, state: dict, fmt: str) -> dict[str, torch.Tensor]:
    """The adapter under the checkpoint's names for vLLM / SGLang (module docstring), scaling folded in."""
    out = {}
    linear = linear_adapters(state)
    names = {f"{p}.weight": (0, b.shape[0]) for p, (_, b) in linear.items()}
    for probe_key, [hub] in hub_layout(model, names).items() if names else []:
        (a, b), module = linear[probe_key.removesuffix(".weight")], hub.key.removesuffix(".weight")
        out[f"{PREFIX}{module}.lora_A.weight"], out[f"{PREFIX}{module}.lora_B.weight"] = a, b[hub.rows] * cfg.scaling
    experts = expert_adapters(state)
    blocks = _blocks(model)
    dtype = next(iter(state.values())).dtype  # the export's (every tensor was cast to it)
    for layer in sorted({layer for layer, _ in experts}):
        out.update(_serving_experts(model, cfg, blocks[layer], layer, experts, fmt, dtype))
    return out


def _serving_experts(model, cfg: AdapterConfig, block, layer: int, experts: dict, fmt: str, dtype) -> dict:
    """One MoE layer's experts for a server: every expert and every projection present."""
    path, module, layout = block
    shapes = {t: weight_out_in(module, t, layout.transposed).shape for t in (layout.up, "down_proj")}
    hub = hub_layout(model, {f"{path}.{t}": (s[0], s[1]) for t, s in shapes.items()})
    out = {}
    for t, (num, out_f, in_f) in shapes.items():
        adapters = experts.get((layer, t), {})
        zero = (torch.zeros(cfg.r, in_f, dtype=dtype), torch.zeros(out_f, cfg.r, dtype=dtype))
        full = {e: adapters.get(e, zero) for e in range(num)}
        for h in hub[f"{path}.{t}"]:
            if h.expert is not None:
                a, b = full[h.expert]
                module_key = h.key.removesuffix(".weight")
                out[f"{PREFIX}{module_key}.lora_A.weight"] = a
                out[f"{PREFIX}{module_key}.lora_B.weight"] = (b[h.rows] * cfg.scaling).to(a.dtype)
            elif fmt == "sglang":
                raise ConfigError(
                    f"{model.config.model_type}'s checkpoint holds its experts fused ({h.key}); SGLang's MoE "
                    "LoRA reads one tensor per expert: export it with --format vllm or peft"
                )
            else:
                A, B = stacked(full, cfg.r, num, out_f, in_f, cfg.scaling)
                experts_path = h.key.rsplit(".", 1)[0] + (".base_layer" if t == layout.up else "")
                B = B.reshape(out_f, -1)[h.rows]
                out[f"{PREFIX}{experts_path}.lora_A.weight"], out[f"{PREFIX}{experts_path}.lora_B.weight"] = A, B
    return out


def peft_config(base: str, r: int, alpha: float, rslora: bool, tensors: dict, **extra) -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter holding ``tensors``: its modules are the
    2D ones (module paths without the ``experts`` of fused 3D layers, which ``target_parameters`` name)."""
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0].removesuffix(".base_layer") for k in tensors})
    if "target_parameters" in extra:
        fused = {t.rsplit(".", 1)[0] for t in extra["target_parameters"]}
        modules = [m for m in modules if m not in fused]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "target_modules": modules,
        **extra,
    }


def _write_peft_files(tmp: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    save_file(
        {k: v.clone().contiguous() for k, v in tensors.items()}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"}
    )
    (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_dir(out: Path, write) -> Path:
    """``write`` fills a temporary directory beside ``out``, which then takes ``out``'s place: a
    failure or a kill midway leaves no half-written export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty: checked before anything was written
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_merged(adapter, base: str, dtype: str, out: Path) -> Path:
    """The base with the adapter folded in, saved by ``save_pretrained`` (with the base's tokenizer,
    where it has one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(base)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    merge_adapter(load_adapter(model, adapter))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # a base without tokenizer files: the merged model has none either
        tokenizer = None

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _write_dir(out, write)


__all__ = ["FORMATS", "export_adapter"]
