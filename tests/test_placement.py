"""Load-aware expert placement: the balancing itself, and expert parallelism under a placement
other than by id (2 gloo ranks) computing what one process computes, with checkpoints that move
between placements and EP degrees."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from conftest import randomize_adapters
from distributed import run_ranks
from safetensors.torch import load_file
from tiny_models import tiny_model

from moe_peft_ds import AdapterConfig, MixLoRAConfig, apply_mixlora, apply_sieve_lora, load_adapter, save_adapter
from moe_peft_ds.backends.hf import base_experts, find_moe_blocks
from moe_peft_ds.backends.hf_load import load_local_experts, place_loaded_experts
from moe_peft_ds.mixlora import mixlora_layers, routing_counts
from moe_peft_ds.parallel import plan_placements, shard_experts
from moe_peft_ds.placement import balanced, check_placement, contiguous, copies, imbalance, lower_bound, owners

# routed rows per expert of tiny-mixtral's layer 3 on demo:arithmetic (the benchmark's profile)
SKEWED = [1671, 250, 718, 245, 581, 184, 59, 523, 489, 43, 60, 37, 115, 23, 13, 30]


def test_balanced_gives_every_rank_its_share_and_beats_placement_by_id():
    for ep in (2, 4, 8):
        placement = balanced(SKEWED, ep)
        check_placement(placement, 16, ep)
        assert imbalance(SKEWED, placement) <= imbalance(SKEWED, contiguous(16, ep))
        assert imbalance(SKEWED, placement) >= lower_bound(SKEWED, ep) - 1e-12
        assert balanced(SKEWED, ep) == placement  # deterministic: every rank computes the same
    assert imbalance(SKEWED, balanced(SKEWED, 2)) < 1.01 < 1.3 < imbalance(SKEWED, contiguous(16, 2))
    # the hottest expert and the 3 coldest carry 1.38x a rank's mean at EP=4: no placement of whole experts does better
    assert lower_bound(SKEWED, 4) == pytest.approx((1671 + 13 + 23 + 30) * 4 / sum(SKEWED))
    assert imbalance(SKEWED, balanced(SKEWED, 4)) == pytest.approx(lower_bound(SKEWED, 4))


def test_uniform_loads_and_groups():
    assert imbalance([5.0] * 8, balanced([5.0] * 8, 4)) == 1.0
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]  # two tasks' pools: each rank keeps half of each
    placement = balanced([9, 1, 1, 1, 1, 1, 1, 9], 2, groups)
    for held in placement:
        assert len(set(held) & set(groups[0])) == 2 and len(set(held) & set(groups[1])) == 2
    assert {0, 7} not in [set(h) & {0, 7} for h in placement]  # the two hot experts on different ranks


@pytest.mark.parametrize(
    "args,match",
    [
        (([1.0] * 6, 4), "must divide"),
        (([1.0] * 4, 2, [[0, 1, 2], [3]]), "every group"),
        (([1.0] * 4, 2, [[0, 1]]), "partition"),
    ],
)
def test_bad_placements_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        balanced(*args)


def test_check_placement_refuses_a_wrong_layout():
    for bad in ([[0, 1], [2, 3, 4, 5]], [[0, 0, 1], [2, 3, 4]], [[1, 0, 2], [3, 4, 5]]):
        with pytest.raises(ValueError):
            check_placement(bad, 6, 2)


SELECTION = [1, 2, 5, 6]
PLACEMENT = [[0, 2, 5, 7], [1, 3, 4, 6]]  # 8 experts: each rank holds two selected ones, not by id


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _sieve(**cfg):
    model = tiny_model("mixtral")
    layers = {b.layer for b in find_moe_blocks(model)}
    apply_sieve_lora(model, {layer: SELECTION for layer in layers}, AdapterConfig(attention_targets=["q_proj"], **cfg))
    randomize_adapters(model)
    return model


def _placed_on_rank(rank, world, out_dir, placements, dora=False):
    model = _sieve(use_dora=dora)
    reference = copy.deepcopy(model)
    sum(reference(**_batch(10 + r)).loss for r in range(world)).backward()
    shard_experts(model, dist.group.WORLD, placements)
    assert model.moe_peft_config.expert_placement == placements
    loss = model(**_batch(10 + rank)).loss
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss, reference(**_batch(10 + rank)).loss, rtol=1e-6, atol=1e-6)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if ".local.adapters." in name:  # the selected experts this rank owns (ascending id) get every copy's gradient
            layer = int(name.split("layers.")[1].split(".")[0])
            mine = [SELECTION.index(e) for e in SELECTION if owners(placements[layer])[e] == rank]
            whole = ref[name.replace(".local.adapters.", ".adapters.")].grad[mine]
            torch.testing.assert_close(p.grad, whole, rtol=1e-5, atol=1e-6)
        else:
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6)
    for block, whole in zip(find_moe_blocks(model), find_moe_blocks(reference)):  # the experts the placement names
        assert torch.equal(
            base_experts(block.experts).down_proj, base_experts(whole.experts).down_proj[placements[block.layer][rank]]
        )
    save_adapter(model, f"{out_dir}/placed")
    if rank == 0:
        save_adapter(reference, f"{out_dir}/single")
    dist.barrier()
    with torch.no_grad():  # the adapter loads at EP=2 by id and at EP=1
        logits = model(**_batch(20 + rank)).logits
        by_id = shard_experts(load_adapter(tiny_model("mixtral"), f"{out_dir}/placed"), dist.group.WORLD)
        torch.testing.assert_close(by_id(**_batch(20 + rank)).logits, logits, rtol=1e-5, atol=1e-6)
        single = load_adapter(tiny_model("mixtral"), f"{out_dir}/placed")
        torch.testing.assert_close(single(**_batch(20 + rank)).logits, logits, rtol=1e-5, atol=1e-6)


def _placed_like_one_process(tmp_path, placements, world=2, dora=False):
    """Run ``_placed_on_rank``; the adapter saved under ``placements`` is one process's, tensor for tensor."""
    run_ranks(_placed_on_rank, world=world, args=(str(tmp_path), placements, dora))
    placed, single = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("placed", "single"))
    assert placed.keys() == single.keys() and all(torch.equal(placed[k], single[k]) for k in single)
    config = json.loads((tmp_path / "placed" / "adapter_config.json").read_text())
    assert config["expert_placement"] == {str(layer): p for layer, p in placements.items()}
    assert json.loads((tmp_path / "single" / "adapter_config.json").read_text())["expert_placement"] == {}


