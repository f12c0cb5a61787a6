"""Sieve LoRA on Megatron-core expert layers, on CPU (one gloo rank; see megatron_cpu for the
CUDA calls the tests patch). Multi-rank checks are in test_megatron_parallel.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import randomize_adapters
from distributed import _free_port
from megatron_cpu import cpu_shims, gpt_moe, grouped_experts, init_parallel, permute, sequential_experts, tiny_config
from torch import nn

from moe_peft_ds import (
    apply_sieve_lora,
    load_adapter,
    merge_adapter,
    profile_routing,
    remove_adapter,
    save_adapter,
    select_experts,
)
from moe_peft_ds.backends.megatron import ExpertLinearLoRA, is_megatron_model
from moe_peft_ds.checkpoint import AdapterMismatchError, convert_adapter
from moe_peft_ds.config import AdapterConfig
from moe_peft_ds.modules import UnsupportedModelError


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    """One gloo rank in this process for the module's tests; nothing of it outlives the module."""
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    init_parallel()
    try:
        with cpu_shims():
            yield
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def experts_model(config, layers: int = 2, grouped: bool = False) -> nn.Module:
    """Bare expert modules in a container (layer index = order)."""
    make = grouped_experts if grouped else sequential_experts
    return nn.ModuleList([make(config, config.num_moe_experts) for _ in range(layers)])


