"""Every fused-expert MoE family of the installed transformers, discovered at test time: a tiny
model of each goes through profile -> select -> apply -> backward -> save -> load, through the
Python API and through launch/train.py. The list grows (or shrinks) with transformers."""

import runpy
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moe_peft_ds import (
    AdapterConfig,
    apply_sieve_lora,
    load_adapter,
    merge_adapter,
    profile_routing,
    save_adapter,
    select_experts,
)
from moe_peft_ds.backends.hf import FusedExpertsWithLoRA, attention_projections, find_moe_blocks, shared_experts
from moe_peft_ds.backends.hf_families import NOT_TINY, discover_families, tiny_model
from moe_peft_ds.demo import DEMO_MODEL_DIR
from moe_peft_ds.lora import LoRALinear

FAMILIES = discover_families()
MODEL_TYPES = [f.model_type for f in FAMILIES]
ROOT = Path(__file__).resolve().parents[1]


def test_discovery_finds_the_families_this_project_is_built_for():
    for model_type in (
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "qwen3_next",
        "jamba",
        "granitemoe",
        "phimoe",
        "nemotron_h",
    ):
        assert model_type in MODEL_TYPES
    by_type = {f.model_type: f.layout for f in FAMILIES}
    assert by_type["gpt_oss"].transposed and by_type["gpt_oss"].has_bias
    assert by_type["nemotron_h"].up == "up_proj" and not by_type["nemotron_h"].has_gate
    assert not by_type["mixtral"].transposed and by_type["mixtral"].up == "gate_up_proj"
    # Families that cannot be built tiny are listed with a reason, never silently dropped.
    assert all(reason for reason in NOT_TINY.values())


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t not in NOT_TINY])
def test_family_profile_select_apply_backward_save_load(model_type, tmp_path):
    model = tiny_model(model_type)
    batch = _batch()
    blocks = find_moe_blocks(model)
    profile = profile_routing(model, [batch], progress=False)
    assert sorted(profile.counts) == [b.layer for b in blocks] and profile.top_k == 2 - (model_type == "zaya")
    real_tokens = int(batch["attention_mask"].sum())
    assert all(sum(c) == real_tokens * profile.top_k for c in profile.counts.values())  # padding is not counted
    selection = select_experts(profile, fraction=0.25)
    with torch.no_grad():
        base = model(**batch).logits
    shared = any(isinstance(m, torch.nn.Linear) for b in blocks for s in shared_experts(b) for m in s.modules())
    attention = attention_projections(model)  # whatever this family's attention has (MLA, fused qkv, ...)
    cfg = AdapterConfig(r=4, alpha=8, use_dora=True, shared_expert_lora=shared, attention_targets=attention)
    apply_sieve_lora(model, selection, cfg)
    with torch.no_grad():  # zero-initialised adapters leave the model as it was
        torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)

    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n or n.endswith("magnitude") for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n and "lora_B" in n)
    assert not shared or any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "shared" in n)
    on_attention = [g for n, g in grads.items() if any(f".{t}." in n for t in attention)]
    assert not attention or any(g is not None and g.abs().sum() > 0 for g in on_attention)

    with torch.no_grad():  # a trained-looking adapter, then a round trip through the checkpoint
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(tiny_model(model_type), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted, rtol=0, atol=1e-6)
        merged = merge_adapter(fresh)  # folded into the base tensors: a plain transformers model again
        assert not any(isinstance(m, (FusedExpertsWithLoRA, LoRALinear)) for m in merged.modules())
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-4)


train_main = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="not_main")["main"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t not in NOT_TINY])
def test_family_trains_from_the_command_line(model_type, tmp_path, tokenizer):
    model_dir = tmp_path / model_type
    tiny_model(model_type).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = train_main(
        [
            "--model",
            str(model_dir),
            "--data",
            "demo:arithmetic",
            "--no-progress",
            "--method",
            "sieve",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--calibration-samples",
            "4",
            "--max-length",
            "32",
            "--output-dir",
            str(out),
            "--lora-r",
            "4",
        ]
    )
    assert rc == 0 and (out / "adapter_model.safetensors").is_file()
    load_adapter(tiny_model(model_type), out)


family_table = runpy.run_path(str(ROOT / "launch" / "family_table.py"), run_name="not_main")


def test_family_table_rows_say_what_each_family_is(tmp_path, capsys):
    by_type = {f.model_type: f for f in FAMILIES}
    ep = family_table["ep_tested"]()
    assert {"mixtral", "gpt_oss", "deepseek_v2", "qwen3_next"} <= set(ep)
    gpt_oss = family_table["row"](by_type["gpt_oss"], ep).split(" | ")
    assert "[E, in, out], bias" in gpt_oss[1] and gpt_oss[-2:] == ["yes", "yes |"]
    deepseek = family_table["row"](by_type["deepseek_v2"], ep).split(" | ")
    assert deepseek[2] == "nn.Linear (LoRA-able)" and deepseek[3].startswith("1 of 4 (first_k_dense_replace")
    assert "up_proj" in family_table["row"](by_type["nemotron_h"], ep)  # no gate
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    assert family_table["main"](["--readme", str(readme), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err and readme.read_text() == "no block here\n"


def _partial_loads_equal_the_whole_model(rank, world, saved):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from moe_peft_ds.backends.hf import base_experts
    from moe_peft_ds.backends.hf_load import load_local_experts

    group = dist.new_group(list(range(world)))
    for model_type, path in saved:
        whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        part = load_local_experts(path, torch.float32, group, torch.device("cpu")).eval()
        for a, b in zip(find_moe_blocks(whole), find_moe_blocks(part), strict=True):
            full, mine = base_experts(a.experts), base_experts(b.experts)
            n = full.down_proj.shape[0] // world
            for name, t in full.named_parameters(recurse=False):
                want = t[rank * n : (rank + 1) * n] if t.shape[0] == full.down_proj.shape[0] else t
                assert torch.equal(getattr(mine, name), want), (model_type, name)
        batch = _batch(rank)
        with torch.no_grad():  # the expert-parallel forward (all-to-all over both ranks) equals the whole model's
            want, got = whole(**batch).logits, part(**batch).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=model_type)


def test_every_family_loads_expert_parallel_and_computes_what_the_whole_model_computes(tmp_path):
    """Each of 2 gloo ranks reads only its half of the experts (transformers' sliced loading,
    fused or per-expert checkpoints) and the expert-parallel forward equals the whole model's."""
    from distributed import run_ranks

    saved = []
    for model_type in MODEL_TYPES:
        if model_type in NOT_TINY:
            continue
        tiny_model(model_type).save_pretrained(tmp_path / model_type)
        saved.append((model_type, str(tmp_path / model_type)))
    run_ranks(_partial_loads_equal_the_whole_model, 2, (saved,), timeout_s=900)