def test_a_placement_not_by_id_computes_what_one_process_does_and_its_checkpoint_moves(tmp_path):
    _placed_like_one_process(tmp_path, {layer: PLACEMENT for layer in (0, 1)})


def _partial_placed_on_rank(rank, world, path, placements):
    group = dist.new_group(list(range(world)))
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = load_local_experts(path, torch.float32, group, torch.device("cpu"))
    place_loaded_experts(model, placements)
    for a, b in zip(find_moe_blocks(whole), find_moe_blocks(model)):
        full, held = base_experts(a.experts), base_experts(b.experts)
        for name, t in full.named_parameters(recurse=False):
            assert torch.equal(getattr(held, name), t[placements[a.layer][rank]]), name
    torch.manual_seed(0)
    apply_sieve_lora(model, {0: SELECTION, 1: SELECTION}, AdapterConfig(r=4))
    torch.manual_seed(0)
    apply_sieve_lora(whole, {0: SELECTION, 1: SELECTION}, AdapterConfig(r=4))
    randomize_adapters(whole)
    state = {k: v for k, v in whole.state_dict().items() if "lora_" in k}
    for name, p in model.named_parameters():  # the slots of the whole model's adapters this rank owns
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            mine = [SELECTION.index(e) for e in SELECTION if owners(placements[layer])[e] == rank]
            p.data.copy_(state[name.replace(".local.adapters.", ".adapters.")][mine])
    shard_experts(model, group, placements)  # loaded expert-parallel: tags, checks the placement
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch(rank)).loss, whole(**_batch(rank)).loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("redundant", [False, True], ids=["once", "copies"])
def test_a_partial_load_moves_its_experts_to_the_placement(tmp_path, redundant):
    tiny_model("mixtral").save_pretrained(tmp_path)
    placements = REPLICATED if redundant else {layer: PLACEMENT for layer in (0, 1)}
    run_ranks(_partial_placed_on_rank, 2, (str(tmp_path), placements))


MIX = MixLoRAConfig(num_experts=4, top_k=2, r=4, alpha=8, router_init_range=0.5)


def _mixlora_placed_on_rank(rank, world):
    torch.manual_seed(0)
    model = apply_mixlora(tiny_model("llama"), copy.deepcopy(MIX), fast=False)
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    counts = routing_counts(model, [_batch(40 + rank)])
    placements = plan_placements(model, counts, world, "balanced", model.moe_peft_config)
    assert placements == plan_placements(reference, counts, world, "balanced", model.moe_peft_config)
    assert all(sum(counts[layer]) == 18 * 2 * world for layer in counts)  # top-2 of 18 tokens on each rank
    placements = {layer: [[0, 3], [1, 2]] for layer in counts}  # a fixed layout not by id, whatever the loads
    shard_experts(model, dist.group.WORLD, placements)
    assert all(layer.local_experts == [[0, 3], [1, 2]][rank] for _, layer in mixlora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(
            model(**_batch(rank)).logits, reference(**_batch(rank)).logits, rtol=1e-5, atol=1e-6
        )
    for _, layer in mixlora_layers(model):
        layer.unshard()  # gathered back in expert order
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_mixlora_under_a_placement_not_by_id_equals_one_process():
    run_ranks(_mixlora_placed_on_rank, world=2)


def _pool_placed_on_rank(rank, world):
    from test_continual import batch, continual_model
    from test_continual_parallel import _same_adapter

    from moe_peft_ds.continual import grow_experts
    from moe_peft_ds.parallel import place_mixlora_experts

    model = continual_model("mixlora")  # 2 experts of task t0
    reference = copy.deepcopy(model)
    shard_experts(model, dist.group.WORLD)
    for m in (model, reference):
        torch.manual_seed(5)
        grow_experts(m, 2, "t1")
    placements = {layer: [[0, 3], [1, 2]] for layer, _ in mixlora_layers(model)}  # one expert of each task per rank
    place_mixlora_experts(model, placements)
    assert model.moe_peft_config.expert_placement == placements
    _same_adapter(model, reference)
    for step in range(2):  # plain SGD on this rank's batch, one process on both ranks' batches
        model(**batch(10 + rank)).loss.backward()
        sum(reference(**batch(10 + r)).loss for r in range(world)).backward()
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.grad is not None):
                if getattr(p, "allreduce", True):
                    dist.all_reduce(p.grad)
                p -= 0.5 * p.grad
            for p in (p for p in reference.parameters() if p.grad is not None):
                p -= 0.5 * p.grad
        model.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
    _same_adapter(model, reference)


