"""Host syncs in the hot path, counted on CPU so that they cannot creep back.

On a GPU every op that needs a device value on the host (``.item()``, ``int(t)``, ``.tolist()``,
``nonzero``, boolean-mask indexing, ``bincount``, ``repeat_interleave`` without ``output_size``)
stalls the CPU until the GPU catches up. A dispatch mode sees those ops here on CPU too, so the
counts below are the syncs a CUDA run would make (``tests/gpu`` checks the same with torch's CUDA
sync debug mode). The floor: no sync in the sieve's experts or on any LoRA path, forward or
backward; one per MixLoRA layer (how many rows are routed, and how many tokens are not); one per
expert-parallel dispatch (the split sizes).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import OpNames
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import moe_peft_ds as mp
from moe_peft_ds.backends.hf import ExpertParallelExperts, FusedExpertsWithLoRA
from moe_peft_ds.config import MixLoRAConfig
from moe_peft_ds.mixlora import MixLoRAFFN, set_fast_path

BOOL = (torch.bool, torch.uint8)


def _syncs(func, args, kwargs) -> bool:
    """Whether this aten call reads a device value on the host (on CUDA)."""
    name = func.overloadpacket.__name__
    if name in (
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "bincount",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    ):
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and not (len(args) > 2 and args[2] is not None)
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else []
        return any(t is not None and t.dtype in BOOL for t in indices)
    return False


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops while ``active`` (set by hooks around the modules under test, and for a
    whole backward). ``.tolist()`` on a CPU tensor bypasses the dispatcher: it is counted by a patch."""

    def __init__(self):
        super().__init__()
        self.active, self.count, self.ops = False, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and _syncs(func, args, kwargs):
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **kwargs)


@contextmanager
def counting(model: torch.nn.Module, module_types: tuple, monkeypatch):
    """A ``SyncCounter`` active inside every module of ``module_types`` of ``model``."""
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        if counter.active:
            counter.count += 1
            counter.ops.append("tolist")
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    handles = []
    for m in model.modules():
        if isinstance(m, module_types):
            handles.append(m.register_forward_pre_hook(lambda *a: setattr(counter, "active", True)))
            handles.append(m.register_forward_hook(lambda *a: setattr(counter, "active", False)))
    try:
        with counter:
            yield counter
    finally:
        for h in handles:
            h.remove()


def _padded_batch(vocab: int):
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


def _forward_backward_syncs(model, module_types, monkeypatch) -> tuple[int, int, list]:
    """(syncs in the modules' forwards, syncs in the whole backward, the ops seen)."""
    ids, mask = _padded_batch(model.config.vocab_size)
    with counting(model, module_types, monkeypatch) as counter:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        forward = counter.count
        counter.active = True
        loss.backward()
        counter.active = False
    return forward, counter.count - forward, counter.ops


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_sieve_experts_never_sync(family, dora, monkeypatch):
    model = mp.apply_sieve_lora(tiny_model(family), {0: [1, 5], 1: [0, 2, 7]}, mp.AdapterConfig(r=8, use_dora=dora))
    model.train()
    forward, backward, ops = _forward_backward_syncs(model, (FusedExpertsWithLoRA,), monkeypatch)
    assert (forward, backward) == (0, 0), ops


def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("routing,method", [("topk", "mixlora"), ("dynamic", "mixdora"), ("switch", "mixlora")])
def test_mixlora_layers_sync_once(routing, method, fast, monkeypatch):
    cfg = MixLoRAConfig(
        method=method,
        use_dora=method == "mixdora",
        num_experts=4,
        top_k=2,
        r=8,
        routing=routing,
        router_z_loss_coef=0.001,
    )
    model = mp.apply_mixlora(_llama(), cfg)
    set_fast_path(model, fast)
    model.train()
    forward, backward, ops = _forward_backward_syncs(model, (MixLoRAFFN,), monkeypatch)
    assert forward == model.config.num_hidden_layers and backward == 0, ops


def _ep_syncs(rank, world, method):
    from moe_peft_ds.parallel import shard_experts

    mpatch = pytest.MonkeyPatch()  # no fixture in a spawned rank
    torch.manual_seed(0)
    placements = None
    if method.startswith("sieve"):
        model = mp.apply_sieve_lora(tiny_model("mixtral"), {0: [1, 5], 1: [0, 2, 7]}, mp.AdapterConfig(r=8))
        types, layers = (ExpertParallelExperts,), 2
    else:
        model = mp.apply_mixlora(_llama(), MixLoRAConfig(num_experts=4, top_k=2, r=8))
        types, layers = (MixLoRAFFN,), model.config.num_hidden_layers
    if method == "sieve-copies":  # selected experts held by both ranks: their adapters are exchanged, no sync
        placements = {0: [[0, 1, 2, 5, 6], [1, 3, 4, 5, 7]], 1: [[0, 2, 4, 6, 7], [0, 1, 3, 5, 7]]}
    shard_experts(model, None, placements)
    model.train()
    try:
        forward, backward, ops = _forward_backward_syncs(model, types, mpatch)
    finally:
        mpatch.undo()
    assert forward == layers and backward == 0, ops


@pytest.mark.parametrize("method", ["sieve", "sieve-copies", "mixlora"])
def test_expert_parallel_dispatch_syncs_once_per_layer(method):
    from distributed import run_ranks

    run_ranks(_ep_syncs, world=2, args=(method,))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_base_experts_and_lora_take_the_grouped_gemm_and_frozen_experts_get_no_gradient(family):
    """The transposed expert weight view is a valid grouped-GEMM operand: the base experts must not
    fall back to transformers' per-expert loop, which syncs on the offsets and, in backward, computes
    the frozen weights' gradient only to throw it away."""
    model = mp.apply_sieve_lora(tiny_model(family), {0: [1, 5], 1: [0, 2, 7]}, mp.AdapterConfig(r=8))
    model.train()
    ids, mask = _padded_batch(model.config.vocab_size)
    with OpNames() as ops:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert not [n for n in ops.names if "fallback" in n]
    gemms = ops.names.count("_grouped_mm") + ops.names.count("grouped_mm")
    assert (
        gemms >= 2 * 2 * 3
    )  # per layer: base + 2 LoRA GEMMs for each of the two expert tensors (and more in backward)
    experts = [m.base for m in model.modules() if isinstance(m, FusedExpertsWithLoRA)]
    assert all(p.grad is None for e in experts for p in e.parameters())
