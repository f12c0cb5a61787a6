"""Adapters in fp32 over a bf16 base by default (``adapter_dtype="float32"``), for the sieve and
MixLoRA alike; ``adapter_dtype="base"`` keeps the base's dtype. A training step, save and load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_mixlora import dense_model
from tiny_models import tiny_model

from moe_peft_ds import (
    AdapterConfig,
    MixLoRAConfig,
    all_experts_selection,
    apply_mixlora,
    apply_sieve_lora,
    load_adapter,
    save_adapter,
)


def sieve(model, adapter_dtype="float32"):
    selection = {layer: experts[:2] for layer, experts in all_experts_selection(model).items()}
    return apply_sieve_lora(
        model,
        selection,
        AdapterConfig(r=4, alpha=8, use_dora=True, attention_targets=["q_proj"], adapter_dtype=adapter_dtype),
    )


def mixlora(model, adapter_dtype="float32"):
    return apply_mixlora(
        model,
        MixLoRAConfig(
            method="mixdora", num_experts=4, r=4, alpha=8, attention_targets=["q_proj"], adapter_dtype=adapter_dtype
        ),
    )


BUILDS = {
    "sieve": (lambda: tiny_model("mixtral").to(torch.bfloat16), sieve),
    "mixlora": (lambda: dense_model().to(torch.bfloat16), mixlora),
}


@pytest.mark.parametrize("method", sorted(BUILDS))
def test_fp32_adapters_on_a_bf16_base_train_save_and_load(method, tmp_path):
    base, inject = BUILDS[method]
    model = inject(base())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for n, p in trainable.items() if "router" not in n)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(1, 97, (2, 12))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)  # the updates join the stream in its dtype
    loss = out.loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in trainable.items() if "lora_B" in n)
    model.eval()
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["adapter_dtype"] == "float32"
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "float32"
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    loaded = load_adapter(base(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(BUILDS))
def test_adapter_dtype_base_keeps_the_base_dtype(method):
    base, inject = BUILDS[method]
    model = inject(base(), adapter_dtype="base")
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if p.requires_grad and "router" not in n)
