"""The MoE families of the installed transformers, found from the experts interface, and tiny
configs of each for tests and the family table of docs/sieve.md.

A family is a causal-LM model type whose modeling module defines a fused experts class, i.e. one
decorated with ``use_experts_implementation`` (its ``forward`` dispatches through the experts
interface). The decorator keeps the layout flags in its closure; they are read from there, so the
family list and each family's layout follow the installed transformers without a registry.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from .hf import ExpertsLayout

# Families no tiny model of which can be built here, with the reason; listed, never silently skipped.
NOT_TINY: dict[str, str] = {}

# Config values that make a model tiny (a few layers, 8 experts, top-2); each is set only where
# the config has that field. Vocabulary 544 fits the bundled demo tokenizer (512, and tokens some tokenizer classes add).
TINY = dict(
    vocab_size=544,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    expert_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    num_hidden_layers=4,
    sliding_window=32,
    num_local_experts=8,
    num_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_topk=2,
    top_k=2,
    moe_k=2,
    top_k_experts=2,
    enable_moe_block=True,
    n_group=2,
    num_expert_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    vocab_size_per_layer_input=512,
    hidden_size_per_layer_input=8,  # Gemma-4's per-layer embeddings
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per-family changes to ``TINY``, each for a reason the family's config or modeling code gives.
TINY_OVERRIDES: dict[str, dict] = {
    "dots1": dict(n_shared_experts=1),  # its default None breaks the shared expert's size
    "dots3_note": dict(num_key_value_heads=4),  # its config requires as many KV heads as query heads
    "dots3_note_text": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),  # its config accepts top-1 only
    "glm_moe_dsa": dict(index_topk=8, index_head_dim=16, index_n_heads=2),  # the sparse-attention indexer
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"] * 2),  # default: Mamba only
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, use_mamba_kernels=False),  # default period 8 > 4 layers
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2, num_dense_layers=1),  # default None breaks the model
    **{
        t: dict(
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=16,
            indexer_compress_ratio=4,
            ngram_vocab_size_base=1000,
            heads_per_ngram=2,
            hc_lowrank=16,
            ple_embed_dim=64,
            split_ngram_parts=4,
        )
        for t in ("qwen4_exp", "qwen4_exp_text")
    },  # its indexer has no defaults; n-gram tables of 20M rows
}


@dataclass(frozen=True)
class Family:
    """One MoE family of the installed transformers."""

    model_type: str
    causal_lm: str  # the class AutoModelForCausalLM builds
    experts_class: type
    layout: ExpertsLayout
    concatenated: bool  # gated tensors stored [gate; up] (else interleaved)
    default_gate: bool  # act(gate) * up, as transformers' default ``_apply_gate``


def _is_fused_experts_class(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    return "experts_interface" in getattr(getattr(forward, "__code__", None), "co_freevars", ())


def experts_flags(cls: type) -> dict:
    """The flags ``use_experts_implementation`` was given for ``cls`` (kept in its ``__init__``'s closure)."""
    init = cls.__init__
    cells = dict(zip(init.__code__.co_freevars, (c.cell_contents for c in init.__closure__ or ())))
    return {k: cells[k] for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")}


def discover_families() -> list[Family]:
    """Every causal-LM model type of the installed transformers with a fused experts class, by model type."""
    import transformers
    from transformers.integrations.moe import _default_apply_gate
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = []
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        try:
            module = importlib.import_module(getattr(transformers, class_name).__module__)
        except (ImportError, AttributeError):  # an optional dependency of that family is missing
            continue
        experts = [
            c
            for c in vars(module).values()
            if inspect.isclass(c) and c.__module__ == module.__name__ and _is_fused_experts_class(c)
        ]
        if not experts:
            continue
        cls = experts[0]
        f = experts_flags(cls)
        layout = ExpertsLayout(
            "gate_up_proj" if f["has_gate"] else "up_proj",
            f["is_transposed"],
            f["has_bias"],
            f["has_gate"],
            f["has_post_expert_norm"],
        )
        families.append(
            Family(model_type, class_name, cls, layout, f["is_concatenated"], cls._apply_gate is _default_apply_gate)
        )
    return families


def supported_model_types() -> list[str]:
    """The transformers model types the sieve adapts: every discovered MoE family."""
    return [f.model_type for f in discover_families()]


def megatron_compatible(family: Family) -> bool:
    """Whether the family's experts have Megatron's ``linear_fc1 = [gate; up]`` / ``linear_fc2`` layout."""
    layout = family.layout
    return (
        layout.has_gate
        and family.concatenated
        and family.default_gate
        and not layout.transposed
        and not layout.has_bias
        and not layout.post_norm
    )


def _keep_every_kind(kinds: list, n: int) -> list:
    """The first ``n`` of a per-layer list, its last entries replaced by kinds the cut would lose."""
    cut = list(kinds[:n])
    lost = [k for k in dict.fromkeys(kinds) if k not in cut]
    return cut[: n - len(lost)] + lost[:n] if lost else cut


def tiny_config(model_type: str, **changes):
    """A tiny config of ``model_type`` (a few layers, 8 experts, top-2; ``changes`` on top); for a
    multimodal model type, the config of its language model."""
    from transformers import CONFIG_MAPPING

    if model_type in NOT_TINY:
        raise ValueError(f"no tiny {model_type} model: {NOT_TINY[model_type]}")
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = default.get_text_config()
    if text is not default:  # a multimodal config: its language model's
        cls, default = type(text), text
    fields = default.to_dict()
    aliases = getattr(cls, "attribute_map", {})  # e.g. num_experts_per_tok -> num_experts_per_token
    wanted = {aliases.get(k, k): v for k, v in {**TINY, **TINY_OVERRIDES.get(model_type, {}), **changes}.items()}
    values = {k: v for k, v in wanted.items() if k in fields}
    if "qk_nope_head_dim" in fields:  # MLA: head_dim names the rotary part; keys and values have every head
        rope, nope = values["qk_rope_head_dim"], values["qk_nope_head_dim"]
        values.update(head_dim=rope, qk_head_dim=rope + nope, num_key_value_heads=values["num_attention_heads"])
        values = {k: v for k, v in values.items() if k in fields}
    vocab = values.get("vocab_size")
    for name, value in fields.items():  # a second vocabulary (e.g. an unpadded one) within the tiny one
        if name.endswith("_vocab_size") and isinstance(value, int) and vocab and value > vocab and name not in values:
            values[name] = vocab
    layers = values.get("num_hidden_layers", TINY["num_hidden_layers"])
    for name, kinds in fields.items():  # per-layer lists (hybrid stacks, dense/sparse): cut, keeping every kind
        if name not in values and isinstance(kinds, list) and len(kinds) == fields.get("num_hidden_layers") and kinds:
            values[name] = _keep_every_kind(kinds, layers)
    config = cls(**values)
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, **changes):
    """A tiny random fp32 causal LM of ``model_type`` in eval mode, its routing untied (``untie_routing``)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return untie_routing(AutoModelForCausalLM.from_config(tiny_config(model_type, **changes))).eval()


def untie_routing(model):
    """Random values for the routers, biases and score corrections a family initialises to zero
    (every token would tie between experts otherwise); returns ``model``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and (p == 0).all() and not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return model