def test_a_continual_pool_placed_by_load_trains_like_one_process():
    run_ranks(_pool_placed_on_rank, world=2)


def test_calibration_batches_leave_the_random_stream_alone():
    """A rank that profiles for its placement (and one process that does not) must draw the same
    adapters afterwards: iterating the calibration loader draws nothing from torch's generator."""
    from moe_peft_ds.data import calibration_batches

    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 5
    torch.manual_seed(0)
    calibration_batches(examples, tokenizer, 2, 0, 2)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


# Redundant slots (one per rank): experts 2 and 6 on both ranks; of the selection rank 0 owns 2 and 5
# and sends 2 to rank 1's copy, rank 1 owns 1 and 6 and sends 6 to rank 0's. Layer 1: copies of 6 and 7.
REPLICATED = {0: [[0, 2, 5, 6, 7], [1, 2, 3, 4, 6]], 1: [[1, 2, 5, 6, 7], [0, 3, 4, 6, 7]]}


def test_replicated_placements_lift_the_bound_of_whole_experts():
    for ep in (2, 4, 8):
        for redundant in (1, 2):
            placement = balanced(SKEWED, ep, redundant=redundant)
            check_placement(placement, 16, ep, redundant=True)
            assert all(len(held) == 16 // ep + redundant for held in placement)
            assert imbalance(SKEWED, placement) < lower_bound(SKEWED, ep) or lower_bound(SKEWED, ep) == 1.0
    # at EP=4 the hottest expert alone is 1.38x a rank's mean; copies of it bring every rank near the mean
    assert imbalance(SKEWED, balanced(SKEWED, 4, redundant=1)) < 1.05 < lower_bound(SKEWED, 4)
    assert copies(balanced(SKEWED, 4, redundant=1))[0] > 1
    assert owners(REPLICATED[0]) == {
        0: 0,
        1: 1,
        2: 0,
        3: 1,
        4: 1,
        5: 0,
        6: 1,
        7: 0,
    }  # copied experts' owners alternate
    with pytest.raises(ValueError, match="redundant"):
        balanced(SKEWED, 4, redundant=5)  # more than E/N
    with pytest.raises(ValueError, match="2 ranks of 4 experts"):
        check_placement(REPLICATED[0], 8, 2)  # copies need redundant=True


# EP=4, 3 slots per rank: rank 0 sends expert 1 to rank 1, rank 1 sends 2 to rank 3, rank 3 sends 6 to
# rank 1; rank 2 holds no selected expert at all (it still takes part in every exchange, forward and backward).
REPLICATED_4 = {layer: [[0, 1, 5], [1, 2, 6], [3, 4, 7], [2, 6, 7]] for layer in (0, 1)}


@pytest.mark.parametrize("world,dora", [(2, False), (2, True), (4, False)], ids=["ep2-lora", "ep2-dora", "ep4-lora"])
def test_redundant_expert_copies_compute_what_one_process_does(tmp_path, world, dora):
    _placed_like_one_process(tmp_path, REPLICATED if world == 2 else REPLICATED_4, world, dora)


def test_redundant_slots_that_do_not_fit_or_a_mixlora_pool_are_refused_in_one_line():
    from moe_peft_ds.config import ConfigError

    model = _sieve()
    counts = {layer: SKEWED[:8] for layer in (0, 1)}
    with pytest.raises(ConfigError, match=r"--redundant-experts 5: must be in \[0, 4\]"):
        plan_placements(model, counts, 2, "balanced", model.moe_peft_config, None, 5)
    assert all(
        len(p[0]) == 6 for p in plan_placements(model, counts, 2, "balanced", model.moe_peft_config, None, 2).values()
    )
    mixlora = apply_mixlora(tiny_model("llama"), copy.deepcopy(MIX), fast=False)
    with pytest.raises(ConfigError, match="MixLoRA"):
        plan_placements(mixlora, {0: [1, 1, 1, 1]}, 2, "balanced", mixlora.moe_peft_config, None, 1)
