"""MixLoRA's routing and router losses pinned against numbers worked out by hand from the
definitions in the MixLoRA paper, its reference implementation (TUDB-Labs/MoE-PEFT) and
transformers' ``load_balancing_loss_func``; the expected values are written from the formulas,
never produced by this code.

The running example: 4 experts, router logits ``log([1, 2, 3, 4])``, so the router
probabilities are exactly ``[0.1, 0.2, 0.3, 0.4]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_peft_ds import MixLoRAConfig, apply_mixlora
from moe_peft_ds.mixlora import mixlora_layers, router_loss_value
from moe_peft_ds.routing import RouterLosses, RouterStats, route

LOGITS = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).log()
ONE = torch.ones(1, dtype=torch.bool)


def cfg(**kw) -> MixLoRAConfig:
    return MixLoRAConfig(num_experts=4, **kw)


def kept(r) -> dict[int, float]:
    """``{expert: weight}`` of token 0's slots that go to an expert."""
    return {int(e): float(w) for e, w in zip(r.index[0], r.weights[0].detach()) if e < 4}


def test_router_probabilities_are_the_softmax_and_temperature_divides_the_logits():
    torch.testing.assert_close(route(LOGITS, cfg(), ONE).probs, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # softmax(logits / 0.5) = [1, 4, 9, 16] / 30
    torch.testing.assert_close(
        route(LOGITS, cfg(router_temperature=0.5), ONE).probs, torch.tensor([[1.0, 4.0, 9.0, 16.0]]) / 30
    )


def test_topk_keeps_the_k_most_probable_and_renormalises():
    assert kept(route(LOGITS, cfg(top_k=2), ONE)) == pytest.approx({3: 4 / 7, 2: 3 / 7})


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.8, {3: 0.4, 2: 0.3, 1: 0.2}),  # cumulative 0.4, 0.7, 0.9: 0.9 is the first above 0.8, kept
        (0.5, {3: 0.4, 2: 0.3}),  # 0.7 is the first above 0.5
        (0.3, {3: 0.4}),  # the first expert alone exceeds 0.3
        (1.0, {3: 0.4, 2: 0.3, 1: 0.2, 0: 0.1}),  # never exceeded: every expert
    ],
)
def test_dynamic_routing_keeps_experts_up_to_the_first_above_p_without_renormalising(p, expected):
    r = route(LOGITS, cfg(routing="dynamic", top_p=p), ONE)
    assert kept(r) == pytest.approx(expected)
    assert r.index.shape[1] == 4  # no cap: a slot per expert


def test_dynamic_routing_options_renormalise_and_cap():
    r = route(LOGITS, cfg(routing="dynamic", top_p=0.8, top_p_renormalize=True), ONE)
    assert kept(r) == pytest.approx({3: 4 / 9, 2: 3 / 9, 1: 2 / 9})
    r = route(LOGITS, cfg(routing="dynamic", top_p=0.8, top_p_max_experts=2), ONE)
    assert kept(r) == pytest.approx({3: 0.4, 2: 0.3}) and r.index.shape[1] == 2
    r = route(LOGITS, cfg(routing="dynamic", top_p=0.8, top_p_max_experts=2, top_p_renormalize=True), ONE)
    assert kept(r) == pytest.approx({3: 4 / 7, 2: 3 / 7})


def test_switch_routes_to_the_top_expert_with_weight_one_and_the_router_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    r = route(logits, cfg(routing="switch", top_k=1, capacity_factor=4.0), ONE)
    assert kept(r) == pytest.approx({3: 1.0})
    r.weights.sum().backward()
    # d(p3 / stop_grad(p3)) / d logits = (dp3 / dlogits) / p3 = onehot(3) - p
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.1, -0.2, -0.3, 0.6]]))


def test_switch_capacity_over_the_batch_or_each_sequence():
    # 2 sequences of 4 tokens, every token prefers expert 0 of 2; the last token is padding.
    logits = torch.tensor([[2.0, 0.0]]).expand(8, 2)
    valid = torch.tensor([True] * 7 + [False])
    switch = dict(num_experts=2, top_k=1, routing="switch", capacity_factor=1.0)
    batch = route(logits, MixLoRAConfig(**switch), valid, sequence=4)
    # capacity ceil(1.0 * 7 real tokens / 2) = 4: tokens 0-3 keep expert 0
    assert batch.index[:, 0].tolist() == [0, 0, 0, 0, 2, 2, 2, 2] and batch.dropped.item() == 3
    per_seq = route(logits, MixLoRAConfig(**switch, capacity_scope="sequence"), valid, sequence=4)
    # per sequence: ceil(4 / 2) = 2 and ceil(3 / 2) = 2, tokens queue within their sequence
    assert per_seq.index[:, 0].tolist() == [0, 0, 2, 2, 0, 0, 2, 2] and per_seq.dropped.item() == 3


