"""Expert-selective LoRA on every supported family: equivalence, isolation, size."""

import pytest
import torch
from conftest import randomize_adapters
from tiny_models import router_of, tiny_model

from moe_peft_ds import AdapterConfig, all_experts_selection, apply_sieve_lora
from moe_peft_ds.backends.hf import (
    FusedExpertsWithLoRA,
    UnsupportedModelError,
    attention_projections,
    describe_model,
    find_moe_blocks,
)
from moe_peft_ds.lora import LoRALinear

SELECT = [1, 4, 6]


SHARED = ("qwen2_moe", "deepseek_v3")  # the tiny families with shared experts


def selection_for(model, ids=SELECT):
    return {layer: list(ids) for layer in describe_model(model)["moe_layers"]}


@pytest.mark.parametrize("dora", [False, True])
def test_zero_init_matches_base(family, batch, dora):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(**batch).logits
    apply_sieve_lora(
        model,
        selection_for(model),
        AdapterConfig(
            use_dora=dora, shared_expert_lora=family in SHARED, attention_targets=attention_projections(model)
        ),
    )
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_base_experts_module_is_reproduced_exactly(family):
    """With zero adapters, our grouped forward equals the transformers experts forward."""
    model = tiny_model(family)
    block = find_moe_blocks(model)[0]
    base = block.experts
    torch.manual_seed(0)
    hidden = torch.randn(20, model.config.hidden_size)
    _, weights, index = router_of(block)(hidden)
    wrapped = FusedExpertsWithLoRA(base, [0, 2], AdapterConfig())
    torch.testing.assert_close(wrapped(hidden, index, weights), base(hidden, index, weights), rtol=1e-5, atol=1e-6)


def test_post_expert_norm_layout_follows_transformers():
    """No family of transformers 5.23 sets ``has_post_expert_norm``, but the interface has it: an
    experts module with the flag and a ``post_expert_norm`` is reproduced as transformers' own
    grouped forward computes it (zero adapters), and its adapters still train."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    model = tiny_model("mixtral")
    base = find_moe_blocks(model)[0].experts
    base.has_post_expert_norm = True
    base.post_expert_norm = torch.nn.LayerNorm(model.config.hidden_size)
    with torch.no_grad():
        base.post_expert_norm.weight.normal_(1, 0.2)
    torch.manual_seed(0)
    hidden = torch.randn(20, model.config.hidden_size)
    weights, index = torch.rand(20, 2), torch.randint(0, 8, (20, 2))
    ref = grouped_mm_experts_forward(base, hidden, index, weights)
    wrapped = FusedExpertsWithLoRA(base, [0, 2], AdapterConfig())
    assert wrapped.layout.post_norm and "post-expert norm" in wrapped.layout.describe()
    torch.testing.assert_close(wrapped(hidden, index, weights), ref, rtol=1e-5, atol=1e-6)
    wrapped(hidden, index, weights).sum().backward()
    assert wrapped.adapters["down_proj"].lora_B.grad.abs().sum() > 0


def test_only_adapters_train_and_get_gradient(family, batch):
    model = tiny_model(family)
    apply_sieve_lora(model, selection_for(model), AdapterConfig())
    randomize_adapters(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, p in model.named_parameters():
        is_adapter = "lora_" in name or "magnitude" in name
        assert p.requires_grad == is_adapter, name
        if not is_adapter:
            assert p.grad is None, name


def test_gradient_isolation_per_expert(family):
    """An expert's adapter gets gradient only from the tokens routed to it, and changing one
    expert's adapter changes only the outputs of tokens routed to that expert."""
    model = tiny_model(family)
    block = find_moe_blocks(model)[0]
    wrapped = FusedExpertsWithLoRA(block.experts, [1, 4], AdapterConfig())
    randomize_adapters(wrapped)
    hidden = torch.randn(6, model.config.hidden_size)
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2], [1, 3], [5, 6]])  # expert 4 only on token 2
    weights = torch.full((6, 2), 0.5)
    before = wrapped(hidden, index, weights).detach()
    with torch.no_grad():
        wrapped.adapters["down_proj"].lora_B[1].add_(1.0)  # slot 1 is expert 4
    after = wrapped(hidden, index, weights)
    changed = (after - before).abs().amax(dim=1) > 0
    assert changed.tolist() == [False, False, True, False, False, False]
    # Gradients: only token 2 flows into expert 4's slot; no token reaches a slot twice wrongly.
    hidden.requires_grad_(True)
    loss = wrapped(hidden, index, weights)[2].sum()
    loss.backward()
    for adapter in wrapped.adapters.values():
        assert adapter.lora_A.grad[0].abs().sum() == 0  # expert 1 is not routed from token 2
        assert adapter.lora_B.grad[1].abs().sum() > 0
    assert hidden.grad[[0, 1, 3, 4, 5]].abs().sum() == 0


