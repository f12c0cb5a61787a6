"""Continual learning under expert parallelism (2 gloo ranks): growing, training, pruning and
merging a pool whose experts are split over the ranks give what one process gives."""

import copy

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from test_continual import batch, continual_model, logits
from test_mixlora import dense_model

from moe_peft_ds import ConfigError, load_adapter, save_adapter
from moe_peft_ds.checkpoint import gathered_adapter_state
from moe_peft_ds.continual import (
    adapter_parameters,
    expert_similarity,
    expert_usage,
    grow_experts,
    merge_experts,
    prune_experts,
)
from moe_peft_ds.dispatch import ep_group_name
from moe_peft_ds.mixlora import mixlora_layers
from moe_peft_ds.parallel import shard_experts


def _same_adapter(model, reference) -> None:
    got, expected = (
        gathered_adapter_state(model),
        {k: v.detach() for k, v in gathered_adapter_state(reference).items()},
    )
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert model.moe_peft_config.expert_tasks == reference.moe_peft_config.expert_tasks


def _sgd_step(model, reference, rank: int, world: int) -> dict:
    """One training step on both: this rank's batch under EP, every rank's batch in one process;
    the replicated gradients summed over the ranks (the data-parallel reduction). Returns what to check."""
    model.train(), reference.train()
    loss = model(**batch(10 + rank)).loss
    loss.backward()
    ref_losses = [reference(**batch(10 + r)).loss for r in range(world)]
    sum(ref_losses).backward()
    found = {"loss": (loss.item(), ref_losses[rank].item()), "expert_grads": 0}
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None and ref_params[name].grad is None, name
                continue
            if getattr(p, "allreduce", True):
                dist.all_reduce(p.grad)
                ref_grad = ref_params[name].grad
            else:  # this rank's slice of the group's experts
                assert p.group_name == ep_group_name(world), name
                k = p.shape[0]
                ref_grad = ref_params[name].grad[rank * k : (rank + 1) * k]
                found["expert_grads"] += int(p.grad.abs().sum() > 0)
            torch.testing.assert_close(p.grad, ref_grad, rtol=1e-5, atol=1e-6, msg=name)
            p -= 0.5 * p.grad
            ref_params[name] -= 0.5 * ref_params[name].grad
    model.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
    model.eval(), reference.eval()
    return found


def _continual_ep_on_rank(rank, world, method, out_dir):
    uneven = continual_model(method)
    grow_experts(uneven, 1, "t1")  # grown in one process: a task of one expert cannot be split over 2 ranks
    with pytest.raises(ValueError, match=r"groups of \[2, 1\] experts cannot be split over ep_size=2"):
        shard_experts(uneven, dist.group.WORLD)

    model = continual_model(method)  # 2 experts of task t0, randomized
    reference = copy.deepcopy(model)
    shard_experts(model, dist.group.WORLD)
    for m in (model, reference):  # the same seed: sharding and gathering draw nothing from the RNG
        torch.manual_seed(5)
        assert grow_experts(m, 2, "t1") == [2, 3]
    layer = mixlora_layers(model)[0][1]
    assert layer.local_experts == [rank, 2 + rank]  # a share of each task's experts
    assert [g.lora_A.requires_grad for g in layer.adapter.lora["up_proj"].groups] == [False, True]
    _same_adapter(model, reference)  # initialisation included

    steps = [_sgd_step(model, reference, rank, world) for _ in range(2)]  # the 2nd with trained new experts
    for step in steps:
        assert step["loss"][0] == pytest.approx(step["loss"][1], rel=1e-6)
    assert steps[0]["expert_grads"] > 0
    _same_adapter(model, reference)
    torch.testing.assert_close(
        logits(model, batch(3 + rank)), logits(reference, batch(3 + rank)), rtol=1e-5, atol=1e-6
    )
    assert adapter_parameters(model) == adapter_parameters(reference)

    for m in (model, reference):
        torch.manual_seed(6)
        grow_experts(m, 2, "t2")
    loader = [batch(20), batch(21, n=4)]
    usage = expert_usage(model, loader)
    torch.testing.assert_close(usage, expert_usage(reference, loader), rtol=0, atol=1e-12)
    share = usage.mean(0).sort().values
    # three experts below the threshold: EP=2 removes two, the least used, so that the pool stays shardable
    least = usage.mean(0).argsort()[:2].sort().values.tolist()
    assert prune_experts(model, usage, float(share[2:4].mean())) == least
    assert prune_experts(reference, usage, float(share[1:3].mean())) == least
    _same_adapter(model, reference)
    assert len(mixlora_layers(model)[0][1].local_experts) == 2

    sim = expert_similarity(model)
    torch.testing.assert_close(sim, expert_similarity(reference), rtol=1e-6, atol=1e-6)
    best = float(sim.masked_fill(torch.eye(4, dtype=torch.bool), -2).max())
    assert merge_experts(model, best) == []  # one pair over the threshold: not a multiple of ep_size, nothing merged
    with pytest.raises(ConfigError, match="multiple of ep_size"):
        grow_experts(model, 1, "t3")
    _same_adapter(model, reference)  # the refused calls changed nothing
    pairs = merge_experts(model, -1.0)
    assert len(pairs) == 2 and merge_experts(reference, -1.0) == pairs
    _same_adapter(model, reference)
    b = batch(30 + rank)
    torch.testing.assert_close(logits(model, b), logits(reference, b), rtol=1e-5, atol=1e-6)
    save_adapter(model, f"{out_dir}/ep2")
    if rank == 0:
        save_adapter(reference, f"{out_dir}/ep1")
        torch.save({"batch": b, "logits": logits(reference, b)}, f"{out_dir}/reference.pt")


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_a_pool_split_over_two_ranks_grows_trains_prunes_and_merges_like_one_process(tmp_path, method):
    run_ranks(_continual_ep_on_rank, world=2, args=(method, str(tmp_path)))
    ref = torch.load(tmp_path / "reference.pt")
    single = load_adapter(dense_model(), tmp_path / "ep2")  # the EP=2 checkpoint, in one process
    assert (
        single.moe_peft_config.expert_tasks
        == load_adapter(dense_model(), tmp_path / "ep1").moe_peft_config.expert_tasks
    )
    torch.testing.assert_close(logits(single, ref["batch"]), ref["logits"], rtol=1e-5, atol=1e-6)
