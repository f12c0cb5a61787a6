"""Model loading: a Hugging Face model id or path, or a preset bundled with the package."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from .backends.hf_load import load_local_experts
from .config import ConfigError
from .device import run_device

PRESETS = {
    "tiny-mixtral": "the pretrained 16-expert demo MoE shipped in moe_peft_ds/assets (rebuilt by moe-peft-ds build-demo-model)",
    "tiny-llama": "the pretrained dense demo LLaMA shipped in moe_peft_ds/assets (moe-peft-ds build-demo-model --arch llama)",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model(spec: str) -> str:
    """Path or hub id behind ``--model``; presets map to bundled directories."""
    if spec in PRESETS:
        from .demo import default_dir

        arch = spec.removeprefix("tiny-")
        if not (default_dir(arch) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"preset {spec!r} is missing at {default_dir(arch)}; rebuild it with "
                f"moe-peft-ds build-demo-model --arch {arch}"
            )
        return str(default_dir(arch))
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"--model {spec} does not exist (a local directory was meant)")
    return spec


def load_model(spec: str, dtype: str = "fp32", tokenizer: str | None = None, experts_group=None):
    """``(model, tokenizer)`` for ``--model`` (and ``--tokenizer``, by default the model's own),
    the model on this process's accelerator (``device.run_device``); the hub is only reached for
    ids that are not local.

    With ``experts_group`` (an expert-parallel process group of N ranks) every MoE layer is read
    expert-parallel: this rank loads only its E/N experts (``backends.hf_load``) and the layer
    dispatches tokens to the ranks that own their experts from the first forward on."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    tok = load_tokenizer(spec, tokenizer)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one loading bar per job: rank 0's
    if experts_group is not None:
        model = load_local_experts(resolve_model(spec), DTYPES[dtype], experts_group, run_device())
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=DTYPES[dtype]).to(run_device())
    check_tokenizer(model, tok)
    model.config._name_or_path = spec if spec in PRESETS or not Path(spec).exists() else str(Path(spec).resolve())
    return model, tok


def load_tokenizer(spec: str, tokenizer: str | None = None):
    """The tokenizer ``load_model`` pairs with ``--model`` (``--tokenizer`` if given), with a pad
    token; without loading the model."""
    from transformers import AutoTokenizer

    source = resolve_model(tokenizer) if tokenizer else resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except ValueError as err:  # files present but no tokenizer to build from them
        flag = "--tokenizer" if tokenizer else "--model"
        raise ConfigError(
            f"{flag} {tokenizer or spec}: no usable tokenizer there ({str(err).splitlines()[0].strip()}); "
            "pass one with --tokenizer"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer(model, tokenizer) -> None:
    """A tokenizer whose ids the model cannot embed belongs to another model: say so now,
    not as an index error deep in a forward pass."""
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds {embedded}: they do not "
            "belong together (pass the model's own tokenizer)"
        )
