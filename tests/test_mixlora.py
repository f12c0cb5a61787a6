"""MixLoRA / MixDoRA on dense models: routing, losses, the two execution paths, checkpoints."""

import copy

import pytest
import torch
import transformers as tf
from tiny_models import tiny_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_peft_ds import ConfigError, MixLoRAConfig, apply_mixlora, load_adapter, merge_adapter, save_adapter
from moe_peft_ds.mixlora import MixLoRAFFN, mixlora_layers, set_fast_path
from moe_peft_ds.modules import UnsupportedModelError
from moe_peft_ds.routing import Routing, load_balancing_loss, route, z_loss

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
DENSE = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**COMMON, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8),
}
ROUTINGS = ("topk", "dynamic", "switch")


def dense_model(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = DENSE[kind]()
    cfg._attn_implementation = "eager"
    cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = 0
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def randomize(model, seed: int = 0) -> None:
    """Non-zero B everywhere (they start at zero) and magnitudes off their initial norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if p.dim() == 3:  # stacked experts: ranks beyond an expert's own stay zero
                    lora = model.get_submodule(name.rpartition(".")[0])
                    for slot, r in enumerate(lora.ranks):
                        p[slot, :, r:] = 0
            elif p.requires_grad and "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(DENSE))
@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_zero_init_equals_the_base_model_for_every_family_and_routing(kind, method, batch):
    base = dense_model(kind)
    with torch.no_grad():
        expected = base(**batch).logits
    for routing in ROUTINGS:
        # Dynamic routing keeps the router probabilities as weights (the reference's rule): their sum,
        # below 1, scales the frozen FFN unless renormalised (pinned in test_routing_formulas).
        cfg = MixLoRAConfig(
            method=method, routing=routing, top_k=2, num_experts=4, top_p_renormalize=routing == "dynamic"
        )
        model = apply_mixlora(copy.deepcopy(base), cfg)
        assert len(mixlora_layers(model)) == 2
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_fast_path_equals_reference_path_in_loss_and_gradients(routing, method, batch):
    cfg = MixLoRAConfig(
        method=method,
        routing=routing,
        num_experts=4,
        top_k=2,
        router_z_loss_coef=1e-3,
        expert_r={1: 4},
        expert_alpha={2: 8.0},
    )
    model = apply_mixlora(dense_model(), cfg)
    randomize(model)
    model.train()
    set_fast_path(model, True)
    fast_loss, fast = grads(model, batch)
    set_fast_path(model, False)
    ref_loss, ref = grads(model, batch)
    assert fast_loss == pytest.approx(ref_loss, rel=1e-6)
    assert (
        fast.keys() == ref.keys()
        and any("router" in n for n in fast)
        and any("magnitude" in n for n in fast) == (method == "mixdora")
    )
    for name, g in ref.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_fast_path_with_ffn_biases_equals_reference(batch):
    torch.manual_seed(0)
    cfg = DENSE["llama"]()
    cfg.mlp_bias, cfg._attn_implementation, cfg.pad_token_id = True, "eager", 0
    model = apply_mixlora(tf.AutoModelForCausalLM.from_config(cfg), MixLoRAConfig(num_experts=4, routing="switch"))
    randomize(model)
    model.train()
    fast_loss, fast = grads(model, batch)
    set_fast_path(model, False)
    ref_loss, ref = grads(model, batch)
    assert fast_loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_load_balancing_loss_matches_mixtral_with_padding_excluded():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    mask = torch.tensor([1] * 9 + [0] * 3)
    cfg = MixLoRAConfig(num_experts=4, top_k=2)
    routing = route(logits, cfg, mask.bool())
    expected = load_balancing_loss_func((logits,), num_experts=4, top_k=2, attention_mask=mask[None])
    torch.testing.assert_close(load_balancing_loss(routing, mask.bool()), expected)
    # by hand on a fixed routing: 2 tokens, top-1 both to expert 0, probabilities known
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    fixed = Routing(
        probs,
        torch.zeros(2, 1, dtype=torch.long),
        probs,
        probs.log(),
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros((), dtype=torch.long),
    )
    assert load_balancing_loss(fixed, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(4 * 1.0 * 0.6)
    assert z_loss(fixed, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(
        float(torch.logsumexp(probs.log(), -1).pow(2).mean())
    )


def test_padding_takes_no_expert_and_does_not_change_the_losses(batch):
    model = apply_mixlora(dense_model(), MixLoRAConfig(num_experts=4, router_z_loss_coef=1e-2))
    randomize(model)
    with torch.no_grad():
        model(**batch)  # the model's hook hands the attention mask to the layers
    layer = mixlora_layers(model)[0][1]
    assert torch.equal(layer.token_mask, batch["attention_mask"])
    hidden = torch.randn(1, 5, 32)
    with torch.no_grad():
        layer.token_mask = torch.tensor([[1, 1, 1, 0, 0]])
        padded = layer(hidden)
        padded_aux = layer.last_stats["aux_loss"]
        layer.token_mask = None
        short = layer(hidden[:, :3])
    torch.testing.assert_close(layer.last_stats["aux_loss"], padded_aux)  # the losses see the 3 real tokens only
    torch.testing.assert_close(padded[:, :3], short)
    with torch.no_grad():
        torch.testing.assert_close(padded[:, 3:], layer.base(hidden[:, 3:]))  # padding: the frozen FFN only


def test_switch_routing_trains_its_router_with_a_z_loss_by_default():
    assert MixLoRAConfig(routing="switch").router_z_loss_coef == 0.001
    assert MixLoRAConfig(routing="topk").router_z_loss_coef == 0.0
    assert MixLoRAConfig(routing="switch", router_z_loss_coef=0.0).router_z_loss_coef == 0.0


def test_jitter_noise_perturbs_routing_only_while_training():
    model = apply_mixlora(dense_model(), MixLoRAConfig(num_experts=4, jitter_noise=0.5))
    randomize(model)  # experts that differ, so that the routing shows in the output
    layer = mixlora_layers(model)[0][1]
    hidden = torch.randn(1, 16, 32)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(hidden), layer(hidden))
        layer.train()
        torch.manual_seed(0)
        first = layer(hidden)
        torch.manual_seed(1)
        assert not torch.allclose(first, layer(hidden), atol=1e-4)


def test_switch_drops_tokens_beyond_capacity_and_counts_them():
    logits = torch.zeros(10, 4)
    logits[:, 2] = 5.0  # every token wants expert 2
    valid = torch.ones(10, dtype=torch.bool)
    valid[9] = False  # padding takes no capacity
    r = route(logits, MixLoRAConfig(num_experts=4, top_k=1, routing="switch", capacity_factor=1.0), valid)
    assert r.index[:3, 0].tolist() == [2, 2, 2]  # capacity ceil(1.0 * 9 / 4) = 3, in token order
    assert (r.index[3:, 0] == 4).all() and r.dropped.item() == 6
    assert (r.weights[3:] == 0).all() and (r.weights[:3] == 1).all()
    layer_model = apply_mixlora(
        dense_model(), MixLoRAConfig(num_experts=4, top_k=1, routing="switch", capacity_factor=0.25)
    )
    with torch.no_grad():
        layer_model(input_ids=torch.randint(1, 97, (2, 12)))
    assert all(layer.last_stats["dropped"] > 0 for _, layer in mixlora_layers(layer_model))


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_save_and_load_give_bit_identical_outputs(method, batch, tmp_path):
    cfg = MixLoRAConfig(method=method, num_experts=4, top_k=2, expert_r={0: 2}, attention_targets=["q_proj", "v_proj"])
    model = apply_mixlora(dense_model(), cfg)
    randomize(model)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert state["layers.0.mixlora.experts.0.gate_proj.lora_A"].shape == (2, 32)  # its own rank, not padded
    assert state["layers.0.mixlora.experts.1.down_proj.lora_B"].shape == (32, 8)
    assert ("layers.1.mixlora.experts.3.up_proj.magnitude" in state) == (method == "mixdora")
    assert "model.layers.0.self_attn.q_proj.lora_A" in state and "model.layers.0.self_attn.k_proj.lora_A" not in state
    reloaded = load_adapter(dense_model(), tmp_path)
    assert reloaded.moe_peft_config == model.moe_peft_config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_dora_magnitudes_and_router_train_and_padded_ranks_stay_zero(batch):
    model = apply_mixlora(dense_model(), MixLoRAConfig(method="mixdora", num_experts=4, expert_r={3: 2}))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before if "magnitude" in n)
    assert any(not torch.equal(after[n], before[n]) for n in before if "router" in n)
    lora = mixlora_layers(model)[0][1].adapter.lora["gate_proj"]
    assert lora.ranks == [8, 8, 8, 2] and (lora.lora_A[3, 2:] == 0).all() and (lora.lora_B[3, :, 2:] == 0).all()


@pytest.mark.parametrize("reentrant", [True, False])
def test_aux_loss_gradients_survive_activation_checkpointing(reentrant, batch):
    cfg = MixLoRAConfig(num_experts=4, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    plain = apply_mixlora(dense_model(), cfg)
    randomize(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.enable_input_require_grads()  # frozen embeddings: re-entrant checkpointing needs an input with grad
    plain.train(), checkpointed.train()
    _, expected = grads(plain, batch)
    _, got = grads(checkpointed, batch)
    routers = [n for n in expected if "router" in n]
    assert routers and got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the auxiliary losses really contribute: without them the router gradient differs
    no_aux = apply_mixlora(dense_model(), MixLoRAConfig(num_experts=4, router_aux_loss_coef=0.0))
    no_aux.load_state_dict(plain.state_dict())
    no_aux.train()
    _, without = grads(no_aux, batch)
    assert not torch.allclose(without[routers[0]], expected[routers[0]])


def test_merge_is_refused_but_attention_lora_merges_alone(batch):
    model = apply_mixlora(dense_model(), MixLoRAConfig(num_experts=4))
    randomize(model)
    with pytest.raises(ValueError, match="routed mixture"):
        merge_adapter(model)
    with torch.no_grad():
        before = model(**batch).logits
        merge_adapter(model, attention_only=True)
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    assert model.moe_peft_config.attention_targets == [] and mixlora_layers(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(routing="expert-choice"), "routing"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
        (dict(expert_r={9: 4}), "outside"),
        (dict(expert_r={0: 0}), "r=0"),
        (dict(method="sieve"), "method"),
    ],
)
def test_bad_options_fail_clearly(options, match):
    with pytest.raises(ConfigError, match=match):
        MixLoRAConfig(**options)


def test_moe_models_are_not_dense_families_and_nothing_changes():
    model = tiny_model("mixtral")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(UnsupportedModelError, match="not a supported dense family"):
        apply_mixlora(model)
    assert [n for n, _ in model.named_modules()] == names and not any(
        p.requires_grad is False for p in model.parameters()
    )
    assert not any(isinstance(m, MixLoRAFFN) for m in model.modules())


@pytest.mark.parametrize("dora", [False, True])
def test_one_expert_is_plain_lora_and_matches_peft(dora, batch):
    """With one expert (router weight 1) MixLoRA is LoRA (DoRA) on gate/up/down plus attention:
    the same outputs as PEFT's LoRA with the same weights (DoRA's norm of the shared weight
    expanded, not formed, included)."""
    import peft

    targets = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    ours = apply_mixlora(dense_model(), MixLoRAConfig(method="mixdora" if dora else "mixlora", num_experts=1, top_k=1))
    randomize(ours)
    theirs = peft.get_peft_model(
        dense_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora)
    )
    with torch.no_grad():
        for i, layer in enumerate(theirs.base_model.model.model.layers):
            mix = ours.model.layers[i].mlp
            for name in ("gate_proj", "up_proj", "down_proj"):
                lora, target = mix.adapter.lora[name], getattr(layer.mlp, name)
                target.lora_A["default"].weight.copy_(lora.lora_A[0])
                target.lora_B["default"].weight.copy_(lora.lora_B[0])
                if dora:
                    target.lora_magnitude_vector["default"].weight.copy_(lora.magnitude[0])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mine, target = getattr(ours.model.layers[i].self_attn, name), getattr(layer.self_attn, name)
                target.lora_A["default"].weight.copy_(mine.lora_A)
                target.lora_B["default"].weight.copy_(mine.lora_B)
                if dora:
                    target.lora_magnitude_vector["default"].weight.copy_(mine.magnitude)
        real = batch["attention_mask"].bool()  # padding skips the experts here; PEFT adapts it too
        torch.testing.assert_close(ours(**batch).logits[real], theirs(**batch).logits[real], rtol=1e-5, atol=1e-5)
