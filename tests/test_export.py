"""Exported adapters give the logits of base + adapter where they are read: the ``vllm`` export
rebuilt into the checkpoint's weights from its keys alone (as vLLM packs them: per-expert 2D
LoRA on the checkpoint's names, or its 3D fused layout), the ``peft`` export loaded by PEFT, the
``merged`` export by plain transformers; fp32, 1e-5. Bad input: one error line, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, MixLoRAConfig, apply_mixlora, apply_sieve_lora, save_adapter
from moe_peft_ds.config import ConfigError
from moe_peft_ds.export import export_adapter

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")
SIEVE = {0: [1, 5], 1: [2]}  # layer 1 adapts fewer experts; the other experts stay cold
SHARED = {"qwen2_moe", "deepseek_v3"}  # families whose MoE blocks hold shared experts


def _ids():
    return torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _base(tmp_path, family) -> Path:
    path = tmp_path / f"base-{family}"
    tiny_model(family).save_pretrained(path)
    return path


def _adapter(tmp_path, family, base, selection, **kw):
    """A trained-looking adapter over the saved base: its directory and base + adapter logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cfg = AdapterConfig(r=4, alpha=6, attention_targets=["q_proj", "o_proj"], base_model=str(base), **kw)
    cfg.shared_expert_lora = family in SHARED
    apply_sieve_lora(model, selection(model) if callable(selection) else selection, cfg)
    randomize_adapters(model, std=0.2)
    out = tmp_path / f"adapter-{family}"
    save_adapter(model, out)
    return out, _logits(model)


