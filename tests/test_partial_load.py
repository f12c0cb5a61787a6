"""Loading expert-parallel (``load_model(experts_group=...)``): each of 2 gloo ranks reads only
its half of every MoE layer's experts, and training from that partial load equals today's
full-load-then-shard path; the routing profile under expert parallelism equals one process's;
checkpoints that cannot fill the model fail with one line."""

import json

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, apply_sieve_lora
from moe_peft_ds.backends.hf import base_experts, find_moe_blocks
from moe_peft_ds.backends.hf_load import load_local_experts
from moe_peft_ds.config import ConfigError
from moe_peft_ds.data import calibration_batches
from moe_peft_ds.parallel import shard_experts
from moe_peft_ds.profiling import profile_routing

SELECTION = {0: [1, 2, 5, 6], 1: [0, 7]}  # experts on both ranks' halves (8 experts, 4 per rank)


def _batch(rank: int, vocab: int = 97) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _full_then_shard(path, cfg, group):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    apply_sieve_lora(model, SELECTION, cfg)
    return shard_experts(model, group)


def _partial(path, cfg, group):
    model = load_local_experts(path, torch.float32, group, torch.device("cpu"))
    torch.manual_seed(0)
    return apply_sieve_lora(model, SELECTION, cfg)


def _train_like(rank, world, path, dora):
    group = dist.new_group(list(range(world)))
    cfg = AdapterConfig(r=4, alpha=8, use_dora=dora)
    full, partial = _full_then_shard(path, cfg, group), _partial(path, cfg, group)
    # the partial load never held the other rank's experts, and holds the same local ones
    for a, b in zip(find_moe_blocks(full), find_moe_blocks(partial)):
        fa, fb = base_experts(a.experts), base_experts(b.experts)
        assert fb.down_proj.shape[0] == 4 and fb.held == list(range(4 * rank, 4 * rank + 4))
        for name, t in fa.named_parameters(recurse=False):
            assert torch.equal(getattr(fb, name), t), name
    named_full, named_partial = dict(full.named_parameters()), dict(partial.named_parameters())
    assert named_full.keys() == named_partial.keys()
    trainable = [n for n, p in named_full.items() if p.requires_grad]
    assert trainable and all(named_partial[n].requires_grad for n in trainable)
    for n in trainable:  # same initialisation (B is zero: give both the same non-zero B to test the maths)
        torch.testing.assert_close(named_partial[n], named_full[n], rtol=0, atol=0, msg=n)
        if "lora_B" in n:
            g = torch.Generator().manual_seed(hash(n) % 2**31)
            value = torch.randn(named_full[n].shape, generator=g) * 0.1
            named_full[n].data.copy_(value)
            named_partial[n].data.copy_(value)
    batch = _batch(rank)
    losses = [m(**batch).loss for m in (full, partial)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for n in trainable:
        torch.testing.assert_close(named_partial[n].grad, named_full[n].grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "family,dora",
    [("mixtral", False), ("qwen2_moe", False), ("gpt_oss", False), ("mixtral", True)],
    ids=["mixtral-per-expert-checkpoint", "qwen2_moe-shared-expert", "gpt_oss-transposed-bias", "mixtral-dora"],
)
def test_training_from_the_partial_load_equals_full_load_then_shard(tmp_path, family, dora):
    tiny_model(family).save_pretrained(tmp_path)
    run_ranks(_train_like, 2, (str(tmp_path), dora))


def _profile_like(rank, world, path, samples):
    from transformers import AutoModelForCausalLM

    group = dist.new_group(list(range(world)))
    examples = [
        {"input_ids": ids, "labels": ids} for ids in (_batch(i)["input_ids"][0].tolist() for i in range(samples))
    ]
    tok = type("Tok", (), {"pad_token_id": 0})()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # one process over every sample, counted on each rank alike (the sum over 2 ranks is then halved)
    whole = profile_routing(ref, calibration_batches(examples, tok, 2, 0, 1), progress=False)
    batches = calibration_batches(examples, tok, 2, rank, world)
    ep = profile_routing(load_local_experts(path, torch.float32, group, torch.device("cpu")), batches, progress=False)
    assert ep.samples == samples and ep.tokens * world == whole.tokens
    for layer, counts in ep.counts.items():
        assert [c * world for c in counts] == whole.counts[layer], layer


def test_the_profile_under_expert_parallel_equals_one_process_even_with_unequal_shares(tmp_path):
    """5 samples, batch 2: rank 0 runs 2 batches (3 samples), rank 1 one batch and one uncounted repeat."""
    tiny_model("mixtral").save_pretrained(tmp_path)
    run_ranks(_profile_like, 2, (str(tmp_path), 5))


def _load_fails(rank, world, path, line):
    group = dist.new_group(list(range(world)))
    with pytest.raises(ConfigError) as err:
        load_local_experts(path, torch.float32, group, torch.device("cpu"))
    assert line in str(err.value), str(err.value)


def test_a_checkpoint_without_an_expert_tensor_is_refused(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.6.w2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    # Experts stored one by one: transformers fuses the 3 it finds, every rank names the layer.
    line = "disagree with the config's shapes (model.layers.1.mlp.experts.down_proj: checkpoint [3, 32, 24], model [4, 32, 24]"
    run_ranks(_load_fails, 2, (str(tmp_path), line))


def test_a_fused_checkpoint_without_an_expert_tensor_is_refused(tmp_path):
    tiny_model("gpt_oss").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.down_proj" in state
    del state["model.layers.1.mlp.experts.down_proj"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    run_ranks(_load_fails, 2, (str(tmp_path), "the checkpoint lacks model.layers.1.mlp.experts.down_proj"))


def test_a_checkpoint_whose_shapes_disagree_with_the_config_is_refused(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    run_ranks(_load_fails, 2, (str(tmp_path), "disagree with the config's shapes"))


def test_an_ep_degree_that_does_not_divide_the_experts_is_refused_before_reading(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    run_ranks(_load_fails, 3, (str(tmp_path), "--ep-size 3 does not divide the 8 experts per layer"))


def _dtypes(rank, world, path):
    group = dist.new_group(list(range(world)))
    model = apply_sieve_lora(load_local_experts(path, torch.bfloat16, group, torch.device("cpu")), SELECTION)
    experts = [base_experts(b.experts) for b in find_moe_blocks(model)]
    assert {p.dtype for e in experts for p in e.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_a_bf16_partial_load_keeps_the_base_in_bf16_and_the_adapters_in_fp32(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    run_ranks(_dtypes, 2, (str(tmp_path),))


def test_the_launcher_stops_every_rank_with_one_line_before_writing(tmp_path):
    """A per-expert checkpoint lacking one expert's gate (which transformers cannot fuse with its up
    projection: its load report raises on rank 0 only), under `deepspeed --num_gpus 2 ... --ep-size 2`."""
    from pathlib import Path

    from distributed import run_deepspeed

    from moe_peft_ds.models import resolve_model

    root = Path(__file__).resolve().parents[1]
    model = tmp_path / "model"
    tiny_model("mixtral").save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((Path(resolve_model("tiny-mixtral")) / name).read_bytes())
    state = load_file(str(model / "model.safetensors"))
    del state["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29591", str(root / "launch" / "train.py")]
    cmd += ["--model", str(model), "--data", "demo:arithmetic", "--output-dir", str(out), "--no-progress"]
    cmd += ["--deepspeed_config", str(root / "ds_configs" / "zero2_fp32.json"), "--ep-size", "2"]
    done = run_deepspeed(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode != 0 and not out.exists()
    errors = {line for line in (done.stdout + done.stderr).splitlines() if "error: " in line}
    assert len(errors) == 1, (done.stdout + done.stderr)[-3000:]  # both ranks say the same line
    assert (
        "transformers could not load the checkpoint: We encountered some issues during automatic conversion"
        in errors.pop()
    )