def routed(num_experts: int, T: int = 24, H: int = 16, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    index = torch.rand(T, num_experts, generator=g).topk(k, dim=-1).indices
    weights = torch.rand(T, k, generator=g).softmax(-1)
    return x, index, weights


def run_experts(experts, x, index, weights, num_experts):
    """Megatron's experts on the permuted rows, combined back per token: ``[T, H]``."""
    rows, _, counts, probs, token = permute(x, index, weights, num_experts)
    out, _ = experts(rows, counts, probs)
    return torch.zeros_like(x).index_add(0, token, out)


def expert_weights(seq, e):
    """Expert ``e``'s ``(W1 [2F, H], W2 [H, F])`` and its LoRA modules (or None) in a SequentialMLP."""
    mlp = seq.local_experts[e]
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    lora1 = fc1.lora if isinstance(fc1, ExpertLinearLoRA) else None
    lora2 = fc2.lora if isinstance(fc2, ExpertLinearLoRA) else None
    base = lambda m: m.base if isinstance(m, ExpertLinearLoRA) else m  # noqa: E731
    return base(fc1).weight, base(fc2).weight, lora1, lora2


def reference(seq, x, index, weights):
    """The expert FFN written out in torch: ``sum_j w_j (W2 + s B2 A2) (silu(g) * u)``, ``[g; u] = (W1 + s B1 A1) x``."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(index[t].tolist(), weights[t]):
            W1, W2, l1, l2 = expert_weights(seq, e)
            W1 = W1 if l1 is None else W1 + l1.scaling[0] * l1.lora_B[0] @ l1.lora_A[0]
            W2 = W2 if l2 is None else W2 + l2.scaling[0] * l2.lora_B[0] @ l2.lora_A[0]
            gate, up = (W1 @ x[t]).chunk(2)
            out[t] += w * (W2 @ (F.silu(gate) * up))
    return out


def test_sequential_mlp_sieve_math_isolation_and_tags():
    config = tiny_config()
    model = experts_model(config)
    x, index, weights = routed(4)
    base = [run_experts(m, x, index, weights, 4) for m in model]
    apply_sieve_lora(model, {0: [1, 3], 1: [2]}, AdapterConfig(r=4, alpha=8))
    assert is_megatron_model(model) and model.moe_peft_config.model_type == "megatron"
    # zero-init: B = 0, so the adapted model is the base model exactly
    for m, b in zip(model, base):
        torch.testing.assert_close(run_experts(m, x, index, weights, 4), b, rtol=0, atol=0)
    randomize_adapters(model)
    out = run_experts(model[0], x, index, weights, 4)
    torch.testing.assert_close(out, reference(model[0], x, index, weights), rtol=1e-5, atol=1e-6)
    untouched = ~torch.isin(index, torch.tensor([1, 3])).any(-1)  # tokens routed to unselected experts only
    assert untouched.any()
    torch.testing.assert_close(out[untouched], base[0][untouched], rtol=0, atol=0)
    out.pow(2).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"0.local_experts.{e}.{fc}.lora.{p}"
        for e in (1, 3)
        for fc in ("linear_fc1", "linear_fc2")
        for p in ("lora_A", "lora_B")
    } | {f"1.local_experts.2.{fc}.lora.{p}" for fc in ("linear_fc1", "linear_fc2") for p in ("lora_A", "lora_B")}
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("0.")), (
        "selected experts learn"
    )
    assert all(g is None for n, g in grads.items() if n.startswith("1.")), "layer 1 took no part"
    assert all(p.allreduce is False for p in model.parameters() if p.requires_grad)


def test_sequential_mlp_checkpoint_roundtrip_merge_and_refusals(tmp_path):
    config = tiny_config()
    model = experts_model(config)
    apply_sieve_lora(model, {0: [0, 2], 1: [3]}, AdapterConfig(r=2, alpha=4, use_dora=True))
    randomize_adapters(model)
    x, index, weights = routed(4, seed=3)
    want = [run_experts(m, x, index, weights, 4) for m in model]
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["model_type"] == "megatron" and saved["selection"] == {"0": [0, 2], "1": [3]}
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == {
        f"layers.{L}.experts.{e}.{t}.{p}"
        for L, e in ((0, 0), (0, 2), (1, 3))
        for t in ("gate_up_proj", "down_proj")
        for p in ("lora_A", "lora_B", "magnitude")
    }
    fresh = experts_model(config)
    load_adapter(fresh, tmp_path / "a")
    for m, w in zip(fresh, want):
        torch.testing.assert_close(run_experts(m, x, index, weights, 4), w, rtol=0, atol=0)
    merge_adapter(fresh)
    assert not any(isinstance(m, ExpertLinearLoRA) for m in fresh.modules())
    for m, w in zip(fresh, want):
        torch.testing.assert_close(run_experts(m, x, index, weights, 4), w, rtol=1e-5, atol=1e-6)
    # an adapter for another expert count is refused and the model is left as it was
    other = experts_model(tiny_config(num_moe_experts=8))
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(AdapterMismatchError, match="num_experts"):
        load_adapter(other, tmp_path / "a")
    assert {n: p for n, p in other.named_parameters()}.keys() == before.keys()
    with pytest.raises(ValueError, match=r"expert ids \[4\]; expert ids are integers in \[0, 4\)"):
        apply_sieve_lora(experts_model(config), {0: [4]})
    remove_adapter(model)
    assert not any(p.requires_grad for p in model.parameters()) and not any(
        isinstance(m, ExpertLinearLoRA) for m in model.modules()
    )


def test_grouped_mlp_equals_sequential_mlp_with_the_same_adapter(tmp_path):
    """The legacy GroupedMLP (weights stacked ``[E, in, out]``) with a sieve adapter computes what
    SequentialMLP does with the same expert weights and the same adapter file."""
    config = tiny_config(num_layers=1)
    seq, grouped = experts_model(config, 1), experts_model(config, 1, grouped=True)
    with torch.no_grad():
        E, H = 4, config.hidden_size
        w1, w2 = grouped[0].weight1.view(E, H, -1), grouped[0].weight2.view(E, -1, H)
        for e, mlp in enumerate(seq[0].local_experts):
            w1[e].copy_(mlp.linear_fc1.weight.t())
            w2[e].copy_(mlp.linear_fc2.weight.t())
    x, index, weights = routed(4, seed=5)
    apply_sieve_lora(seq, {0: [1, 2]}, AdapterConfig(r=3, alpha=6))
    randomize_adapters(seq)
    save_adapter(seq, tmp_path / "a")
    load_adapter(grouped, tmp_path / "a")
    for p in grouped.parameters():
        assert not p.requires_grad or p.allreduce is False
    outs = []
    for m in (seq, grouped):
        out = run_experts(m[0], x, index, weights, 4)
        out.pow(2).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for e in (1, 2):
        for fc, t in (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj")):
            lora_seq = getattr(seq[0].local_experts[e], fc).lora
            lora_grp = grouped[0].adapters[t]
            slot = lora_grp.slot[e]
            for p in ("lora_A", "lora_B"):
                torch.testing.assert_close(
                    getattr(lora_grp, p).grad[slot], getattr(lora_seq, p).grad[0], rtol=1e-5, atol=1e-6
                )
    merge_adapter(grouped)  # the plain GroupedMLP's forward needs grouped_gemm and bf16: check the merged weights
    for e in range(4):
        for fc, w in (
            ("linear_fc1", grouped[0].weight1.view(4, 16, -1)[e].t()),
            ("linear_fc2", grouped[0].weight2.view(4, -1, 16)[e].t()),
        ):
            linear = getattr(seq[0].local_experts[e], fc)
            want = linear.merge_into_base().weight if isinstance(linear, ExpertLinearLoRA) else linear.weight
            torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


class GroupedLinearStandIn(nn.Module):
    """The contract of Transformer Engine's grouped linear as TEGroupedMLP uses it
    (``num_gemms``, ``weight{i} [out, in]``, ``forward(x, m_splits) -> (out, bias)``), in torch:
    TE is not installable here. The real TEGroupedMLP is tested below where TE and CUDA exist."""

    def __init__(self, num_gemms, in_f, out_f):
        super().__init__()
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.randn(out_f, in_f) / in_f**0.5))
        self.bias = None

    def forward(self, x, m_splits):
        parts = torch.split(x, list(m_splits))
        return torch.cat([p @ getattr(self, f"weight{i}").t() for i, p in enumerate(parts)]), None


def test_grouped_linear_adapter_adds_lora_on_the_selected_experts_rows_only():
    torch.manual_seed(0)
    base = GroupedLinearStandIn(4, 16, 10).requires_grad_(False)
    wrapped = ExpertLinearLoRA(base, [4 + 1, 4 + 3], AdapterConfig(r=2, alpha=2, use_dora=True), first_expert=4)
    randomize_adapters(wrapped)
    m_splits = [3, 0, 5, 2]
    x = torch.randn(sum(m_splits), 16)
    out, _ = wrapped(x, m_splits)
    ref = []
    for i, part in enumerate(torch.split(x, m_splits)):
        W = getattr(base, f"weight{i}")
        if 4 + i in wrapped.lora.expert_ids:
            s = wrapped.lora.slot[4 + i]
            merged = W + wrapped.lora.lora_B[s] @ wrapped.lora.lora_A[s]
            merged = (wrapped.lora.magnitude[s] / merged.norm(dim=1))[:, None] * merged
            ref.append(part @ merged.t())
        else:
            ref.append(part @ W.t())
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TEGroupedMLP needs Transformer Engine and a GPU")
def test_te_grouped_mlp_equals_sequential_mlp(tmp_path):  # pragma: no cover - runs where TE and CUDA exist
    pytest.importorskip("transformer_engine")
    from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear, TERowParallelGroupedLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron_cpu import pg_collection

    config = tiny_config(num_layers=1, use_cpu_initialization=False)
    te = nn.ModuleList(
        [
            TEGroupedMLP(
                4,
                config,
                MLPSubmodules(linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear),
                pg_collection=pg_collection(),
            )
        ]
    ).cuda()
    seq = experts_model(config, 1).cuda()
    with torch.no_grad():
        for e, mlp in enumerate(seq[0].local_experts):
            getattr(te[0].linear_fc1, f"weight{e}").copy_(mlp.linear_fc1.weight)
            getattr(te[0].linear_fc2, f"weight{e}").copy_(mlp.linear_fc2.weight)
    apply_sieve_lora(seq, {0: [0, 3]}, AdapterConfig(r=2))
    randomize_adapters(seq)
    save_adapter(seq, tmp_path / "a")
    load_adapter(te, tmp_path / "a")
    x, index, weights = (t.cuda() for t in routed(4, seed=7))
    torch.testing.assert_close(
        run_experts(te[0], x, index, weights, 4), run_experts(seq[0], x, index, weights, 4), rtol=1e-4, atol=1e-5
    )


def test_routing_profile_of_a_gpt_moe_model_excludes_padding_and_selects():
    config = tiny_config()
    model = gpt_moe(config)
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    padded = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    apart = profile_routing(model, [{"input_ids": ids[:1, :8]}, {"input_ids": ids[1:]}], progress=False)
    assert padded.tokens == apart.tokens == 20 and padded.samples == 2
    assert padded.counts == apart.counts and sorted(padded.counts) == [0, 1]
    for layer, counts in padded.counts.items():
        assert sum(counts) == 20 * config.moe_router_topk
    torch.testing.assert_close(
        torch.tensor(padded.gate_sums[0]), torch.tensor(apart.gate_sums[0]), rtol=1e-6, atol=1e-6
    )
    selection = select_experts(padded, policy="topk", k=1)
    apply_sieve_lora(model, selection, AdapterConfig(r=2))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * (2 * (16 + 24) + 2 * (12 + 16)), "one expert per layer, fc1 and fc2"
    loss = model(
        ids,
        torch.arange(12).expand(2, 12),
        attention_mask=torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None],
        labels=ids,
    ).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_conversion_megatron_to_transformers_and_back_is_equivalent(tmp_path):
    """A Megatron sieve adapter, converted, gives a transformers Mixtral with the same expert
    weights the same expert outputs; and the other way round."""
    from tiny_models import tiny_model

    from moe_peft_ds import apply_sieve_lora

    hf = tiny_model("mixtral")
    hf_experts = [hf.model.layers[L].mlp.experts for L in range(2)]
    config = tiny_config(hidden_size=32, moe_ffn_hidden_size=24, num_moe_experts=8)

    def twin():
        """Megatron experts holding the transformers model's expert weights."""
        meg = experts_model(config)
        with torch.no_grad():
            for L in range(2):
                for e, mlp in enumerate(meg[L].local_experts):
                    mlp.linear_fc1.weight.copy_(hf_experts[L].gate_up_proj[e])
                    mlp.linear_fc2.weight.copy_(hf_experts[L].down_proj[e])
        return meg

    meg = twin()
    x, index, weights = routed(8, H=32, seed=11)

    def same_outputs(a, b):
        for L in range(2):
            want = a.model.layers[L].mlp.experts(x, index, weights)
            torch.testing.assert_close(run_experts(b[L], x, index, weights, 8), want, rtol=1e-5, atol=1e-6)

    apply_sieve_lora(meg, {0: [1, 6], 1: [0]}, AdapterConfig(r=4, alpha=8))
    randomize_adapters(meg)
    save_adapter(meg, tmp_path / "meg")
    with pytest.raises(ValueError, match="no Megatron counterpart"):
        convert_adapter(tmp_path / "meg", tmp_path / "bad", "gpt_oss")
    convert_adapter(tmp_path / "meg", tmp_path / "hf", "mixtral")
    hf_a = load_adapter(tiny_model("mixtral"), tmp_path / "hf")
    same_outputs(hf_a, meg)

    back = tiny_model("mixtral")
    apply_sieve_lora(back, {0: [2], 1: [5, 7]}, AdapterConfig(r=2, alpha=2))
    randomize_adapters(back, seed=4)
    save_adapter(back, tmp_path / "hf2")
    convert_adapter(tmp_path / "hf2", tmp_path / "meg2", "megatron")
    meg2 = twin()
    load_adapter(meg2, tmp_path / "meg2")
    same_outputs(back, meg2)
    with pytest.raises(ValueError, match="nothing|convert it"):
        convert_adapter(tmp_path / "meg2", tmp_path / "x", "megatron")
    attn = tiny_model("mixtral")
    apply_sieve_lora(attn, {0: [1]}, AdapterConfig(attention_targets=["q_proj"]))
    save_adapter(attn, tmp_path / "attn")
    with pytest.raises(ValueError, match="outside the routed experts"):
        convert_adapter(tmp_path / "attn", tmp_path / "y", "megatron")


def test_unsupported_megatron_models_and_options_are_refused_before_any_change():
    with pytest.raises(UnsupportedModelError, match="no Megatron-core expert layer"):
        apply_sieve_lora(nn.Sequential(nn.Linear(2, 2)), {0: [0]})
    model = experts_model(tiny_config())
    with pytest.raises(ValueError, match="attention"):
        apply_sieve_lora(model, {0: [0]}, AdapterConfig(attention_targets=["q_proj"]))
    assert (
        not any(isinstance(m, ExpertLinearLoRA) for m in model.modules())
        and getattr(model, "moe_peft_config", None) is None
    )
    # SequentialMLP's linears return their bias apart (skip_bias_add), so DoRA applies with biases too
    biased = experts_model(tiny_config(add_bias_linear=True), 1)
    apply_sieve_lora(biased, {0: [0]}, AdapterConfig(use_dora=True))
    x, index, weights = routed(4)
    run_experts(biased[0], x, index, weights, 4).sum().backward()


def _logits(model, ids):
    S = ids.shape[1]
    return model(
        ids, torch.arange(S).expand_as(ids), attention_mask=torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    )


@pytest.mark.parametrize("method", ["mixlora", "mixdora"])
def test_mixlora_on_megatron_dense_mlps_equals_the_transformers_layer(method, tmp_path):
    from megatron_cpu import gpt_dense
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from moe_peft_ds import MixLoRAConfig, apply_mixlora
    from moe_peft_ds.mixlora import MegatronMixLoRAFFN, MixLoRAFFN, new_router_loss_pass

    config = tiny_config(num_moe_experts=None, moe_ffn_hidden_size=None, moe_router_topk=2)
    make_cfg = lambda: MixLoRAConfig(method=method, num_experts=4, top_k=2, r=4, alpha=8, attention_targets=[])  # noqa: E731
    gpt = gpt_dense(config)
    torch.manual_seed(2)
    ids = torch.randint(1, 64, (2, 10))
    base_logits = _logits(gpt, ids)
    apply_mixlora(gpt, make_cfg())
    layers = [m for m in gpt.modules() if isinstance(m, MegatronMixLoRAFFN)]
    assert [m.layer_index for m in layers] == [0, 1] and gpt.moe_peft_config.model_type == "megatron"
    torch.testing.assert_close(_logits(gpt, ids), base_logits, rtol=1e-5, atol=1e-5)  # zero-init B: the base model
    randomize_adapters(gpt)
    # the same layer on a transformers LlamaMLP holding the same weights computes the same thing
    meg = layers[0]
    llama = LlamaMLP(
        LlamaConfig(
            hidden_size=16, intermediate_size=20, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2
        )
    )
    with torch.no_grad():
        gate, up = meg.base.mlp.linear_fc1.weight.chunk(2)
        llama.gate_proj.weight.copy_(gate), llama.up_proj.weight.copy_(up)
        llama.down_proj.weight.copy_(meg.base.mlp.linear_fc2.weight)
    hf = MixLoRAFFN(llama, make_cfg())
    hf.adapter.load_state_dict(meg.adapter.state_dict())
    x = torch.randn(2, 10, 16)
    want = hf(x)
    new_router_loss_pass(gpt)  # the model's router losses then pool this one call, as hf's own do
    got, bias = meg(x.transpose(0, 1))
    assert bias is None
    torch.testing.assert_close(got.transpose(0, 1), want, rtol=1e-5, atol=1e-6)
    want.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for (n, a), b in zip(hf.adapter.named_parameters(), meg.adapter.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    # checkpoint round trip onto a fresh model, and removal
    logits = _logits(gpt, ids)
    save_adapter(gpt, tmp_path / "m")
    fresh = load_adapter(gpt_dense(config), tmp_path / "m")
    torch.testing.assert_close(_logits(fresh, ids), logits, rtol=1e-5, atol=1e-6)
    remove_adapter(fresh)
    torch.testing.assert_close(_logits(fresh, ids), base_logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention_targets"):
        apply_mixlora(gpt_dense(config), MixLoRAConfig())
