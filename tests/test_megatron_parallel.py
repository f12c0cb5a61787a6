"""Megatron-core expert layers on 2 gloo ranks (CPU): expert parallelism, expert tensor
parallelism refused, routing counts summed over data-parallel ranks."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from distributed import run_ranks
from megatron_cpu import cpu_shims, gpt_moe, init_parallel, permute, sequential_experts, tiny_config
from torch import nn

from moe_peft_ds import apply_sieve_lora, load_adapter, profile_routing, save_adapter
from moe_peft_ds.config import AdapterConfig
from moe_peft_ds.modules import UnsupportedModelError

pytestmark = pytest.mark.slow
E, H = 4, 16


def _full_weights(config):
    """Every expert's weights, the same on every rank (seeded), ``[E, 2F, H]`` and ``[E, H, F]``."""
    g = torch.Generator().manual_seed(123)
    F_ = config.moe_ffn_hidden_size
    return torch.randn(E, 2 * F_, H, generator=g) / 4, torch.randn(E, H, F_, generator=g) / 4


def _experts(config, num_local, first, w1, w2):
    model = nn.ModuleList([sequential_experts(config, num_local)])
    with torch.no_grad():
        for i, mlp in enumerate(model[0].local_experts):
            mlp.linear_fc1.weight.copy_(w1[first + i])
            mlp.linear_fc2.weight.copy_(w2[first + i])
    return model


def _local_rows(x, index, weights, first, num_local):
    """This rank's share of the routed rows (Megatron's dispatcher would deliver exactly these)."""
    rows, expert, counts, probs, _ = permute(x, index, weights, E)
    keep = (expert >= first) & (expert < first + num_local)
    return rows[keep], counts[first : first + num_local], probs[keep]


def _ep2_worker(rank, world, tmp):
    with cpu_shims():
        init_parallel(ep=2)
        config = tiny_config(num_layers=1)
        w1, w2 = _full_weights(config)
        g = torch.Generator().manual_seed(0)
        x, index = torch.randn(32, H, generator=g), torch.rand(32, E, generator=g).topk(2, dim=-1).indices
        weights = torch.rand(32, 2, generator=g).softmax(-1)
        # the EP=2 layer: rank r holds experts 2r, 2r+1; the adapter is on experts 1 (rank 0) and 2 (rank 1)
        ep = _experts(config, 2, 2 * rank, w1, w2)
        apply_sieve_lora(ep, {0: [1, 2]}, AdapterConfig(r=4, alpha=8))
        randomize_adapters(ep, seed=rank)  # each rank its own expert's values
        rows, counts, probs = _local_rows(x, index, weights, 2 * rank, 2)
        out, _ = ep[0](rows, counts, probs)
        save_adapter(ep, tmp / "ep2")  # gathered from both ranks, written by rank 0
        torch.distributed.barrier()
        # the same adapter on one EP=1 layer holding all four experts, on every rank
        init_parallel(ep=1)
        one = _experts(config, 4, 0, w1, w2)
        load_adapter(one, tmp / "ep2")
        all_rows, _, all_counts, all_probs, _ = permute(x, index, weights, E)
        full, _ = one[0](all_rows, all_counts, all_probs)  # rows sorted by expert: this rank's are one slice
        start = int(all_counts[: 2 * rank].sum())
        torch.testing.assert_close(out, full[start : start + len(rows)], rtol=1e-6, atol=1e-6)
        out.pow(2).sum().backward()
        full[start : start + len(rows)].pow(2).sum().backward()
        mine = 1 + rank  # the selected expert this rank holds
        for fc in ("linear_fc1", "linear_fc2"):
            a = getattr(ep[0].local_experts[mine - 2 * rank], fc).lora
            b = getattr(one[0].local_experts[mine], fc).lora
            for p in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(a, p).grad, getattr(b, p).grad, rtol=1e-5, atol=1e-6)
        held = [n for n, p in ep.named_parameters() if p.requires_grad]
        assert held and all(f"local_experts.{1 - rank}." in n for n in held), held  # local index of expert 1 / 2
        # and back: saved from EP=1, loaded onto a fresh EP=2 layer, each rank takes its own expert
        save_adapter(one, tmp / "ep1")
        torch.distributed.barrier()
        init_parallel(ep=2)
        again = _experts(config, 2, 2 * rank, w1, w2)
        load_adapter(again, tmp / "ep1")
        torch.testing.assert_close(again[0](rows, counts, probs)[0], out, rtol=1e-6, atol=1e-6)