def stats(probs: list[list[float]], experts: list[int], valid: list[bool] | None = None) -> RouterStats:
    """A layer's statistics for top-1 routing to ``experts`` with router probabilities ``probs``."""
    p, m = torch.tensor(probs), torch.tensor(valid or [True] * len(probs))
    counts = torch.zeros(p.shape[1]).index_add_(0, torch.tensor(experts)[m], torch.ones(int(m.sum())))
    z = torch.logsumexp(p.log(), -1).pow(2)  # logits log p: logsumexp = log 1 = 0
    return RouterStats(counts, (p * m[:, None]).sum(0), (z * m).sum(), m.sum().float())


def test_balancing_loss_pooled_over_layers_and_per_layer_sum_by_hand():
    # layer 0: both tokens to expert 0, P = [1.5, 0.5]; layer 1: both to expert 1, P = [0.5, 1.5]
    layer0 = stats([[0.9, 0.1], [0.6, 0.4]], [0, 0])
    layer1 = stats([[0.2, 0.8], [0.3, 0.7]], [1, 1])
    pooled, summed = RouterLosses(pooled=True), RouterLosses(pooled=False)
    for pool in (pooled, summed):
        pool.record(0, layer0)
        pool.record(1, layer1)
    # pooled: f = [2, 2] / 4, P = [2, 2] / 4 -> 2 * (0.25 + 0.25) = 1.0 (transformers over both layers' logits)
    assert pooled.value(1.0, 0.0).item() == pytest.approx(1.0)
    # per layer: 2 * (1 * 0.75) = 1.5 each, summed 3.0
    assert summed.value(1.0, 0.0).item() == pytest.approx(3.0)
    # d/dP_l of coef * E * sum_e (C_e / N)(P_e / N) = coef * E * C / N^2; d/dz_sum = coef_z / N
    torch.testing.assert_close(
        pooled.gradient(pooled.layers, 0, 0.5, 0.1), torch.tensor([0.5 * 2 * 2 / 16, 0.5 * 2 * 2 / 16, 0.1 / 4])
    )
    torch.testing.assert_close(
        summed.gradient(summed.layers, 1, 0.5, 0.1), torch.tensor([0.0, 0.5 * 2 * 2 / 4, 0.1 / 2])
    )


def test_each_forward_keeps_its_own_pass_until_its_backward():
    """Two forwards, then one backward of both losses: each forward's router gradient is its own
    pooled loss's, as if each had been backpropagated alone."""
    model = apply_mixlora(three_layer_llama(), MixLoRAConfig(num_experts=4, router_aux_loss_coef=1.0))
    batches = [torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    routers = [layer.adapter.router.weight for _, layer in mixlora_layers(model)]
    alone = []
    for ids in batches:
        (model(input_ids=ids).logits * 0).sum().backward()
        alone.append([w.grad.clone() for w in routers])
        model.zero_grad()
    sum((model(input_ids=ids).logits * 0).sum() for ids in batches).backward()
    for w, a, b in zip(routers, *alone):
        torch.testing.assert_close(w.grad, a + b, rtol=1e-6, atol=1e-9)


def test_padding_is_left_out_of_the_pooled_losses():
    layer0 = stats([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]], [0, 0, 1], valid=[True, True, False])
    pool = RouterLosses()
    pool.record(0, layer0)
    assert pool.value(1.0, 0.0).item() == pytest.approx(1.5)  # as if the padded token were not there