def _wrapped_block(family, expert_ids, dora=False):
    model = tiny_model(family)
    wrapped = FusedExpertsWithLoRA(find_moe_blocks(model)[0].experts, expert_ids, AdapterConfig(use_dora=dora))
    randomize_adapters(wrapped)
    return wrapped, model.config.hidden_size


@pytest.mark.parametrize("dora", [False, True])
def test_no_token_on_a_selected_expert_gives_the_base_output(family, dora):
    wrapped, H = _wrapped_block(family, [6, 7], dora)
    hidden = torch.randn(4, H)
    index, weights = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]]), torch.full((4, 2), 0.5)
    torch.testing.assert_close(
        wrapped(hidden, index, weights), wrapped.base(hidden, index, weights), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("dora", [False, True])
def test_masked_slots_are_dropped(family, dora):
    """transformers marks a dropped top-k slot with expert index E; it must contribute nothing."""
    wrapped, H = _wrapped_block(family, [1, 2], dora)
    E = wrapped.num_experts
    hidden = torch.randn(5, H)
    index = torch.tensor([[0, 1], [2, E], [1, 2], [E, 3], [1, 0]])
    weights = torch.rand(5, 2)
    kept = torch.where(index == E, torch.zeros_like(index), index)  # any real expert, with weight 0
    ref = wrapped(hidden, kept, torch.where(index == E, torch.zeros_like(weights), weights))
    torch.testing.assert_close(wrapped(hidden, index, weights), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_parameter_count_is_selected_experts_times_expert_size(family, dora):
    model = tiny_model(family)
    cfg = AdapterConfig(r=4, use_dora=dora)
    sel = selection_for(model)
    apply_sieve_lora(model, sel, cfg)
    experts = find_moe_blocks(model)[0].experts
    H = model.config.hidden_size
    I = experts.base.down_proj.shape[2] if not experts.layout.transposed else experts.base.down_proj.shape[1]
    per_expert = cfg.r * (H + 2 * I) + cfg.r * (I + H) + ((2 * I + H) if dora else 0)
    n_selected = sum(len(v) for v in sel.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_selected * per_expert


def test_all_experts_baseline_uses_same_code(family):
    model = tiny_model(family)
    sel = all_experts_selection(model)
    apply_sieve_lora(model, sel, AdapterConfig(method="lora"))
    wrapped = [m for m in model.modules() if isinstance(m, FusedExpertsWithLoRA)]
    assert len(wrapped) == len(sel)
    assert all(m.expert_ids == list(range(m.num_experts)) for m in wrapped)


def test_attention_and_shared_expert_lora_are_optional(family):
    model = tiny_model(family)
    apply_sieve_lora(model, selection_for(model), AdapterConfig())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # off by default for the sieve
    model = tiny_model(family)
    mla = family == "deepseek_v3"  # MLA: q_proj (no q_lora_rank here), kv_a_proj_with_mqa, kv_b_proj, o_proj
    targets = ["q_proj", "kv_b_proj"] if mla else ["q_proj", "v_proj"]
    with pytest.raises(
        UnsupportedModelError, match="not attention projections"
    ):  # named, absent: refused, nothing changed
        apply_sieve_lora(
            model, selection_for(model), AdapterConfig(attention_targets=["v_proj" if mla else "kv_b_proj"])
        )
    assert not any(p.requires_grad is False for p in model.parameters()) and not hasattr(model, "moe_peft_config")
    if family not in SHARED:
        with pytest.raises(UnsupportedModelError, match="no shared experts"):
            apply_sieve_lora(model, selection_for(model), AdapterConfig(shared_expert_lora=True))
    apply_sieve_lora(
        model, selection_for(model), AdapterConfig(attention_targets=targets, shared_expert_lora=family in SHARED)
    )
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert {n.rsplit(".", 1)[1] for n in names if "self_attn" in n} == set(targets)
    assert any("shared_expert" in n for n in names) == (family in SHARED)


def test_training_moves_only_selected_adapters(family, batch):
    model = tiny_model(family)
    apply_sieve_lora(model, selection_for(model), AdapterConfig(use_dora=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n or "magnitude" in n for n in moved)
    assert any("magnitude" in n for n in moved)  # DoRA magnitudes train


def test_unsupported_model_names_supported_families():
    import transformers as tf

    model = tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(UnsupportedModelError, match="mixtral.*qwen2_moe|supported"):
        apply_sieve_lora(model, {0: [0]})
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


@pytest.mark.parametrize("r", [2, 3, 8])
def test_expert_lora_updates_only_selected_rows_with_exact_gradients(r):
    """Every row gets an update, zero on experts without an adapter. r=2 or 3 in fp32 is not
    16-byte aligned and takes transformers' per-expert loop; r=8 takes torch's grouped GEMM, which
    leaves the rows past the selected experts uninitialised (forward and input gradient): both
    must be masked, or garbage reaches the unselected rows and x's gradient."""
    from moe_peft_ds.lora import ExpertLoRA

    torch.manual_seed(0)
    weight = torch.randn(4, 8, 12)
    lora = ExpertLoRA([1, 3], weight, AdapterConfig(r=r, alpha=r))
    with torch.no_grad():
        lora.lora_B.normal_()
    counts = torch.tensor([2, 3, 1, 4])
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(10, 12, requires_grad=True)
    delta, scale = lora(x, expert_of_row, counts, weight)
    assert scale is None
    want = torch.stack(
        [
            x[i] @ lora.lora_A[lora.slot[int(e)]].t() @ lora.lora_B[lora.slot[int(e)]].t()
            if int(e) in (1, 3)
            else x.new_zeros(8)
            for i, e in enumerate(expert_of_row)
        ]
    )
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(delta)
    (delta * grad_out).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    want = torch.stack(
        [
            x_ref[i] @ lora.lora_A[lora.slot[int(e)]].t() @ lora.lora_B[lora.slot[int(e)]].t()
            if int(e) in (1, 3)
            else x_ref.new_zeros(8)
            for i, e in enumerate(expert_of_row)
        ]
    )
    (want * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert (x.grad[~torch.isin(expert_of_row, torch.tensor([1, 3]))] == 0).all()


def test_grouped_gemm_alignment_rule_accepts_transposed_expert_weights():
    """torch's rule: one of the last two strides 1, the other a multiple of 16 bytes. The transposed
    view of a contiguous [E, out, in] weight qualifies (the base experts must take the grouped GEMM,
    not the per-expert loop); rows of 2 fp32 values (8 bytes) do not."""
    from moe_peft_ds.lora import _aligned

    w = torch.randn(4, 32, 16)
    assert _aligned(w) and _aligned(w.transpose(1, 2))
    assert not _aligned(torch.randn(4, 16, 2))  # row-major rows of 8 bytes
    assert _aligned(torch.randn(4, 2, 16).transpose(1, 2))  # column-major, columns of 64 bytes
    assert not _aligned(torch.randn(65)[1:].view(4, 16))  # start not 16-byte aligned


def test_lora_groups_one_per_adapter_covering_every_expert():
    from moe_peft_ds.lora import lora_groups

    assert lora_groups([2, 3, 7], 10) == [2, 6, 9]  # groups 0-2, 3-6, 7-9
    assert lora_groups([0, 1, 2], 3) == [0, 1, 2]  # every expert: one group each
    assert lora_groups([0], 4) == [3]
    assert lora_groups([3], 4) == [3]
    for bad in ([3, 1], [], [4]):
        with pytest.raises(ValueError, match="ascending"):
            lora_groups(bad, 4)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("slots", [[1, 4, 6], [0, 1, 7], [3], [0, 2, 4]])
def test_grouped_update_equals_one_group_per_expert(slots, dora):
    """Running the LoRA GEMMs over ``lora_groups`` (one group per adapter, the unadapted experts'
    rows in it scaled by 0) gives the update, DoRA scale and every gradient of one group per expert with
    zero adapters spread to the unadapted ones; an expert with no rows (count 0) included. fp32,
    tight tolerances."""
    from moe_peft_ds.lora import dora_scale, lora_groups, stacked_lora_update

    torch.manual_seed(0)
    num, n, r, out_f, in_f = 8, len(slots), 4, 12, 16
    counts = torch.tensor([3, 0, 5, 2, 4, 1, 6, 2])
    expert_of_row = torch.repeat_interleave(torch.arange(num), counts)
    base = torch.randn(n, out_f, in_f)
    leaves = [torch.randn(n, r, in_f), torch.randn(n, out_f, r), torch.rand(n) + 0.5]
    magnitude = dora_scale(base, leaves[0], leaves[1], leaves[2], torch.ones(n, out_f)).detach() if dora else None
    x0 = torch.randn(int(counts.sum()), in_f)
    grad_out = torch.randn(len(x0), out_f)
    scalings = torch.zeros(num).index_copy_(0, torch.tensor(slots), leaves[2])
    results = []
    for groups in (None, (torch.tensor(lora_groups(slots, num)), scalings)):
        A, B = (t.clone().requires_grad_(True) for t in leaves[:2])
        m = magnitude.clone().requires_grad_(True) if dora else None
        x = x0.clone().requires_grad_(True)
        stacked = (A, B, leaves[2], m)
        delta, scale = stacked_lora_update(
            x, expert_of_row, counts, stacked, torch.tensor(slots), num, None, base, groups
        )
        y = (
            delta
            if scale is None
            else (x0 @ torch.randn(in_f, out_f, generator=torch.Generator().manual_seed(1)) + delta) * scale
        )
        (y * grad_out).sum().backward()
        results.append([y.detach(), x.grad, A.grad, B.grad] + ([m.grad] if dora else []))
    assert n < num  # the case merges unadapted experts into the adapters' groups
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_trainable_grouped_gemm_operands_are_contiguous_along_their_long_side(family, monkeypatch):
    """Autograd computes a grouped GEMM operand's gradient in the operand's own layout: for LoRA's B
    (``[r, out]`` per group) stored column-major, that is ``[out, S] x [S, r]`` products, several times
    slower on a CPU than the ``[r, S] x [S, out]`` of a row-major copy. Every trainable operand must
    therefore be contiguous along its long side (A: ``in``, B: ``out``)."""
    import moe_peft_ds.lora as lora_mod

    calls = []
    real = lora_mod.grouped_mm

    def recording(x, weight, offsets):
        if weight.requires_grad:
            calls.append((tuple(weight.shape), weight.stride()))
        return real(x, weight, offsets)

    monkeypatch.setattr(lora_mod, "grouped_mm", recording)
    model = tiny_model(family)
    model = apply_sieve_lora(model, selection_for(model), AdapterConfig(r=4, alpha=8))
    randomize_adapters(model)
    model(input_ids=torch.randint(1, 30, (2, 12))).logits.sum().backward()
    assert calls and any(shape[-1] > shape[-2] for shape, _ in calls)  # B's GEMMs are among them
    for (_, k, n), (_, s_k, s_n) in calls:
        assert (s_n == 1) if n > k else (s_k == 1), (k, n, s_k, s_n)


def test_lora_gemms_run_in_bf16_over_bf16_activations_on_a_gpu_only():
    """torch's GPU grouped GEMM has a kernel for bf16 only (other dtypes sync on the offsets); a CPU
    keeps the adapter's dtype. ``tests/gpu`` checks every grouped GEMM of a CUDA bf16 step."""
    from moe_peft_ds.lora import lora_gemm_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    f32, bf16 = torch.float32, torch.bfloat16
    assert lora_gemm_dtype(bf16, f32, cuda) == bf16
    assert lora_gemm_dtype(bf16, f32, cpu) == f32
    assert lora_gemm_dtype(f32, f32, cuda) == f32
    assert lora_gemm_dtype(torch.float16, f32, cuda) == f32
    assert lora_gemm_dtype(bf16, bf16, cpu) == bf16
