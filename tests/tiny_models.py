"""Tiny, randomly initialised models of every supported family (fp32, CPU), for tests."""

from __future__ import annotations

import torch
import transformers as tf

from moe_peft_ds.backends import hf_families

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **COMMON,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=40,
        intermediate_size=40,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, intermediate_size=40, head_dim=8
    ),
    "olmoe": lambda: tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},
        intermediate_size=40,
        moe_intermediate_size=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
    ),
    "gpt_oss": lambda: tf.GptOssConfig(
        **COMMON,
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
FAMILY_NAMES = tuple(CONFIGS)


def router_of(block) -> torch.nn.Module:
    """The router of a transformers MoE block (``gate`` in most families, ``router`` in GPT-OSS); the
    tests read it to check what the library reads at the experts' call."""
    return getattr(block.module, "gate", None) or block.module.router


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 causal LM of ``family`` with non-trivial random weights and routing (any
    discovered transformers MoE family beyond the hand-written ones here)."""
    if family not in CONFIGS:
        return hf_families.tiny_model(family, seed)
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = 0
    return hf_families.untie_routing(tf.AutoModelForCausalLM.from_config(cfg)).eval()


def save_tiny_llama(path) -> str:
    """A tiny random LLaMA with the demo tokenizer, saved like a hub checkpoint (for the
    MixLoRA command-line tests); returns the path."""
    from moe_peft_ds.demo import DEMO_MODEL_DIR

    tokenizer = tf.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
