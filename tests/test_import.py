"""Importing PEFT adapters and ESFT selections: ours -> peft -> ours and peft -> ours -> peft give
the same logits (fp32, 1e-5), the sieve selection survives the trip, and what an adapter of this
project cannot hold is refused with one line, nothing written."""

import json
import subprocess
import sys

import pytest
import torch
from test_export import ROOT, SIEVE, _adapter, _base, _load, _logits

from moe_peft_ds import load_adapter
from moe_peft_ds.checkpoint import read_adapter
from moe_peft_ds.config import ConfigError
from moe_peft_ds.export import export_adapter
from moe_peft_ds.importing import import_esft, import_peft

ROUND_TRIP = ("qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_ours_peft_ours(tmp_path, family):
    base = _base(tmp_path, family)
    adapter, expected = _adapter(tmp_path, family, base, SIEVE)
    back = import_peft(export_adapter(adapter, "peft", tmp_path / "peft"), tmp_path / "back")
    cfg, _ = read_adapter(back)
    original, _ = read_adapter(adapter)
    assert cfg.selection == original.selection == SIEVE and cfg.method == "sieve"
    assert (cfg.attention_targets, cfg.shared_expert_lora) == (original.attention_targets, original.shared_expert_lora)
    torch.testing.assert_close(_logits(load_adapter(_load(base), back)), expected, atol=1e-5, rtol=1e-5)


def _peft_adapter(tmp_path, family, base):
    """An adapter PEFT made itself: every expert, q/v projections with a rank and an alpha of their own."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    model = get_peft_model(_load(base), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    out = tmp_path / "peft-made"
    model.save_pretrained(out)
    return out, _logits(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_peft_ours_peft(tmp_path, family):
    from peft import PeftModel

    base = _base(tmp_path, family)
    made, expected = _peft_adapter(tmp_path, family, base)
    ours = import_peft(made, tmp_path / "ours")
    cfg, _ = read_adapter(ours)
    assert cfg.method == "lora" and cfg.r == 4 and cfg.attention_targets == ["q_proj", "v_proj"]
    torch.testing.assert_close(_logits(load_adapter(_load(base), ours)), expected, atol=1e-5, rtol=1e-5)
    again = PeftModel.from_pretrained(_load(base), export_adapter(ours, "peft", tmp_path / "again")).eval()
    torch.testing.assert_close(_logits(again), expected, atol=1e-5, rtol=1e-5)


def _edit_config(src, dst, **changes):
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def test_what_cannot_be_held_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _base(tmp_path, "mixtral")
    made, _ = _peft_adapter(tmp_path, "mixtral", base)
    for name, changes, message in [
        ("dora", {"use_dora": True}, "DoRA"),
        ("saved", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("ia3", {"peft_type": "IA3"}, "only LoRA"),
    ]:
        with pytest.raises(ConfigError, match=message):
            import_peft(_edit_config(made, tmp_path / name, **changes), tmp_path / f"out-{name}")
    head = get_peft_model(_load(base), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(ConfigError, match="lm_head"):
        import_peft(tmp_path / "head", tmp_path / "out-head")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((made / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        import_peft(pickled, tmp_path / "out-pickled")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out-")]


def test_esft_selection(tmp_path):
    base = _base(tmp_path, "qwen2_moe")
    config = tmp_path / "expert_config.json"
    config.write_text(
        json.dumps({"experts": {"0": [2, 1], "1": [3]}, "shared_experts": True, "non_expert_modules": False})
    )
    out = import_esft(config, tmp_path / "esft", str(base), r=4)
    cfg, state = read_adapter(out)
    assert cfg.selection == {0: [1, 2], 1: [3]} and cfg.shared_expert_lora and cfg.attention_targets == []
    assert all(not t.any() for k, t in state.items() if k.endswith("lora_B"))  # untrained: B = 0
    torch.testing.assert_close(_logits(load_adapter(_load(base), out)), _logits(_load(base)))
    config.write_text(json.dumps({"experts": {"0": [9]}}))
    with pytest.raises(ConfigError, match="outside"):
        import_esft(config, tmp_path / "bad", str(base))
    config.write_text(json.dumps({"layers": {}}))
    with pytest.raises(ConfigError, match="not an ESFT"):
        import_esft(config, tmp_path / "bad", str(base))
    assert not (tmp_path / "bad").exists()


def test_command_line(tmp_path):
    base = _base(tmp_path, "mixtral")
    made, _ = _peft_adapter(tmp_path, "mixtral", base)
    script = [sys.executable, str(ROOT / "launch" / "import_adapter.py")]
    ok = subprocess.run(
        script + ["--peft", str(made), "--output-dir", str(tmp_path / "a")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    config = tmp_path / "esft.json"
    config.write_text(json.dumps({"experts": {"1": [0, 7]}}))
    bad = subprocess.run(
        script + ["--esft", str(config), "--output-dir", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1].startswith("error:")
        and "--base-model" in bad.stderr
    )
    assert not (tmp_path / "b").exists()


def test_training_on_an_esft_selection(tmp_path, capsys):
    """launch/train.py --selection-file trains exactly ESFT's experts, without profiling; the
    adapter_config.json import_esft wrote selects the same way; other methods refuse it."""
    import runpy

    train_main = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="not_main")["main"]
    config = tmp_path / "expert_config.json"
    config.write_text(json.dumps({"experts": {"0": [3, 1], "1": [15]}, "shared_experts": False}))
    base = ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--no-progress", "--max-steps", "2"]
    rc = train_main(base + ["--selection-file", str(config), "--output-dir", str(tmp_path / "run")])
    assert rc == 0
    cfg, _ = read_adapter(tmp_path / "run")
    assert cfg.selection == {0: [1, 3], 1: [15]}
    assert not (tmp_path / "run" / "routing_profile.json").exists()
    again = tmp_path / "again"
    rc = train_main(
        base + ["--selection-file", str(tmp_path / "run" / "adapter_config.json"), "--output-dir", str(again)]
    )
    assert rc == 0 and read_adapter(again)[0].selection == cfg.selection
    capsys.readouterr()
    rc = train_main(base + ["--method", "lora", "--selection-file", str(config), "--output-dir", str(tmp_path / "x")])
    assert rc == 2 and "--selection-file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
