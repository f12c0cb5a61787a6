"""The bundled demo models: tiny-mixtral (MoE) and tiny-llama (dense, MixLoRA's base) are built by
one script from one corpus and tokenizer, and are pretrained (not random)."""

import json

import pytest
import torch

from moe_peft_ds import MixLoRAConfig, apply_mixlora
from moe_peft_ds.demo import build_demo, demo_corpus
from moe_peft_ds.models import load_model


def _lm_loss(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_tiny_llama_is_a_pretrained_dense_llama_with_the_demo_tokenizer():
    import transformers as tf

    llama, tok = load_model("tiny-llama")
    _, moe_tok = load_model("tiny-mixtral")
    assert isinstance(llama, tf.LlamaForCausalLM) and llama.config.intermediate_size == 256
    assert tok.get_vocab() == moe_tok.get_vocab()
    texts = [t for docs in demo_corpus(seed=7, n_per_domain=4).values() for t in docs]  # unseen documents
    random_init = tf.LlamaForCausalLM(llama.config).eval()
    trained, untrained = _lm_loss(llama.eval(), tok, texts), _lm_loss(random_init, tok, texts)
    assert trained < 1.5 < 5.0 < untrained, (trained, untrained)
    apply_mixlora(llama, MixLoRAConfig(num_experts=2, top_k=1))  # a supported dense family


@pytest.mark.slow
def test_build_demo_llama_writes_a_loadable_model(tmp_path):
    import transformers as tf

    out = build_demo(tmp_path / "llama", tmp_path / "data", steps=2, seed=3, arch="llama")
    info = json.loads((out / "build_info.json").read_text())
    assert info["arch"] == "llama" and info["steps"] == 2
    assert "--arch llama" in info["command"] and str(tmp_path / "llama") in info["command"]
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, tf.LlamaForCausalLM)
    assert {p.name for p in (tmp_path / "data").iterdir()} == {
        "arithmetic_train.jsonl",
        "arithmetic_eval.jsonl",
        "code_train.jsonl",
        "code_eval.jsonl",
    }


def test_build_demo_refuses_an_unknown_arch_before_writing(tmp_path):
    with pytest.raises(ValueError, match="arch='gpt2'"):
        build_demo(tmp_path / "m", tmp_path / "d", steps=1, arch="gpt2")
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()