def test_z_loss_is_the_mean_squared_logsumexp_over_all_layers_tokens():
    # logits [0, 0] and [log 3, 0]: logsumexp log 2 and log 4 = 2 log 2
    layer0 = RouterStats(torch.zeros(2), torch.zeros(2), torch.tensor(math.log(2) ** 2), torch.tensor(1.0))
    layer1 = RouterStats(torch.zeros(2), torch.zeros(2), torch.tensor(4 * math.log(2) ** 2), torch.tensor(1.0))
    pool = RouterLosses()
    pool.record(0, layer0)
    pool.record(1, layer1)
    assert pool.value(0.0, 1.0).item() == pytest.approx(2.5 * math.log(2) ** 2)
    single = route(
        torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]),
        MixLoRAConfig(num_experts=2, top_k=1),
        torch.ones(2, dtype=torch.bool),
    )
    from moe_peft_ds.routing import z_loss

    assert z_loss(single, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(2.5 * math.log(2) ** 2)


def three_layer_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    config.pad_token_id = 0
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("top_k", [1, 2])
def test_pooled_loss_equals_transformers_over_three_layers_with_padding(top_k):
    coef = 0.01
    model = apply_mixlora(three_layer_llama(), MixLoRAConfig(num_experts=4, top_k=top_k, router_aux_loss_coef=coef))
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    logits = []
    routers = [layer.adapter.router for _, layer in mixlora_layers(model)]
    hooks = [r.register_forward_hook(lambda m, a, out: logits.append(out)) for r in routers]
    out = model(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    assert len(logits) == 3
    # transformers' loss on copies of the logits: its gradient is then the direct one (backward
    # through the model would also pass the layers' attached losses, which inject their gradient)
    leaves = [x.detach().clone().requires_grad_(True) for x in logits]
    expected = coef * load_balancing_loss_func(tuple(leaves), num_experts=4, top_k=top_k, attention_mask=mask)
    torch.testing.assert_close(router_loss_value(model), expected.detach(), rtol=1e-6, atol=1e-9)
    want = torch.autograd.grad(expected, leaves)
    for x in logits:
        x.retain_grad()
    (out * 0).sum().backward()  # only the attached router losses send a gradient
    for x, g in zip(logits, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(x.grad, g, rtol=1e-6, atol=1e-9)


def test_per_layer_sum_is_the_sum_of_each_layers_transformers_loss():
    model = apply_mixlora(
        three_layer_llama(),
        MixLoRAConfig(num_experts=4, router_aux_loss_coef=1.0, router_aux_loss_pooling="per_layer_sum"),
    )
    ids = torch.randint(1, 97, (2, 8))
    logits = []
    hooks = [
        layer.adapter.router.register_forward_hook(lambda m, a, out: logits.append(out))
        for _, layer in mixlora_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    expected = sum(load_balancing_loss_func((x,), num_experts=4, top_k=2) for x in logits)
    torch.testing.assert_close(router_loss_value(model), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("routing, experts_see_noise", [("topk", True), ("dynamic", True), ("switch", False)])
def test_jitter_multiplies_the_router_input_and_with_topk_and_dynamic_the_experts_input(routing, experts_see_noise):
    eps = 0.5
    model = apply_mixlora(
        three_layer_llama(),
        MixLoRAConfig(
            num_experts=4,
            routing=routing,
            jitter_noise=eps,
            top_p=1.0,
            top_p_renormalize=True,
            capacity_factor=4.0,
            attention_targets=[],
        ),
    )
    _, layer = mixlora_layers(model)[0]
    layer.train()
    x = torch.randn(2, 5, 32)
    seen = []
    hook = layer.adapter.router.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    torch.manual_seed(7)
    out = layer(x)
    hook.remove()
    torch.manual_seed(7)
    noise = torch.empty(10, 32).uniform_(1 - eps, 1 + eps)  # the layer's one draw, [tokens, hidden]
    torch.testing.assert_close(seen[0], x.reshape(10, 32) * noise)
    # zero-initialised experts with weights summing to 1: the frozen FFN of what the experts see
    experts_in = x * noise.view(2, 5, 32) if experts_see_noise else x
    with torch.no_grad():
        torch.testing.assert_close(out, layer.base(experts_in), rtol=1e-5, atol=1e-6)


def test_a_config_saved_before_these_options_reloads_with_the_rules_it_was_trained_with():
    from dataclasses import asdict

    from moe_peft_ds.config import LoRAConfig

    saved = asdict(MixLoRAConfig(model_type="llama", routing="dynamic", top_k=3))
    for key in (
        "top_p_renormalize",
        "top_p_max_experts",
        "router_aux_loss_pooling",
        "adapter_dtype",
        "router_temperature",
        "capacity_scope",
    ):
        del saved[key]
    old = LoRAConfig.from_dict(saved)
    assert (old.top_p_renormalize, old.top_p_max_experts, old.router_aux_loss_pooling, old.adapter_dtype) == (
        True,
        3,
        "per_layer_sum",
        "base",
    )
    assert (old.router_temperature, old.capacity_scope) == (0.0, "batch")  # what every earlier config did
    r = route(LOGITS, old, ONE)
    assert kept(r) == pytest.approx({3: 4 / 9, 2: 3 / 9, 1: 2 / 9})  # renormalised, as it trained
