"""launch/plan.py and moe_peft_ds.memory_plan: the planned parameter and optimizer-state counts of
the tiny models equal what a real injection and optimizer step allocate; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, apply_sieve_lora
from moe_peft_ds.backends.hf import base_experts, find_moe_blocks
from moe_peft_ds.config import SieveConfig
from moe_peft_ds.memory_plan import Layout, ModelShapes, Run, plan
from moe_peft_ds.sieve import all_experts_selection
from moe_peft_ds.train import trainable_parameters

ROOT = Path(__file__).resolve().parents[1]


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize(
    "family,method,dora,attention",
    [
        ("mixtral", "sieve", False, ()),
        ("qwen2_moe", "lora", False, ("q_proj", "v_proj")),
        ("gpt_oss", "sieve", True, ()),
        ("deepseek_v3", "lora", False, ()),
    ],
)
def test_planned_counts_equal_what_the_model_allocates(family, method, dora, attention):
    model = tiny_model(family)
    shapes = ModelShapes.of(model.config)
    run = Run(dtype="fp32", method=method, sieve=SieveConfig(fraction=0.25), r=4, use_dora=dora)
    run = Run(**{**vars(run), "attention_targets": attention})
    need = plan(shapes, Layout(1, 1, 0), run)

    experts = [base_experts(b.experts) for b in find_moe_blocks(model)]
    expert_bytes = _nbytes(p for e in experts for p in e.parameters())
    assert need["base_experts"] == expert_bytes
    assert need["base_other"] == _nbytes(model.parameters()) - expert_bytes

    budget = run.sieve.per_layer_budget(shapes.num_experts) if method == "sieve" else shapes.num_experts
    selection = {layer: ids[:budget] for layer, ids in all_experts_selection(model).items()}
    apply_sieve_lora(model, selection, AdapterConfig(r=4, use_dora=dora, attention_targets=list(attention)))
    trained = trainable_parameters(model)
    assert need["adapter_params"] == sum(p.numel() for p in trained)
    assert need["adapters"] == need["gradients"] == _nbytes(trained)

    optimizer = torch.optim.AdamW(trained, lr=1e-3)  # the launcher's optimizer without DeepSpeed (ZeRO-0)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    states = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert need["optimizer_states"] == _nbytes(states)


def test_expert_parallel_and_zero_divide_what_they_shard():
    shapes = ModelShapes.of(tiny_model("mixtral").config)  # 8 experts, top-2, 2 MoE layers
    run = Run(dtype="bf16", method="lora", r=4)
    one, ep2 = plan(shapes, Layout(1, 1, 0), run), plan(shapes, Layout(4, 2, 0), run)
    assert ep2["base_experts"] * 2 == one["base_experts"] and ep2["base_other"] == one["base_other"]
    assert ep2["adapter_params"] * 2 == one["adapter_params"]  # 4 of the 8 experts per rank
    zero1, zero2 = plan(shapes, Layout(4, 2, 1), run), plan(shapes, Layout(4, 2, 2), run)
    # ZeRO-1 partitions the states (+ an fp32 master partition) over the 2 expert-data-parallel ranks
    assert zero1["optimizer_states"] * 2 == ep2["optimizer_states"] * 3 // 2
    assert zero1["gradients"] == ep2["gradients"] and zero2["gradients"] * 2 == ep2["gradients"]
    assert one["all_to_all_per_step"] == 0 < ep2["all_to_all_per_step"]
    copies = plan(shapes, Layout(4, 2, 0), Run(dtype="bf16", method="lora", r=4, redundant_experts=1))
    assert copies["base_experts"] * 8 == one["base_experts"] * 5  # 4 + 1 of the 8 experts per rank
    assert plan(shapes, Layout(1, 1, 0), Run(dtype="bf16", method="lora", r=4, redundant_experts=1)) == one


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "plan.py"), *args], capture_output=True, text=True, timeout=300
    )


def test_the_cli_prints_a_plan_and_the_smallest_fit_as_json():
    done = _plan("--model", "tiny-mixtral", "--world-size", "2", "--ep-size", "2", "--gpu-memory", "1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (
        result["per_rank_bytes"]["adapter_params"] == 16 * 4 * 4 * 512
    )  # r=16, 4 of 16 experts (all may sit on one rank), 4 layers
    assert result["smallest_fit"]["layout"] == {"world": 1, "ep": 1, "zero": 0}
    assert set(result["estimated"]) == {"activations", "all_to_all", "expert_adapters_per_rank"}


@pytest.mark.parametrize(
    "args,line",
    [
        (["--world-size", "3", "--ep-size", "2"], "error: --ep-size 2 must divide --world-size 3"),
        (["--world-size", "3", "--ep-size", "3"], "error: --ep-size 3 does not divide the 16 experts per layer"),
        (["--sieve-k", "17"], "error: k=17 exceeds the 16 experts per layer"),
        (["--attention-lora", "q_a_proj"], "error: --attention-lora ['q_a_proj']: not attention projections"),
        (["--gpu-memory", "0"], "error: --gpu-memory 0.0 must be > 0 (GiB)"),
        (
            ["--world-size", "2", "--ep-size", "2", "--redundant-experts", "9"],
            "error: --redundant-experts 9: must be in [0, 8] with 16 experts over 2 ranks",
        ),
        (["--redundant-experts", "-1"], "error: --redundant-experts=-1 must be >= 0"),
    ],
)
def test_bad_input_is_one_line(args, line):
    done = _plan("--model", "tiny-mixtral", *args)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(line), done.stderr[-2000:]


def test_a_config_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    done = _plan("--model", str(tmp_path / "config.json"))
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: --model {tmp_path / 'config.json'}: not a transformers config.json (no model_type)"
    )