def _rebuilt_like_vllm(base: Path, export: Path, out: Path) -> Path:
    """The base checkpoint with the exported LoRA added from the export's keys alone: a 2D key
    ``<module>.lora_A.weight`` onto ``<module>.weight``; a fused 3D layer ``<experts>.base_layer`` onto
    the experts' gate_up and ``<experts>`` onto their down tensor, ``A [E*r, in]`` expert-major and
    ``B [out, r*E]`` rank-major (vLLM's ``_stack_moe_lora_weights``). Every expert of an adapted
    per-expert layer must have all three projections (vLLM's ``pack_moe`` asserts it)."""
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]  # scaling 1: folded into B
    r = config["r"]
    lora, weights = load_file(export / "adapter_model.safetensors"), load_file(base / "model.safetensors")
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora}
    for module in modules:
        A = lora[f"base_model.model.{module}.lora_A.weight"]
        B = lora[f"base_model.model.{module}.lora_B.weight"]
        if f"{module}.weight" in weights:
            weights[f"{module}.weight"] += B @ A
            continue
        experts, fused = module.removesuffix(".base_layer"), module.endswith(".base_layer")
        key = next(
            k
            for k in weights
            if k.startswith(experts + ".") and k.endswith(("gate_up_proj", "down_proj")) and ("gate_up" in k) == fused
        )
        num = weights[key].shape[0]
        delta = B.reshape(B.shape[0], r, num).permute(2, 0, 1) @ A.reshape(num, r, -1)  # [E, out, in]
        weights[key] += delta if delta.shape == weights[key].shape else delta.transpose(1, 2)
    per_expert = {}
    for module in modules:
        parts = module.split(".experts.")
        if len(parts) == 2 and parts[1].split(".")[0].isdigit():
            expert, proj = parts[1].split(".", 1)
            per_expert.setdefault(parts[0], set()).add((int(expert), proj))
    for layer, found in per_expert.items():
        experts = {e for e, _ in found}
        assert experts == set(range(len(experts))) and len(found) == 3 * len(experts), layer
    out.mkdir()
    (out / "config.json").write_text((base / "config.json").read_text())
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selection", ["sieve", "all"])
def test_exports_give_base_plus_adapter(tmp_path, family, selection):
    from peft import PeftModel

    base = _base(tmp_path, family)
    chosen = SIEVE if selection == "sieve" else (lambda m: {0: list(range(8)), 1: list(range(8))})
    adapter, expected = _adapter(tmp_path, family, base, chosen)
    assert not torch.allclose(expected, _logits(_load(base)), atol=1e-3)  # the adapter changes the logits

    vllm = export_adapter(adapter, "vllm", tmp_path / "vllm")
    rebuilt = _rebuilt_like_vllm(base, vllm, tmp_path / "rebuilt")
    torch.testing.assert_close(_logits(_load(rebuilt)), expected, atol=1e-5, rtol=1e-5)

    peft = PeftModel.from_pretrained(_load(base), export_adapter(adapter, "peft", tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(peft), expected, atol=1e-5, rtol=1e-5)

    merged = export_adapter(adapter, "merged", tmp_path / "merged")
    torch.testing.assert_close(_logits(_load(merged)), expected, atol=1e-5, rtol=1e-5)


def test_vllm_keys_follow_the_checkpoint_names(tmp_path):
    """Mixtral's checkpoint names its experts block_sparse_moe.experts.E.w1/w2/w3 (gate/down/up),
    GPT-OSS keeps them fused: the export says the same; SGLang takes the per-expert keys."""
    keys = {}
    for family in ("mixtral", "gpt_oss"):
        base = _base(tmp_path, family)
        adapter, _ = _adapter(tmp_path, family, base, SIEVE)
        keys[family] = set(
            load_file(export_adapter(adapter, "vllm", tmp_path / f"v-{family}") / "adapter_model.safetensors")
        )
        half = load_file(
            export_adapter(adapter, "vllm", tmp_path / f"bf16-{family}", dtype="bf16") / "adapter_model.safetensors"
        )
        assert half.keys() == keys[family] and {t.dtype for t in half.values()} == {torch.bfloat16}
        if family == "mixtral":
            sglang = export_adapter(adapter, "sglang", tmp_path / "sglang")
            assert set(load_file(sglang / "adapter_model.safetensors")) == keys[family]
        else:
            with pytest.raises(ConfigError, match="fused"):
                export_adapter(adapter, "sglang", tmp_path / "sglang-oss")
            assert not (tmp_path / "sglang-oss").exists()
    prefix = "base_model.model.model.layers.1.block_sparse_moe.experts"
    assert {f"{prefix}.7.{w}.lora_{n}.weight" for w in ("w1", "w2", "w3") for n in "AB"} <= keys["mixtral"]
    oss = "base_model.model.model.layers.0.mlp.experts"
    assert {f"{oss}.base_layer.lora_A.weight", f"{oss}.lora_B.weight"} <= keys["gpt_oss"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys["gpt_oss"]


def test_bad_exports_write_nothing(tmp_path):
    base = _base(tmp_path, "mixtral")
    adapter, _ = _adapter(tmp_path, "mixtral", base, SIEVE)
    with pytest.raises(ConfigError, match="unknown"):
        export_adapter(adapter, "onnx", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already holds"):
        export_adapter(adapter, "peft", tmp_path / "full")
    other = _base(tmp_path, "qwen2_moe")
    with pytest.raises(ValueError, match="model_type"):  # an adapter for another base
        export_adapter(adapter, "vllm", tmp_path / "b", base_model=str(other))

    model = _load(base)
    apply_sieve_lora(model, SIEVE, AdapterConfig(r=4, use_dora=True, base_model=str(base)))
    save_adapter(model, tmp_path / "dora")
    for fmt in ("vllm", "peft"):
        with pytest.raises(ConfigError, match="DoRA"):
            export_adapter(tmp_path / "dora", fmt, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base-mixtral", "adapter-mixtral", "full", "base-qwen2_moe", "dora"]
    )
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_dora_merges(tmp_path):
    base = _base(tmp_path, "qwen2_moe")
    adapter, expected = _adapter(tmp_path, "qwen2_moe", base, SIEVE, use_dora=True)
    merged = export_adapter(adapter, "merged", tmp_path / "merged")
    torch.testing.assert_close(_logits(_load(merged)), expected, atol=1e-5, rtol=1e-5)


def test_mixlora_is_refused(tmp_path):
    from tiny_models import save_tiny_llama

    base = save_tiny_llama(tmp_path / "llama")
    model = _load(base)
    apply_mixlora(model, MixLoRAConfig(num_experts=2, top_k=1, base_model=str(base)))
    save_adapter(model, tmp_path / "mix")
    with pytest.raises(ConfigError, match="mixture"):
        export_adapter(tmp_path / "mix", "merged", tmp_path / "out")


def test_command_line(tmp_path):
    base = _base(tmp_path, "mixtral")
    adapter, _ = _adapter(tmp_path, "mixtral", base, SIEVE)
    script = [sys.executable, str(ROOT / "launch" / "export_adapter.py"), "--adapter", str(adapter)]
    ok = subprocess.run(
        script + ["--format", "peft", "--output-dir", str(tmp_path / "p")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    bad = subprocess.run(
        script + ["--format", "vllm", "--output-dir", str(tmp_path / "p")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:"), bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.startswith("error:")]) == 1
