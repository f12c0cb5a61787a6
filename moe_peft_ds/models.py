"""Model loading: a Hugging Face model id or path, or a preset bundled with the package."""
from __future__ import annotations

from pathlib import Path

import torch

PRESETS = {"tiny-mixtral": "the pretrained 16-expert demo MoE shipped in moe_peft_ds/assets (see launch/build_demo_model.py)"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model(spec: str) -> str:
    """Path or hub id behind ``--model``; presets map to bundled directories."""
    if spec in PRESETS:
        from .demo import DEMO_MODEL_DIR

        if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(f"preset {spec!r} is missing at {DEMO_MODEL_DIR}; rebuild it with launch/build_demo_model.py")
        return str(DEMO_MODEL_DIR)
    return spec


def load_model(spec: str, dtype: str = "fp32"):
    """``(model, tokenizer)`` for ``--model``; the hub is only reached for ids that are not local."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.config._name_or_path = spec if spec in PRESETS or not Path(spec).exists() else str(Path(spec).resolve())
    return model, tokenizer
