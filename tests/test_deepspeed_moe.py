"""Sieve LoRA on models built from DeepSpeed's own MoE layer, on 2 gloo ranks (EP=2)."""

import pytest
import torch
import torch.distributed as dist
from conftest import randomize_adapters
from distributed import run_ranks
from torch import nn

from moe_peft_ds import AdapterConfig, apply_sieve_lora, load_adapter, profile_routing, save_adapter
from moe_peft_ds.backends.deepspeed_moe import ds_moe_layers, global_ids

H, E, VOCAB = 16, 4, 50
SELECTION = {0: [1, 2], 1: [0]}


class ToyMoE(nn.Module):
    """Embedding, two residual DeepSpeed MoE layers (4 experts, top-2), LM head."""

    def __init__(self, ep_size: int, set_groups: bool = True):
        """``set_groups``: give the layers their expert-parallel groups now (needed to run them
        before ``deepspeed.initialize``, which sets them itself and refuses to set them twice)."""
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.embed = nn.Embedding(VOCAB, H)
        expert = nn.Sequential(nn.Linear(H, 2 * H), nn.ReLU(), nn.Linear(2 * H, H))
        self.moes = nn.ModuleList(
            MoE(
                H,
                expert,
                num_experts=E,
                ep_size=ep_size,
                k=2,
                capacity_factor=8.0,
                eval_capacity_factor=8.0,
                use_rts=False,
                top2_2nd_expert_sampling=False,
            )
            for _ in range(2)
        )
        self.head = nn.Linear(H, VOCAB)
        for moe in self.moes:
            if ep_size > 1 and set_groups:
                moe.set_deepspeed_parallelism()
            for expert, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, global_ids(moe)):
                torch.manual_seed(100 + e)  # global expert e has the same weights at any EP degree
                for p in expert.parameters():
                    nn.init.normal_(p, std=0.3)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for moe in self.moes:
            x = x + moe(x)[0]
        return self.head(x)


def toy(ep_size: int, set_groups: bool = True) -> ToyMoE:
    torch.manual_seed(0)
    return ToyMoE(ep_size, set_groups)


def tokens(seed):
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def _on_rank(rank, world, out_dir):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the existing gloo group
    model = toy(ep_size=2)
    # Profile: counts all-reduced over ranks equal the sum of both ranks' own counts.
    ids = tokens(rank)
    gathered = [None, None]
    dist.all_gather_object(gathered, ids)
    profile = profile_routing(model, [{"input_ids": ids}], progress=False, forward=lambda m, i, mask: m(i))
    torch.save({"counts": profile.counts, "tokens": profile.tokens, "ids": gathered}, f"{out_dir}/profile{rank}.pt")
    # Inject on the owning ranks only, with DeepSpeed's tags; train one step.
    apply_sieve_lora(model, SELECTION, AdapterConfig(r=2))
    randomize_adapters(model)
    owned = {(layer, e) for layer, moe in enumerate(ds_moe_layers(model)) for e in global_ids(moe)}
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = sum(2 for layer, ids in SELECTION.items() for e in ids if (layer, e) in owned) * 2  # 2 linears x (A, B)
    assert len(adapted) == expected, adapted
    assert all(".deepspeed_experts." in n for n in adapted)  # DeepSpeed's checkpoint code accepts these names
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.allreduce is False and p.group_name == "ep_size_2", n
    model(tokens(10 + rank)).sum().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    save_adapter(model, f"{out_dir}/ep2")
    with torch.no_grad():
        logits = model(tokens(20 + rank))
    torch.save({"logits": logits, "ids": tokens(20 + rank)}, f"{out_dir}/logits{rank}.pt")
    dist.barrier()
    reloaded = load_adapter(toy(ep_size=2), f"{out_dir}/ep2")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens(20 + rank)), logits, rtol=0, atol=0)


def test_deepspeed_moe_profile_inject_save_and_reload_at_ep1(tmp_path):
    run_ranks(_on_rank, world=2, args=(str(tmp_path),))
    p0, p1 = (torch.load(tmp_path / f"profile{r}.pt") for r in range(2))
    assert p0["counts"] == p1["counts"]  # all-reduced: every rank selects from the same counts
    single = profile_routing(
        toy(ep_size=1), [{"input_ids": torch.cat(p0["ids"])}], progress=False, forward=lambda m, i, mask: m(i)
    )
    assert single.counts == p0["counts"] and single.tokens == p0["tokens"] == 24
    model = load_adapter(toy(ep_size=1), tmp_path / "ep2")  # an EP=2 adapter onto one process
    assert model.moe_peft_config.selection == SELECTION
    for r in range(2):
        saved = torch.load(tmp_path / f"logits{r}.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(saved["ids"]), saved["logits"], rtol=1e-5, atol=1e-6)


STEPS, LR = 3, 1e-2


def step_batch(step: int, rank: int) -> torch.Tensor:
    return tokens(30 + 2 * step + rank)


def lm_loss(model, ids):
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _train_ep2_on_rank(rank, world, out_dir):
    """deepspeed.initialize (ZeRO-2) on an EP=2 DeepSpeed-MoE model carrying the sieve adapter."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    model = load_adapter(toy(ep_size=2, set_groups=False), f"{out_dir}/init")  # injected before initialize
    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "adapters"})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=LR)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = []
    for step in range(STEPS):
        loss = lm_loss(engine, step_batch(step, rank))  # equal token counts per rank: the mean of means is the mean
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    save_adapter(model, f"{out_dir}/ep2-trained")
    if rank == 0:
        torch.save(losses, f"{out_dir}/ep2-losses.pt")


def test_deepspeed_moe_ep2_under_deepspeed_initialize_trains_the_adapter_of_one_process(tmp_path):
    reference = apply_sieve_lora(toy(ep_size=1), SELECTION, AdapterConfig(r=2))
    randomize_adapters(reference)
    save_adapter(reference, tmp_path / "init")  # both runs start from this adapter
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):  # one process, the global batch of both ranks
        loss = lm_loss(reference, torch.cat([step_batch(step, r) for r in range(2)]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    run_ranks(_train_ep2_on_rank, world=2, args=(str(tmp_path),))
    assert torch.load(tmp_path / "ep2-losses.pt") == pytest.approx(losses, rel=1e-5)
    trained = load_adapter(toy(ep_size=1), tmp_path / "ep2-trained")
    for (name, p), q in zip(
        ((n, p) for n, p in trained.named_parameters() if p.requires_grad),
        (q for q in reference.parameters() if q.requires_grad),
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    start = load_adapter(toy(ep_size=1), tmp_path / "init")
    moved = [(p - q).abs().max() for p, q in zip(trained.parameters(), start.parameters()) if p.requires_grad]
    assert min(moved) > 1e-3  # every adapter tensor trained