def test_expert_parallel_2_layer_equals_one_process_and_its_checkpoint_reshards_both_ways(tmp_path):
    run_ranks(_ep2_worker, world=2, args=(tmp_path,))


def _etp2_worker(rank, world):
    with cpu_shims():
        init_parallel(ep=1, etp=2)
        model = nn.ModuleList([sequential_experts(tiny_config(num_layers=1), E)])
        with pytest.raises(UnsupportedModelError, match="expert tensor parallelism"):
            apply_sieve_lora(model, {0: [0]})
        assert not any(p.requires_grad is False for p in model.parameters()), "nothing changed"


def test_expert_tensor_parallelism_is_refused():
    run_ranks(_etp2_worker, world=2)


def _dp2_profile_worker(rank, world):
    with cpu_shims():
        init_parallel()
        model = gpt_moe(tiny_config())
        g = torch.Generator().manual_seed(5)
        batches = [{"input_ids": torch.randint(1, 64, (2, 10), generator=g)} for _ in range(4)]
        halves = profile_routing(model, batches[rank::2], progress=False)
        # every rank profiling all batches sums to twice the one-process counts
        doubled = profile_routing(model, batches, progress=False)
        assert halves.tokens * 2 == doubled.tokens == 4 * 2 * 10 * 2
        assert {L: [2 * c for c in v] for L, v in halves.counts.items()} == doubled.counts
        torch.testing.assert_close(torch.tensor(halves.gate_sums[1]) * 2, torch.tensor(doubled.gate_sums[1]))


def test_routing_counts_are_summed_over_data_parallel_ranks():
    run_ranks(_dp2_profile_worker, world=2)


def _ddp_worker(rank, world):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    with cpu_shims():
        init_parallel()  # EP=1: the experts' data-parallel group is both ranks
        model = gpt_moe(tiny_config())
        apply_sieve_lora(model, {0: [1], 1: [0, 2]}, AdapterConfig(r=4))
        randomize_adapters(model)
        g = torch.Generator().manual_seed(rank)  # each rank its own data
        ids = torch.randint(1, 64, (2, 8), generator=g)
        args = (ids, torch.arange(8).expand(2, 8))
        kw = dict(attention_mask=torch.ones(8, 8, dtype=torch.bool).triu(1)[None, None], labels=ids)
        model(*args, **kw).mean().backward()  # this rank's own gradient, without DDP
        local = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        for p in model.parameters():
            p.grad = None
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        adapter = {id(p) for p in model.parameters() if p.requires_grad}
        in_expert_buffers = {id(p) for buf in ddp.expert_parallel_buffers for p in buf.params}
        assert adapter and adapter <= in_expert_buffers, "allreduce=False puts the adapters in DDP's expert buffers"
        ddp(*args, **kw).mean().backward()
        ddp.finish_grad_sync()
        for n, p in model.named_parameters():
            if p.requires_grad:
                parts = [torch.empty_like(local[n]) for _ in range(world)]
                torch.distributed.all_gather(parts, local[n])
                torch.testing.assert_close(p.main_grad, sum(parts) / world, rtol=1e-5, atol=1e-7, msg=n)


def test_megatron_ddp_averages_the_adapter_gradients_over_the_expert_data_parallel_group():
    run_ranks(_ddp_worker, world=2)
