"""Continual learning with dynamic experts: growing, freezing, router protection, prune, merge, metrics."""

import copy

import pytest
import torch
from test_mixlora import dense_model, randomize

from moe_peft_ds import ConfigError, MixLoRAConfig, apply_mixlora, load_adapter, save_adapter
from moe_peft_ds.checkpoint import adapter_state_dict
from moe_peft_ds.continual import (
    adapter_parameters,
    continual_metrics,
    delta_weight,
    expert_similarity,
    expert_usage,
    grow_experts,
    merge_experts,
    prune_experts,
    router_kl,
    router_targets,
)
from moe_peft_ds.mixlora import mixlora_layers, set_fast_path


def batch(seed: int, n: int = 3, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def continual_model(method: str = "mixlora", n: int = 2, top_k: int = 2, seed: int = 0):
    model = apply_mixlora(
        dense_model(seed=seed),
        MixLoRAConfig(
            method=method, num_experts=n, top_k=top_k, r=4, alpha=8, attention_targets=[], expert_tasks=["t0"] * n
        ),
    )
    randomize(model, seed)
    return model


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def train(model, b, steps: int = 5, lr: float = 1e-2, weight_decay: float = 0.0, extra=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = model(**b).loss + (extra() if extra else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
@pytest.mark.parametrize("fast", [True, False])
def test_grown_pool_computes_what_one_layer_with_the_same_experts_computes(tmp_path, method, fast):
    """A grown layer (two groups, a router in two blocks) equals a fresh MixLoRA layer of all its
    experts loaded from its checkpoint: forward on both paths, and the saved tensors."""
    model = continual_model(method)
    assert grow_experts(model, 3, "t1") == [2, 3, 4]
    randomize(model, seed=1)  # the new experts learned something
    set_fast_path(model, fast)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(dense_model(), tmp_path / "a")
    set_fast_path(fresh, fast)
    assert fresh.moe_peft_config.num_experts == 5 and fresh.moe_peft_config.expert_tasks == [
        "t0",
        "t0",
        "t1",
        "t1",
        "t1",
    ]
    b = batch(0)
    torch.testing.assert_close(logits(model, b), logits(fresh, b), rtol=1e-5, atol=1e-5)
    saved, again = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_growing_freezes_earlier_experts_bit_identically_and_router_rows_by_option():
    model = continual_model("mixdora")
    train(model, batch(0))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    grow_experts(model, 2, "t1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".groups.1." in n or ".router.blocks.1." in n for n in trainable), sorted(trainable)
    train(model, batch(1), weight_decay=0.1)  # weight decay would move anything the optimizer held
    after = adapter_state_dict(model)
    for key, old in before.items():
        if "router" in key:
            assert torch.equal(after[key][:2], old), key  # old rows frozen
        else:
            assert torch.equal(after[key], old), key
    grown = [k for k in after if ".experts.2." in k and "lora_B" in k]
    assert grown and all(after[k].abs().sum() > 0 for k in grown)  # the new experts trained

    model = continual_model()
    train(model, batch(0))
    grow_experts(model, 1, "t1", train_old_router=True)
    router = {k: v.clone() for k, v in adapter_state_dict(model).items() if "router" in k}
    train(model, batch(1))
    assert all(not torch.equal(adapter_state_dict(model)[k][:2], v[:2]) for k, v in router.items())


def test_strong_router_kl_on_replayed_samples_keeps_old_task_outputs():
    """With old experts and old router rows frozen, the only drift on an old task is routing to
    the new experts; a strong KL penalty on the old sample keeps the outputs within tolerance,
    where training without it moves them."""
    old_task, new_task = batch(0), batch(1)
    drift = {}
    for coef in (0.0, 100.0):
        torch.manual_seed(0)
        model = continual_model(top_k=1)
        train(model, old_task)
        reference = logits(model, old_task)
        targets = router_targets(model, [old_task])  # before growing
        grow_experts(model, 2, "t1")
        kl = (lambda: coef * router_kl(model, old_task, targets[0])) if coef else None
        train(model, new_task, steps=100, lr=1e-2, extra=kl)
        drift[coef] = (logits(model, old_task) - reference).abs().max().item()
    assert drift[100.0] < 1e-3 < drift[0.0], drift


def test_router_kl_is_zero_for_the_same_router_and_grows_with_mass_on_new_experts():
    model = continual_model()
    b = batch(2)
    targets = router_targets(model, [b])
    assert router_kl(model, b, targets[0]).item() == pytest.approx(0.0, abs=1e-6)
    grow_experts(model, 2, "t1")
    kl = {}
    for scale in (0.0, 1.0):  # zero rows: some mass on the new experts; rows like expert 0's: more
        with torch.no_grad():
            for _, layer in mixlora_layers(model):
                layer.adapter.router.blocks[1].weight.copy_(
                    scale * layer.adapter.router.blocks[0].weight[:1].expand(2, -1)
                )
        kl[scale] = router_kl(model, b, targets[0])
    assert 0 < kl[0.0].item() < kl[1.0].item()
    kl[1.0].backward()
    routers = {n: p.grad for n, p in model.named_parameters() if "router" in n}
    assert all((g is not None) == (".blocks.1." in n) for n, g in routers.items())  # only the new rows learn


def _renumbered(state: dict, keep: list[int]) -> dict:
    """The checkpoint of a model holding only the experts ``keep`` (renumbered in order)."""
    out = {}
    for key, value in state.items():
        if ".router." in key:
            out[key] = value[keep]
        elif ".experts." in key:
            head, _, rest = key.partition(".experts.")
            e, _, tail = rest.partition(".")
            if int(e) in keep:
                out[f"{head}.experts.{keep.index(int(e))}.{tail}"] = value
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_prune_removes_rarely_used_experts_and_keeps_the_layer_consistent(tmp_path, method):
    model = continual_model(method, n=2)
    grow_experts(model, 3, "t1")
    randomize(model, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():  # routers that prefer some experts clearly
        for _, layer in mixlora_layers(model):
            for block in layer.adapter.router.blocks:
                block.weight.normal_(0, 1.0)
    usage = expert_usage(model, [batch(4)])
    assert usage.shape == (2, 5) and torch.allclose(usage.sum(1), torch.ones(2, dtype=usage.dtype))
    share = usage.mean(0)
    low = share.sort().values
    assert low[1] < low[2]
    threshold = float(low[1] + low[2]) / 2  # the two least used go
    keep = [e for e in range(5) if share[e] >= threshold]
    state = adapter_state_dict(model)
    expected_state = _renumbered(state, keep)
    removed = prune_experts(model, usage, threshold)
    assert removed == [e for e in range(5) if e not in keep] and len(removed) == 2
    cfg = model.moe_peft_config
    assert cfg.num_experts == 3 and cfg.expert_tasks == [["t0", "t0", "t1", "t1", "t1"][e] for e in keep]
    assert all(layer.adapter.router.weight.shape[0] == 3 for _, layer in mixlora_layers(model))
    pruned = adapter_state_dict(model)
    assert pruned.keys() == expected_state.keys() and all(torch.equal(pruned[k], expected_state[k]) for k in pruned)
    save_adapter(model, tmp_path / "p")
    fresh = load_adapter(dense_model(), tmp_path / "p")
    b = batch(5)
    torch.testing.assert_close(logits(model, b), logits(fresh, b), rtol=1e-5, atol=1e-5)
    assert grow_experts(model, 1, "t2") == [3]  # the pruned pool grows on
    train(model, b, steps=1)


def test_prune_keeps_top_k_experts():
    model = continual_model(n=3, top_k=2)
    removed = prune_experts(model, torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]), threshold=0.9)
    assert removed == [2] and model.moe_peft_config.num_experts == 2


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_merge_joins_near_duplicate_experts(tmp_path, method):
    model = continual_model(method, n=2)
    grow_experts(model, 2, "t1")
    randomize(model, seed=6)
    with torch.no_grad():  # expert 3 duplicates expert 1, with its own router row
        for _, layer in mixlora_layers(model):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                groups = layer.adapter.lora[proj].groups
                for name in ("lora_A", "lora_B") + (("magnitude",) if method == "mixdora" else ()):
                    getattr(groups[1], name)[1].copy_(getattr(groups[0], name)[1])
    sim = expert_similarity(model)
    assert sim[1, 3].item() == pytest.approx(1.0, abs=1e-5) and sim[0, 1] < 0.9
    layers = [layer for _, layer in mixlora_layers(model)]
    want = [delta_weight(layer, "down_proj", 1) for layer in layers]
    rows = [layer.adapter.router.weight[[1, 3]].mean(0).detach() for layer in layers]
    assert merge_experts(model, threshold=0.99) == [(1, 3)]
    cfg = model.moe_peft_config
    assert cfg.num_experts == 3 and cfg.expert_tasks == ["t0", "t0+t1", "t1"]
    for layer, w, row in zip(layers, want, rows):
        torch.testing.assert_close(
            delta_weight(layer, "down_proj", 1), w, rtol=1e-4, atol=1e-5
        )  # duplicates merge exactly
        torch.testing.assert_close(layer.adapter.router.weight[1], row)
    save_adapter(model, tmp_path / "m")
    fresh = load_adapter(dense_model(), tmp_path / "m")
    torch.testing.assert_close(logits(model, batch(7)), logits(fresh, batch(7)), rtol=1e-5, atol=1e-5)
    assert merge_experts(model, threshold=0.999) == []  # nothing similar is left


def test_merge_rule_is_the_mean_update_when_it_fits_the_rank():
    from moe_peft_ds.continual import _merged_pair

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 12, generator=g)
    experts = [
        {"lora_A": A, "lora_B": torch.randn(10, 4, generator=g), "scaling": torch.tensor(2.0)} for _ in range(2)
    ]
    merged = _merged_pair(experts, r=4)
    mean = sum(2.0 * e["lora_B"] @ e["lora_A"] for e in experts) / 2
    torch.testing.assert_close(2.0 * merged["lora_B"] @ merged["lora_A"], mean, rtol=1e-4, atol=1e-4)


def test_continual_metrics_against_a_hand_computed_matrix():
    acc = [[0.9], [0.6, 0.8], [0.7, 0.5, 1.0]]
    m = continual_metrics(acc)
    assert m["average_accuracy"] == pytest.approx([0.9, 0.7, (0.7 + 0.5 + 1.0) / 3])
    # forgetting: task 0: max(0.9, 0.6) - 0.7 = 0.2; task 1: 0.8 - 0.5 = 0.3
    assert m["forgetting"] == pytest.approx([0.2, 0.3]) and m["average_forgetting"] == pytest.approx(0.25)
    # backward transfer: (0.7 - 0.9 + 0.5 - 0.8) / 2
    assert m["backward_transfer"] == pytest.approx(-0.25)
    assert continual_metrics([[0.5]])["average_forgetting"] == 0.0
    with pytest.raises(ValueError):
        continual_metrics([[0.5], [0.5]])


def test_adapter_parameters_count_trainable_and_total():
    model = continual_model(n=2)
    per_expert = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n) // 2
    hidden = model.config.hidden_size
    layers = model.config.num_hidden_layers
    first = adapter_parameters(model)
    assert first == {"trainable": 2 * per_expert + 2 * hidden * layers, "total": 2 * per_expert + 2 * hidden * layers}
    grow_experts(model, 3, "t1")
    assert adapter_parameters(model) == {
        "trainable": 3 * per_expert + 3 * hidden * layers,
        "total": 5 * per_expert + 5 * hidden * layers,
    }


def test_bad_inputs_fail_clearly_and_change_nothing():
    model = continual_model()
    state = copy.deepcopy(adapter_state_dict(model))
    with pytest.raises(ConfigError, match=">= 1"):
        grow_experts(model, 0, "t1")
    with pytest.raises(ConfigError, match="already has experts"):
        grow_experts(model, 1, "t0")
    assert adapter_state_dict(model).keys() == state.keys() and model.moe_peft_config.num_experts == 2
    with pytest.raises(ConfigError, match="needs a model with a MixLoRA adapter"):
        grow_experts(dense_model(), 1, "t1")
    odd = apply_mixlora(dense_model(), MixLoRAConfig(num_experts=2, expert_r={0: 2}))
    with pytest.raises(ConfigError, match="one rank and alpha"):
        grow_experts(odd, 1, "t1")
