"""Training-state files: nested state round-trips through safetensors + JSON, nothing in a file can
name code to run, and changed or truncated bytes are refused."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import load_file, save_file

from moe_peft_ds.state_file import (
    FORMAT,
    StateFileError,
    _checksum,
    read_state_file,
    read_state_header,
    write_state_file,
)

ROOT = Path(__file__).resolve().parents[1]


def _state():
    return {
        "step": 7,
        "lr": [1e-3, float("inf")],
        "nan": float("nan"),
        "optimizer": {0: {"exp_avg": torch.randn(3, 4), "step": torch.tensor(7.0)}, 1: {"step": torch.tensor(2)}},
        "groups": ({"params": [0, 1], "betas": (0.9, 0.999)},),
        "dtype": torch.bfloat16,
        "rng": torch.get_rng_state(),
        "half": torch.randn(5).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "scaler": DynamicLossScaler(2.0**16, 100, 1.0, 2, False),
        "stage": ZeroStageEnum.gradients,
        "slices": [{"w": fragment_address(numel=12, start=4)}],
        "none": None,
    }


def test_nested_state_round_trips_with_its_types(tmp_path):
    state = _state()
    write_state_file(tmp_path / "s.safetensors", state, {"step": 7, "fingerprint": {"seed": 1}})
    back = read_state_file(tmp_path / "s.safetensors")
    assert read_state_header(tmp_path / "s.safetensors") == {"step": 7, "fingerprint": {"seed": 1}}
    assert back["step"] == 7 and back["lr"] == [1e-3, math.inf] and math.isnan(back["nan"])
    assert set(back["optimizer"]) == {0, 1}  # int keys stay ints
    torch.testing.assert_close(back["optimizer"][0]["exp_avg"], state["optimizer"][0]["exp_avg"], rtol=0, atol=0)
    assert back["optimizer"][1]["step"].dtype == torch.int64
    assert back["groups"] == ({"params": [0, 1], "betas": (0.9, 0.999)},)
    assert back["dtype"] is torch.bfloat16 and back["none"] is None
    assert torch.equal(back["rng"], state["rng"]) and torch.equal(back["half"], state["half"])
    assert torch.equal(back["mask"], state["mask"])
    assert type(back["scaler"]) is DynamicLossScaler and vars(back["scaler"]) == vars(state["scaler"])
    assert back["stage"] is ZeroStageEnum.gradients
    assert back["slices"][0]["w"] == fragment_address(numel=12, start=4)


def test_only_containers_tensors_and_the_allowed_classes_are_written(tmp_path):
    with pytest.raises(TypeError, match="do not store"):
        write_state_file(tmp_path / "s.safetensors", {"f": Path("x")})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def _rewrite(path: Path, tree) -> None:
    """Replace a state file's JSON tree by ``tree``, with a matching checksum (a careful forger)."""
    tensors = load_file(str(path))
    state, header = json.dumps(tree), "{}"
    meta = {"format": FORMAT, "state": state, "header": header, "sha256": _checksum(tensors, state, header)}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"__object__": "system", "fields": {}}, "names a class 'system'"),
        ({"__enum__": "Popen", "value": 1}, "names a class 'Popen'"),
        ({"__dtype__": "manual_seed"}, "unknown dtype"),
        ({"__dict__": [[[1], 2]]}, "dict key of type list"),
        ({"__tensor__": "t99"}, "malformed state"),
        ({"__object__": "fragment_address", "fields": {"__dict__": [["numel", 1]]}}, "malformed state"),
        ({"key": 1}, "no known kind"),
    ],
)
def test_a_forged_state_cannot_name_code(tmp_path, tree, message):
    path = tmp_path / "s.safetensors"
    write_state_file(path, {"x": torch.ones(2)})
    _rewrite(path, tree)
    with pytest.raises(StateFileError, match=message):
        read_state_file(path)


def test_changed_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    write_state_file(path, {"x": torch.arange(64, dtype=torch.float32)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a byte of the last tensor, behind a valid header
    path.write_bytes(bytes(raw))
    with pytest.raises(StateFileError, match="corrupt"):
        read_state_file(path)
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(StateFileError, match="not a readable state file"):
        read_state_file(path)
    save_file({"x": torch.ones(1)}, str(path))  # a safetensors file, but not a training state
    with pytest.raises(StateFileError, match="not a moe_peft_ds training state"):
        read_state_header(path)


UNPICKLING = re.compile(r"\btorch\.(load|save)\(|^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve)\b", re.M)


@pytest.mark.parametrize("folder", ["moe_peft_ds", "launch", "benchmarks"])
def test_no_pickle_anywhere(folder):
    """No module reads or writes pickles: neither torch.load/torch.save nor the pickle modules."""
    found = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if UNPICKLING.search(p.read_text())]
    assert not found
