"""Expert parallelism on 2 gloo ranks: the all-to-all, and EP=2 equal to one process."""

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import randomize_adapters
from distributed import run_ranks
from safetensors.torch import load_file
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, apply_sieve_lora, save_adapter
from moe_peft_ds.backends.hf import ExpertParallelExperts, attention_projections, base_experts, find_moe_blocks
from moe_peft_ds.dispatch import all_to_all_v, ep_group_name
from moe_peft_ds.parallel import shard_experts


def _all_to_all_on_rank(rank, world, out_dir):
    send = [[2, 0], [1, 3]][rank]  # uneven, with an empty split
    recv = [[2, 1], [0, 3]][rank]
    x = (torch.arange(sum(send) * 3, dtype=torch.float32).view(-1, 3) + 100 * rank).requires_grad_(True)
    y = all_to_all_v(x, send, recv)
    (y * torch.arange(1, y.shape[0] + 1)[:, None]).sum().backward()
    torch.save({"x": x.detach(), "y": y.detach(), "grad": x.grad}, f"{out_dir}/rank{rank}.pt")


def test_all_to_all_v_moves_rows_and_gradients(tmp_path):
    run_ranks(_all_to_all_on_rank, world=2, args=(str(tmp_path),))
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    torch.testing.assert_close(r[0]["y"], torch.cat([r[0]["x"][:2], r[1]["x"][:1]]), rtol=0, atol=0)
    torch.testing.assert_close(r[1]["y"], r[1]["x"][1:], rtol=0, atol=0)
    # rank 0's first rows went to rank 0 (weights 1, 2); rank 1's row 0 went to rank 0 (weight 3)
    torch.testing.assert_close(r[0]["grad"][:, 0], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(r[1]["grad"][:, 0], torch.tensor([3.0, 1.0, 2.0, 3.0]))


SELECTION = [1, 2, 5, 6]  # two experts on each rank of EP=2 (8 experts, 4 per rank)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _adapted(family):
    model = tiny_model(family)
    layers = {b.layer for b in find_moe_blocks(model)}
    attention = attention_projections(model)[:1]  # q_proj, or q_a_proj under MLA
    apply_sieve_lora(model, {layer: SELECTION for layer in layers}, AdapterConfig(attention_targets=attention))
    randomize_adapters(model)
    return model


def _reduced_grads(model) -> dict:
    """This rank's gradients, the replicated ones summed over the ranks (the data-parallel reduction)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            if getattr(p, "allreduce", True):
                dist.all_reduce(p.grad)
            grads[name] = p.grad
    return grads


def _ep_on_rank(rank, world, family, out_dir):
    model = _adapted(family)
    reference = copy.deepcopy(model)
    ref_losses = [reference(**_batch(10 + r)).loss for r in range(world)]
    sum(ref_losses).backward()  # one process over both ranks' batches
    shard_experts(model, dist.group.WORLD)
    loss = model(**_batch(10 + rank)).loss
    loss.backward()
    grads = _reduced_grads(model)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    local_bytes = sum(p.numel() for b in find_moe_blocks(model) for p in base_experts(b.experts).parameters())
    full_bytes = sum(p.numel() for b in find_moe_blocks(reference) for p in base_experts(b.experts).parameters())
    torch.save(
        {
            "loss": loss.detach(),
            "ref_loss": ref_losses[rank].detach(),
            "grads": grads,
            "ref_grads": ref_grads,
            "tags": {
                n: (getattr(p, "allreduce", True), getattr(p, "group_name", None))
                for n, p in model.named_parameters()
                if p.requires_grad
            },
            "expert_weights": (local_bytes, full_bytes),
        },
        f"{out_dir}/rank{rank}.pt",
    )


# Layouts: concatenated [gate; up]; shared expert; transposed with biases; MLA, shared experts and a dense
# first layer; a hybrid stack (linear attention and attention layers). launch/family_table.py reads this list.
EP_FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v2", "qwen3_next"]


@pytest.mark.parametrize("family", EP_FAMILIES)
def test_ep2_equals_one_process(tmp_path, family):
    run_ranks(_ep_on_rank, world=2, args=(family, str(tmp_path)))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-6, atol=1e-6)
        local, full = r["expert_weights"]
        assert local * 2 == full  # each rank holds half of every layer's experts
        mine = [e for e in SELECTION if rank * 4 <= e < (rank + 1) * 4]
        for name, g in r["grads"].items():
            if ".local.adapters." not in name:  # replicated adapter (attention LoRA)
                torch.testing.assert_close(g, r["ref_grads"][name], rtol=1e-5, atol=1e-6)
                assert r["tags"][name] == (True, None)
                continue
            ref_name = name.replace(".local.adapters.", ".adapters.")
            slots = [SELECTION.index(e) for e in mine]  # rows of the full adapter that this rank owns
            torch.testing.assert_close(g, r["ref_grads"][ref_name][slots], rtol=1e-5, atol=1e-6)
            assert r["tags"][name] == (False, ep_group_name(2))


def test_shard_needs_an_adapter_and_divisible_experts(tmp_path):
    run_ranks(_shard_errors_on_rank, world=2, args=())


def _shard_errors_on_rank(rank, world):
    with pytest.raises(ValueError, match="apply_sieve_lora"):
        shard_experts(tiny_model("mixtral"), dist.group.WORLD)
    model = _adapted("mixtral")
    shard_experts(model, dist.group.WORLD)
    assert all(isinstance(b.experts, ExpertParallelExperts) for b in find_moe_blocks(model))
    with pytest.raises(ValueError, match="already expert-parallel"):
        shard_experts(model, dist.group.WORLD)


def _checkpoint_on_rank(rank, world, out_dir):
    from moe_peft_ds import load_adapter

    model = _adapted("mixtral")
    if rank == 0:
        save_adapter(model, f"{out_dir}/single")  # one process, nothing sharded
    shard_experts(model, dist.group.WORLD)
    save_adapter(model, f"{out_dir}/ep2")  # every rank calls; rank 0 writes
    dist.barrier()
    batch = _batch(20 + rank)
    with torch.no_grad():
        ref = model(**batch).logits
        single = load_adapter(tiny_model("mixtral"), f"{out_dir}/ep2")  # reload at EP=1
        resharded = shard_experts(
            load_adapter(tiny_model("mixtral"), f"{out_dir}/ep2"), dist.group.WORLD
        )  # and at EP=2
        torch.testing.assert_close(resharded(**batch).logits, ref, rtol=0, atol=0)  # same layout: bit-identical
        torch.testing.assert_close(single(**batch).logits, ref, rtol=1e-5, atol=1e-6)  # summation order differs


def test_ep2_checkpoint_equals_single_process_and_reloads(tmp_path):
    import json

    from safetensors.torch import load_file

    run_ranks(_checkpoint_on_rank, world=2, args=(str(tmp_path),))
    single, ep2 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "ep2"))
    assert single.keys() == ep2.keys()
    assert all(torch.equal(single[k], ep2[k]) for k in single)
    assert json.loads((tmp_path / "single" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "ep2" / "adapter_config.json").read_text()
    )


def _ep4_on_rank(rank, world, out_dir):
    from moe_peft_ds import load_adapter

    batch = _batch(30 + rank)
    single = load_adapter(tiny_model("mixtral"), f"{out_dir}/single")
    sharded = shard_experts(load_adapter(tiny_model("mixtral"), f"{out_dir}/single"), dist.group.WORLD)
    assert sharded.model.layers[0].mlp.experts.local.num_experts == 2  # 8 experts over 4 ranks
    with torch.no_grad():
        torch.testing.assert_close(sharded(**batch).logits, single(**batch).logits, rtol=1e-5, atol=1e-6)
    save_adapter(sharded, f"{out_dir}/ep4")


def test_adapter_moves_between_ep1_and_ep4(tmp_path):
    from safetensors.torch import load_file

    from moe_peft_ds import save_adapter

    save_adapter(_adapted("mixtral"), tmp_path / "single")
    run_ranks(_ep4_on_rank, world=4, args=(str(tmp_path),))
    single, ep4 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "ep4"))
    assert single.keys() == ep4.keys() and all(torch.equal(single[k], ep4[k]) for k in single)


def _one_rank_gone(rank, world, out_dir):
    if rank == 1:
        import os

        os._exit(0)  # this rank dies before the all-to-all
    try:
        all_to_all_v(torch.ones(2, 3), [1, 1], [1, 1])
    except RuntimeError as err:
        torch.save({"error": str(err)}, f"{out_dir}/rank0.pt")


def test_a_missing_rank_ends_the_collective_with_an_error_not_a_hang(tmp_path):
    from torch.multiprocessing.spawn import ProcessException

    with pytest.raises(ProcessException):  # rank 0 fails too, at the barrier after its all-to-all
        run_ranks(_one_rank_gone, world=2, args=(str(tmp_path),), timeout_s=5)
    assert torch.load(tmp_path / "rank0.pt")["error"]  # the all-to-all raised: an error, not a hang


def _mixlora_ep_on_rank(rank, world, method, out_dir):
    from test_mixlora import dense_model, randomize

    from moe_peft_ds import MixLoRAConfig, apply_mixlora

    cfg = MixLoRAConfig(method=method, num_experts=4, top_k=2, attention_targets=["q_proj"], router_z_loss_coef=1e-3)
    model = apply_mixlora(dense_model(), cfg)
    randomize(model)
    model.train()
    reference = copy.deepcopy(model)
    ref_losses = [reference(**_batch(10 + r)).loss for r in range(world)]
    sum(ref_losses).backward()
    shard_experts(model, dist.group.WORLD)
    loss = model(**_batch(10 + rank)).loss
    loss.backward()
    grads = _reduced_grads(model)
    tags = {n: getattr(p, "group_name", None) for n, p in model.named_parameters() if n in grads}
    torch.save(
        {
            "loss": loss.detach(),
            "ref_loss": ref_losses[rank].detach(),
            "grads": grads,
            "tags": tags,
            "ref_grads": {n: p.grad for n, p in reference.named_parameters() if p.grad is not None},
        },
        f"{out_dir}/rank{rank}.pt",
    )
    save_adapter(model, f"{out_dir}/ep2")  # gathered from both ranks
    if rank == 0:
        save_adapter(reference, f"{out_dir}/ep1")


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_mixlora_ep2_equals_one_process(tmp_path, method):
    run_ranks(_mixlora_ep_on_rank, world=2, args=(method, str(tmp_path)))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-6, atol=1e-6)
        assert any("router" in n for n in r["grads"]) and any("q_proj" in n for n in r["grads"])
        for name, g in r["grads"].items():
            ref = r["ref_grads"][name]
            if ".adapter.lora." in name:  # this rank's two LoRA experts of four
                assert r["tags"][name] == ep_group_name(2), name
                ref = ref[2 * rank : 2 * rank + 2]
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=name)
    ep2, ep1 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ep2", "ep1"))
    assert ep2.keys() == ep1.keys()
    for key in ep1:
        torch.testing.assert_close(ep2[key], ep1[key], rtol=0, atol=0)


def _bucket_on_rank(rank, world):
    from moe_peft_ds.train import one_gradient_flush

    params = [torch.nn.Parameter(torch.zeros(1000 if rank == 0 else 10))]  # ranks hold different adapters
    small = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 100}}
    assert one_gradient_flush(small, params)["zero_optimization"]["reduce_bucket_size"] == 1000  # the largest rank's
    assert small["zero_optimization"]["reduce_bucket_size"] == 100  # the caller's config is not changed
    big = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5000}}
    assert one_gradient_flush(big, params) == big
    assert one_gradient_flush({"zero_optimization": {"stage": 0}}, params) == {"zero_optimization": {"stage": 0}}


def test_expert_parallel_ranks_reduce_their_gradients_in_one_bucket():
    """Under EP, a ZeRO-1/2 bucket that fills mid-backward on one rank and not on another would
    order its reduction differently against the backward all-to-alls (a deadlock on NCCL): the
    bucket is sized to hold every rank's adapters."""
    run_ranks(_bucket_on_rank, world=2)
