"""Adapter checkpoints: round trip, merge, and loads that must fail without changing anything."""

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters
from safetensors.torch import load_file
from tiny_models import CONFIGS, tiny_model

from moe_peft_ds import AdapterConfig, apply_sieve_lora, load_adapter, merge_adapter, save_adapter
from moe_peft_ds.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterMismatchError
from moe_peft_ds.config import ConfigError
from moe_peft_ds.modules import NonFiniteError


def trained_adapter(family, tmp_path, dora=False, attention=()):
    model = tiny_model(family)
    layers = sorted({0, 1})
    apply_sieve_lora(
        model,
        {layers[0]: [2, 5], layers[1]: [0]},
        AdapterConfig(use_dora=dora, attention_targets=list(attention), use_rslora=True),
    )
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    state, types, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags
    assert getattr(model, "moe_peft_config", None) is None


@pytest.mark.parametrize("dora", [False, True])
def test_round_trip_is_bit_identical(family, batch, tmp_path, dora):
    model, path = trained_adapter(
        family, tmp_path, dora=dora, attention=("v_proj",) if family != "deepseek_v3" else ()
    )
    fresh = load_adapter(tiny_model(family), path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_file_holds_only_selected_experts_with_global_ids(tmp_path):
    _, path = trained_adapter("mixtral", tmp_path, dora=True)
    keys = load_file(str(path / WEIGHTS_NAME)).keys()
    experts = {(int(k.split(".")[1]), int(k.split(".")[3])) for k in keys if ".experts." in k}
    assert experts == {(0, 2), (0, 5), (1, 0)}
    assert {k.rsplit(".", 1)[1] for k in keys} == {"lora_A", "lora_B", "magnitude"}
    cfg = json.loads((path / CONFIG_NAME).read_text())
    assert cfg["selection"] == {"0": [2, 5], "1": [0]} and cfg["model_type"] == "mixtral" and cfg["num_experts"] == 8


@pytest.mark.parametrize("dora", [False, True])
def test_merge_matches_adapter_and_saves_pretrained(family, batch, tmp_path, dora):
    model, _ = trained_adapter(family, tmp_path, dora=dora, attention=("q_proj",) if family != "deepseek_v3" else ())
    with torch.no_grad():
        ref = model(**batch).logits
        merge_adapter(model)
        torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    import transformers as tf

    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref, rtol=1e-4, atol=1e-5)


def assert_load_fails(model, path, error, match):
    """``load_adapter`` raises ``error`` and leaves every parameter of ``model`` as it was."""
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, path)
    assert_unchanged(model, snap)


def mixtral_with(**overrides):
    import transformers as tf

    cfg = CONFIGS["mixtral"]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return tf.MixtralForCausalLM(cfg)


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: tiny_model("olmoe"), "model_type"),
        (lambda: mixtral_with(num_local_experts=4), "num_experts"),
        (lambda: mixtral_with(intermediate_size=16), "wrong shape"),  # same hidden size and expert count
    ],
)
def test_load_onto_other_model_fails_and_changes_nothing(tmp_path, other, match):
    _, path = trained_adapter("mixtral", tmp_path)
    assert_load_fails(other(), path, AdapterMismatchError, match)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_fails_clearly(tmp_path, damage):
    _, path = trained_adapter("mixtral", tmp_path)
    f = path / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    assert_load_fails(tiny_model("mixtral"), path, AdapterMismatchError, "corrupt or truncated")


def test_corrupted_bytes_behind_a_valid_header_fail_the_checksum(tmp_path):
    _, path = trained_adapter("mixtral", tmp_path)
    f = path / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor: the header, shapes and dtypes stay valid
    f.write_bytes(bytes(data))
    assert_load_fails(tiny_model("mixtral"), path, AdapterMismatchError, "do not match the checksum")


def test_a_non_finite_adapter_is_never_written(tmp_path):
    model, _ = trained_adapter("mixtral", tmp_path)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_missing_tensor_fails_and_rolls_back(tmp_path):
    from safetensors.torch import save_file

    _, path = trained_adapter("mixtral", tmp_path)
    state = load_file(str(path / WEIGHTS_NAME))
    state.pop(next(k for k in state if k.endswith("lora_B")))
    save_file(state, str(path / WEIGHTS_NAME))
    assert_load_fails(tiny_model("mixtral"), path, AdapterMismatchError, "missing")


def test_missing_config_keys_fail(tmp_path):
    _, path = trained_adapter("mixtral", tmp_path)
    raw = json.loads((path / CONFIG_NAME).read_text())
    del raw["selection"]
    (path / CONFIG_NAME).write_text(json.dumps(raw))
    assert_load_fails(tiny_model("mixtral"), path, ConfigError, "selection")


def test_missing_adapter_directory_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model("mixtral"), tmp_path / "nothing")


def test_save_without_adapter_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no moe_peft_ds adapter"):
        save_adapter(tiny_model("mixtral"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_twice_is_refused(tmp_path):
    _, path = trained_adapter("mixtral", tmp_path)
    model = load_adapter(tiny_model("mixtral"), path)
    with pytest.raises(ValueError, match="already carries"):
        load_adapter(model, path)


def _failing_save_file(state, path, metadata=None):
    """Write half a file, then fail: what a kill or a full disk does in the middle of a save."""
    Path(path).write_bytes(b"\x00" * 100)
    raise OSError("disk full")


def test_failed_save_leaves_no_half_written_adapter(tmp_path, monkeypatch):
    import moe_peft_ds.checkpoint as ckpt

    model, old = trained_adapter("mixtral", tmp_path)  # an adapter already in place
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(ckpt, "save_file", _failing_save_file)
    for target in (old, fresh):
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, target)
    assert sorted(p.name for p in fresh.iterdir()) == []  # nothing that could be loaded
    monkeypatch.undo()
    load_adapter(tiny_model("mixtral"), old)  # the earlier adapter is intact


def test_convert_adapter_command_line(tmp_path):
    """launch/convert_adapter.py: a transformers sieve adapter becomes a Megatron one (same tensors,
    model_type megatron); a family without a Megatron layout is refused with one error line."""
    import subprocess
    import sys

    model = tiny_model("mixtral")
    apply_sieve_lora(model, {0: [1, 2], 1: [5]}, AdapterConfig(r=4))
    save_adapter(model, tmp_path / "hf")
    script = Path(__file__).resolve().parents[1] / "launch" / "convert_adapter.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "hf"), str(tmp_path / "meg"), "--to", "megatron"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "meg" / "adapter_config.json").read_text())["model_type"] == "megatron"
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "meg"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "meg"), str(tmp_path / "x"), "--to", "gpt_oss"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "no Megatron counterpart" in bad.stderr
    assert not (tmp_path / "x").exists()
