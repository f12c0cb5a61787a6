"""The sieve and MixLoRA on one CUDA GPU: numerics against the CPU (fp32) and in bf16, the
training loop, host synchronisations in the forward, and ``launch/train.py`` end to end
(plain, and under the deepspeed launcher with ZeRO-2 bf16).

Tolerances. CPU fp32 against CUDA fp32 (TF32 off, see conftest.py): logits within atol/rtol
1e-4, gradients within rtol 1e-3. They are not bit-identical and need not be: CUDA's
``index_add_`` (the per-token combine of the experts' outputs, and the backward of every row
gather) sums with atomics in a run-dependent order, and cuBLAS / grouped-GEMM kernels tile and
split the reductions differently from the CPU kernels; fp32 then agrees to ~1e-6 relative, and
gradients, which sum over many more terms (with cancellation), to somewhat less. bf16 (8-bit
mantissa) against fp32 on the same weights: loss within 2e-2 relative and every gradient
finite with bf16's own routing; and, at fp32's routing (``common.PinnedRouting``), every
gradient pointing the same way (cosine similarity > 0.99). Elementwise closeness means nothing
at bf16 precision, and the routing is pinned for the directions because a token whose top-k
choice flips (near-tied router scores) is a discrete change, not arithmetic error: on the CPU
one such token of 64 takes these tiny models' adapter gradients to cosine ~0.97, while at the
same routing bf16 stays above 0.998.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import OpNames

from moe_peft_ds.backends.hf import find_moe_blocks
from moe_peft_ds.mixlora import mixlora_layers, set_fast_path
from moe_peft_ds.train import train

from .common import (
    MIXLORA,
    SIEVE_FAMILIES,
    PinnedRouting,
    assert_bf16_follows_fp32,
    assert_frozen_without_grads,
    assert_grads_close,
    launch,
    make_batch,
    mixlora_model,
    run,
    sieve_model,
    to,
)

CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def experts_of(model) -> list[torch.nn.Module]:
    return [b.experts for b in find_moe_blocks(model)]


@pytest.mark.parametrize("family", list(SIEVE_FAMILIES))
def test_sieve_on_cuda_equals_cpu_in_fp32_and_follows_it_in_bf16(family):
    cpu = sieve_model(family)
    cuda = copy.deepcopy(cpu).to(CUDA)
    low = copy.deepcopy(cpu).to(CUDA, BF16)
    batch = make_batch(0)

    ref = run(cpu, batch)
    pin = PinnedRouting("experts")
    with pin.record(experts_of(cuda)):
        got = run(cuda, to(batch, CUDA))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)
    assert any("lora_A" in n for n in ref.grads) and any("lora_B" in n for n in ref.grads)
    if family == "qwen2_moe":
        assert any("shared_expert" in n for n in ref.grads)
    assert_grads_close(got.grads, ref.grads, rtol=1e-3, what=f"{family} CUDA fp32 vs CPU fp32")
    assert_frozen_without_grads(cuda, family)

    free = run(low, to(batch, CUDA))  # bf16 with its own routing: the loss, finite gradients
    assert_bf16_follows_fp32(free, got, f"{family} CUDA bf16 vs CUDA fp32", cosine=False)
    assert_frozen_without_grads(low, f"{family} bf16")
    with pin.replay(experts_of(low)):  # bf16 at fp32's routing: the gradients' directions
        pinned = run(low, to(batch, CUDA))
    assert_bf16_follows_fp32(pinned, got, f"{family} CUDA bf16 vs CUDA fp32, {pin.flips} flipped tokens pinned")


def test_training_loop_in_bf16_on_cuda_moves_only_the_adapter():
    model = sieve_model("mixtral").to(CUDA, BF16)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    loader = [to(make_batch(seed), CUDA) for seed in range(2)]
    losses = train(model, loader, steps=4, lr=1e-2, warmup=0, progress=False)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name in adapters:
            assert p.dtype == BF16 and not torch.equal(p, adapters[name]), f"{name} did not move"
        elif name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
    assert frozen


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_mixlora_on_cuda_equals_cpu_in_fp32_both_paths_and_runs_on_a_bf16_base(method):
    from test_mixlora import randomize

    cpu = mixlora_model(method)
    randomize(cpu)  # non-zero B and magnitudes off their initial norms
    cuda = copy.deepcopy(cpu).to(CUDA)
    low = mixlora_model(method, BF16)  # the base in bf16; its LoRA (adapter_dtype="float32") and the routers fp32
    low.load_state_dict(cpu.state_dict())  # the same values, each tensor keeping its own dtype
    low.to(CUDA)
    routers = [layer.adapter.router.weight for _, layer in mixlora_layers(low)]
    assert routers and all(w.dtype == torch.float32 for w in routers)
    assert all(p.dtype == torch.float32 for n, p in low.named_parameters() if "lora_A" in n)
    assert all(p.dtype == BF16 for p in low.parameters() if not p.requires_grad)
    batch = make_batch(1)

    ref = run(cpu, batch)
    pin = PinnedRouting("router", top_k=MIXLORA["top_k"])
    with pin.record(routers_of(cuda)):
        got = run(cuda, to(batch, CUDA))
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)
    assert any("router" in n for n in ref.grads) and any("q_proj" in n for n in ref.grads)
    assert_grads_close(got.grads, ref.grads, rtol=1e-3, what=f"{method} CUDA fp32 vs CPU fp32")

    set_fast_path(cuda, False)  # the reference path: each chosen expert's whole FFN
    slow = run(cuda, to(batch, CUDA))
    assert slow.loss == pytest.approx(got.loss, rel=1e-5)
    torch.testing.assert_close(slow.logits, got.logits, rtol=1e-4, atol=1e-5)
    assert_grads_close(slow.grads, got.grads, rtol=1e-4, what=f"{method} CUDA reference vs fast path")

    for fast in (True, False):  # a bf16 base with fp32 routers runs on both paths
        set_fast_path(low, fast)
        what = f"{method} CUDA bf16 base vs CUDA fp32, {'fast' if fast else 'reference'} path"
        assert_bf16_follows_fp32(run(low, to(batch, CUDA)), got, what, cosine=False)  # its own routing
        with pin.replay(routers_of(low)):  # fp32's routing (router logits straight-through)
            pinned = run(low, to(batch, CUDA))
        assert_bf16_follows_fp32(pinned, got, f"{what}, {pin.flips} flipped tokens pinned")


def routers_of(model) -> list[torch.nn.Module]:
    return [layer.adapter.router for _, layer in mixlora_layers(model)]


def count_syncs(model: torch.nn.Module, layers: list[torch.nn.Module], batch: dict) -> tuple[int, int]:
    """Host synchronisations (``torch.cuda.set_sync_debug_mode("warn")`` warnings) during one
    forward of ``model``: ``(inside the modules ``layers``, in the whole forward)``. Counted per
    layer by hooks around each layer's forward, so that syncs of transformers' own code outside
    them (masks, embeddings, the loss) are reported but not held against the layers."""

    def syncs(records) -> int:
        return sum("synchroniz" in str(w.message) for w in records)

    model.train()
    with torch.no_grad():
        model(**batch)  # warm up: lazy initialisations (cuBLAS handles, caches) are not per-step syncs
    torch.cuda.synchronize()
    inside, start = [0], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handles = [
            m.register_forward_pre_hook(lambda mod, args: start.__setitem__(id(mod), len(caught))) for m in layers
        ]
        handles += [
            m.register_forward_hook(
                lambda mod, args, out: inside.__setitem__(0, inside[0] + syncs(caught[start[id(mod)] :]))
            )
            for m in layers
        ]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for h in handles:
                h.remove()
    return inside[0], syncs(caught)


def test_forward_host_syncs_per_layer():
    """A bf16 base with the default fp32 adapters, training mode, no padding: the training setting
    on a GPU. torch's grouped GEMM has a kernel for bf16 x bf16 on sm90/sm100 only; in any other
    dtype, or on other GPUs, every grouped GEMM (transformers' own included) loops over the groups
    after copying the offsets to the host, so the floor is checked there only."""
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch's grouped GEMM kernel runs on sm90/sm100 only; elsewhere every grouped GEMM syncs")
    batch = to(make_batch(2, pad=False), CUDA)

    sieve = sieve_model("mixtral", BF16).to(CUDA)
    assert all(p.dtype == torch.float32 for p in sieve.parameters() if p.requires_grad)
    blocks = [b.module for b in find_moe_blocks(sieve)]
    inside, total = count_syncs(sieve, blocks, batch)
    assert inside <= 0 * len(blocks), (
        f"sieve: {inside} host syncs in {len(blocks)} MoE layers ({total} in the whole forward)"
    )

    mix = mixlora_model("mixlora", BF16).to(CUDA)
    layers = [layer for _, layer in mixlora_layers(mix)]
    inside, total = count_syncs(mix, layers, batch)
    assert inside <= 1 * len(layers), (
        f"MixLoRA: {inside} host syncs in {len(layers)} layers ({total} in the whole forward)"
    )


@pytest.mark.parametrize("build", [*SIEVE_FAMILIES, "mixlora", "mixdora"])
def test_a_bf16_base_with_fp32_adapters_runs_every_grouped_gemm_in_bf16(build):
    """torch's GPU grouped GEMM has a kernel for bf16 x bf16 only; any other dtype loops over the
    groups after copying the offsets to the host. Over a bf16 base the default fp32 adapters' GEMMs
    run on bf16 casts (``lora.lora_gemm_dtype``), forward and backward; their gradients stay fp32,
    and the loss follows the fp32 model's (same weights, its own routing)."""
    mix = build.startswith("mix")
    make = (lambda dtype: mixlora_model(build, dtype)) if mix else (lambda dtype: sieve_model(build, dtype))
    low, ref = make(BF16).to(CUDA), make(torch.float32).to(CUDA)
    trainable = [p for p in low.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    batch = to(make_batch(3), CUDA)
    with OpNames() as seen:
        got = run(low, batch)
    assert len(seen.grouped_mm_dtypes) >= 4, seen.grouped_mm_dtypes  # the LoRA GEMMs of one layer's forward alone
    assert all(d == (BF16, BF16) for d in seen.grouped_mm_dtypes), seen.grouped_mm_dtypes
    assert not [n for n in seen.names if "fallback" in n]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert_bf16_follows_fp32(got, run(ref, batch), f"{build}: bf16 base, fp32 adapters vs fp32", cosine=False)


COMMON = ["--data", "demo:arithmetic", "--max-steps", "4", "--batch-size", "4", "--calibration-samples", "64"]
SIEVE = ["--model", "tiny-mixtral", "--method", "sieve", "--sieve-fraction", "0.25", *COMMON]


def test_launcher_sieve_bf16_one_process(tmp_path):
    run_ = launch(tmp_path / "plain", *SIEVE, "--dtype", "bf16")
    assert len(run_["log"]["losses"]) == 4
    assert all(len(ids) == 4 for ids in run_["config"]["selection"].values())  # 25% of 16 experts


def test_launcher_sieve_under_deepspeed_zero2_bf16_on_one_gpu(tmp_path):
    run_ = launch(
        tmp_path / "ds", *SIEVE, "--dtype", "bf16", "--deepspeed_config", "ds_configs/zero2_bf16.json", ranks=1
    )
    assert run_["log"]["world_size"] == 1 and len(run_["log"]["losses"]) == 4


def test_launcher_mixlora_under_deepspeed_zero2_bf16_on_one_gpu(tmp_path):
    """DeepSpeed's bf16 mode casts the whole module to bf16, the fp32 routers included."""
    run_ = launch(
        tmp_path / "mixlora",
        "--model",
        "tiny-llama",
        "--method",
        "mixlora",
        *COMMON,
        "--dtype",
        "bf16",
        "--deepspeed_config",
        "ds_configs/zero2_bf16.json",
        ranks=1,
    )
    assert "layers.0.mixlora.router.weight" in run_["weights"] and len(run_["log"]["losses"]) == 4
