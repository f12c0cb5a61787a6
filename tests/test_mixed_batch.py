"""Several sieve adapters on one MoE model, served in one mixed batch: each row (and each
generated sequence) equals running its adapter alone (fp32, 1e-5); one adapter saves as it loaded."""

import pytest
import torch
from conftest import randomize_adapters
from test_export import _base, _load

from moe_peft_ds import AdapterConfig, MixLoRAConfig, apply_sieve_lora, load_adapter, save_adapter
from moe_peft_ds.checkpoint import read_adapter

ADAPTERS = {  # name -> (selection, attention targets): different experts, one without attention LoRA
    "math": ({0: [1, 5], 1: [2]}, ["q_proj"]),
    "code": ({0: [0, 1, 7], 1: [3, 4]}, ["q_proj", "o_proj"]),
    "law": ({1: [6]}, []),
    "chat": ({0: [2], 1: [2, 5]}, ["o_proj"]),
}


def _adapters(tmp_path, family, base):
    for i, (name, (selection, attention)) in enumerate(ADAPTERS.items()):
        model = _load(base)
        cfg = AdapterConfig(
            r=4, alpha=8, attention_targets=attention, shared_expert_lora=family == "qwen2_moe" and i % 2 == 0
        )
        apply_sieve_lora(model, selection, cfg)
        randomize_adapters(model, std=0.3, seed=i)
        save_adapter(model, tmp_path / name)


def _serving(tmp_path, base):
    model = None
    for name in ADAPTERS:
        model = load_adapter(_load(base) if model is None else model, tmp_path / name, adapter_name=name)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_a_mixed_batch_equals_each_adapter_alone(tmp_path, family):
    base = _base(tmp_path, family)
    _adapters(tmp_path, family, base)
    model = _serving(tmp_path, base)
    names = ["code", "math", "law", "code", "chat"]
    ids = torch.randint(1, 97, (5, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = load_adapter(_load(base), tmp_path / name)
            expected = alone(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=1e-5)
    for name in ADAPTERS:  # each adapter saves exactly as it was loaded
        save_adapter(model, tmp_path / f"saved-{name}", adapter=name)
        (cfg, state), (cfg0, state0) = read_adapter(tmp_path / f"saved-{name}"), read_adapter(tmp_path / name)
        assert cfg.selection == cfg0.selection and state.keys() == state0.keys()
        assert all(torch.equal(state[k], state0[k]) for k in state)


def test_generate_with_adapter_names(tmp_path):
    base = _base(tmp_path, "mixtral")
    _adapters(tmp_path, "mixtral", base)
    model = _serving(tmp_path, base)
    names = ["law", "math", "chat", "code"]
    prompts = torch.randint(1, 97, (4, 6), generator=torch.Generator().manual_seed(8))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **settings)
    for row, name in enumerate(names):
        alone = load_adapter(_load(base), tmp_path / name)
        one = alone.generate(prompts[row : row + 1], attention_mask=torch.ones_like(prompts[:1]), **settings)
        assert torch.equal(mixed[row], one[0]), name


def test_names_are_required_and_kinds_do_not_mix(tmp_path):
    from moe_peft_ds.multi_adapter import add_adapter

    base = _base(tmp_path, "mixtral")
    _adapters(tmp_path, "mixtral", base)
    model = load_adapter(_load(base), tmp_path / "math", adapter_name="math")
    ids = torch.ones(2, 3, dtype=torch.long)
    model(input_ids=ids)  # one adapter: no names needed
    load_adapter(model, tmp_path / "law", adapter_name="law")
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="does not carry"):
        model(input_ids=ids, adapter_names=["math", "poetry"])
    with pytest.raises(ValueError, match="cannot join"):
        add_adapter(model, "mix", MixLoRAConfig(num_experts=2, top_k=1))
