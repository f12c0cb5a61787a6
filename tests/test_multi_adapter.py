"""Several MixLoRA adapters trained in one batch over one frozen base equal each trained alone."""

import copy

import pytest
import torch
from test_mixlora import dense_model, randomize

from moe_peft_ds import MixLoRAConfig, apply_mixlora, load_adapter, save_adapter
from moe_peft_ds.checkpoint import adapter_state_dict, read_adapter, remove_adapter
from moe_peft_ds.multi_adapter import MultiAdapter
from moe_peft_ds.train import train, train_multi_adapter

CONFIGS = {
    "a": MixLoRAConfig(num_experts=4, top_k=2, router_z_loss_coef=1e-3),
    "b": MixLoRAConfig(
        method="mixdora",
        num_experts=3,
        top_k=1,
        routing="switch",
        capacity_factor=2.0,
        attention_targets=["q_proj"],
        r=4,
        expert_r={0: 2},
    ),
    "c": MixLoRAConfig(num_experts=2, top_k=2, routing="dynamic", top_p=0.5, attention_targets=[]),
}
LRS = {"a": 1e-2, "b": 5e-3, "c": 2e-2}


def batches(seed: int, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (2, 6 + seed % 3), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


@pytest.fixture
def initial(tmp_path):
    """Each adapter's starting point, saved."""
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = apply_mixlora(dense_model(), copy.deepcopy(cfg))
        randomize(model, seed=i)
        save_adapter(model, tmp_path / f"init-{name}")
    return tmp_path


def multi(initial) -> torch.nn.Module:
    model = load_adapter(dense_model(), initial / "init-a", adapter_name="a")
    for name in ("b", "c"):
        load_adapter(model, initial / f"init-{name}", adapter_name=name)
    return model


def test_a_mixed_batch_gives_each_sample_its_own_adapter(initial):
    model = multi(initial)
    assert sum(isinstance(m, MultiAdapter) for m in model.modules()) == 2 * (1 + 4)  # 2 layers: FFN + q/k/v/o
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["c", "a", "b"]).logits
        for row, name in enumerate(["c", "a", "b"]):
            alone = load_adapter(dense_model(), initial / f"init-{name}")
            expected = alone(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-5)
        # samples of one adapter apart (indexed, not sliced) give each sample the same result
        apart = model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "a"]).logits
        together = model(
            input_ids=ids[[0, 2, 1]], attention_mask=mask[[0, 2, 1]], adapter_names=["a", "a", "b"]
        ).logits
        torch.testing.assert_close(apart[[0, 2, 1]], together, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="does not carry"):
        model(input_ids=ids, adapter_names=["a", "a", "z"])


def test_training_together_equals_training_each_alone(initial, tmp_path):
    loaders = {name: batches(seed) for seed, name in enumerate(CONFIGS)}
    model = multi(initial)
    joint = train_multi_adapter(model, loaders, steps=5, lrs=LRS, warmup=2, progress=False)
    for name in CONFIGS:
        save_adapter(model, tmp_path / f"joint-{name}", adapter=name)
        alone = load_adapter(dense_model(), initial / f"init-{name}")
        losses = train(alone, loaders[name], steps=5, lr=LRS[name], warmup=2, progress=False)
        assert joint[name] == pytest.approx(losses, rel=1e-5), name
        cfg, state = read_adapter(tmp_path / f"joint-{name}")
        assert cfg == alone.moe_peft_config
        expected = adapter_state_dict(alone)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        assert any(not torch.equal(state[k], read_adapter(initial / f"init-{name}")[1][k]) for k in state)


def test_adapters_can_be_removed_and_names_are_checked(initial):
    model = multi(initial)
    with pytest.raises(ValueError, match="already"):
        load_adapter(model, initial / "init-a", adapter_name="b")
    with pytest.raises(ValueError, match="name one"):
        save_adapter(model, initial / "x")
    remove_adapter(model)
    assert not any(isinstance(m, MultiAdapter) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
