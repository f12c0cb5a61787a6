"""The ``vllm`` export read by vLLM's own LoRA code (where vLLM imports: not in CI, which does not
install it; run with vLLM on the path, e.g. ``VLLM_TARGET_DEVICE=cpu PYTHONPATH=<vllm> pytest
tests/test_vllm_export.py``): PEFTHelper accepts the config, LoRAModel loads every module under
the names vLLM expects, and ``pack_moe`` (which asserts every expert is present) packs each layer
into w1/w2/w3 whose products are exactly the merged adapter's change of gate, down and up."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM's loaders pin memory unless told it runs on CPU
lora_model = pytest.importorskip("vllm.lora.lora_model")
from test_export import SIEVE, _adapter, _base, _load  # noqa: E402
from vllm.config.lora import LoRAConfig as VllmLoRAConfig  # noqa: E402
from vllm.lora.lora_weights import PackedLoRALayerWeights  # noqa: E402
from vllm.lora.peft_helper import PEFTHelper  # noqa: E402

from moe_peft_ds import load_adapter, merge_adapter  # noqa: E402
from moe_peft_ds.backends.hf import find_moe_blocks  # noqa: E402
from moe_peft_ds.export import export_adapter  # noqa: E402

# (module path of a layer's experts in vLLM's model, the checkpoint names its FusedMoE loads as w1, w2, w3)
VLLM_EXPERTS = {
    "mixtral": ("block_sparse_moe.experts", ("w1", "w2", "w3")),  # vllm/model_executor/models/mixtral.py
    "qwen2_moe": ("mlp.experts", ("gate_proj", "down_proj", "up_proj")),
    "deepseek_v3": ("mlp.experts", ("gate_proj", "down_proj", "up_proj")),
}


@pytest.mark.parametrize("family", list(VLLM_EXPERTS))
def test_vllm_loads_and_packs_the_export(tmp_path, family):
    base = _base(tmp_path, family)
    adapter, _ = _adapter(tmp_path, family, base, SIEVE)
    export = export_adapter(adapter, "vllm", tmp_path / "vllm")
    helper = PEFTHelper.from_local_dir(str(export), max_position_embeddings=None)
    helper.validate_legal(VllmLoRAConfig(max_lora_rank=8))
    path, (w1, w2, w3) = VLLM_EXPERTS[family]
    plain, merged = _load(base), merge_adapter(load_adapter(_load(base), adapter))
    num = len(find_moe_blocks(plain)[0].experts.down_proj)
    expected = {f"experts.{e}.{w}" for e in range(num) for w in (w1, w2, w3)}
    expected |= {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # attention, shared experts
    lora = lora_model.LoRAModel.from_local_checkpoint(str(export), expected, helper, device="cpu", dtype=torch.float32)

    for block, after in zip(find_moe_blocks(plain), find_moe_blocks(merged)):
        prefix = f"model.layers.{block.layer}.{path}"
        if f"{prefix}.0.{w1}" not in lora.loras:
            assert block.layer not in SIEVE
            continue
        per_expert = [lora.loras[f"{prefix}.{e}.{w}"] for e in range(num) for w in (w1, w2, w3)]
        packed = PackedLoRALayerWeights.pack_moe(per_expert, prefix)
        (a1, a2, a3), (b1, b2, b3), scaling = packed.lora_a, packed.lora_b, packed.scaling
        gate_up = after.experts.gate_up_proj - block.experts.gate_up_proj
        half = gate_up.shape[1] // 2
        for a, b, s, change in [
            (a1, b1, scaling[0], gate_up[:, :half]),
            (a3, b3, scaling[2], gate_up[:, half:]),
            (a2, b2, scaling[1], after.experts.down_proj - block.experts.down_proj),
        ]:
            torch.testing.assert_close(s * (b @ a), change, atol=1e-5, rtol=1e-5)
    q = lora.loras["model.layers.0.self_attn.q_proj"]
    change = merged.model.layers[0].self_attn.q_proj.weight - plain.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q.scaling * (q.lora_b @ q.lora_a), change, atol=1e-5, rtol=1e-5)
