"""Every preset in ds_configs/ is a DeepSpeed config that DeepSpeed itself accepts."""

import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

PRESETS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


def test_presets_exist():
    assert PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_parses_and_clips_explicitly(path):
    raw = json.loads(path.read_text())
    assert "gradient_clipping" in raw  # explicit: DeepSpeed's default (0, no clipping) is a silent change
    cfg = DeepSpeedConfig(str(path))
    stage = int(path.name.split("_")[0].removeprefix("zero"))
    assert cfg.zero_optimization_stage == stage
    assert cfg.bfloat16_config.enabled == ("bf16" in path.name)
    offload = cfg.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == ("offload" in path.name)
