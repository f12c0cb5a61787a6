"""A ``--deepspeed_config`` preset, read and checked against the launcher's flags before any
process group, model or file exists: one ``ConfigError`` line naming what is wrong."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .config import ConfigError

ZERO_STAGES = (0, 1, 2, 3)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path} does not exist; presets are in ds_configs/")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object, not a {type(cfg).__name__}")
    return cfg


def _check_fields(path: Path, cfg: dict) -> None:
    """The fields this package reads itself, with their types and ranges."""
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(
            f'--deepspeed_config {path}: zero_optimization must be an object like {{"stage": 2}}, not {zero!r}'
        )
    if zero.get("stage", 0) not in ZERO_STAGES or not _is_int(zero.get("stage", 0)):
        raise ConfigError(
            f"--deepspeed_config {path}: zero_optimization.stage must be one of 0, 1, 2, 3, not {zero['stage']!r}"
        )
    accumulation = cfg.get("gradient_accumulation_steps", 1)
    if not (_is_int(accumulation) and accumulation >= 1):
        raise ConfigError(
            f"--deepspeed_config {path}: gradient_accumulation_steps must be an integer >= 1, not {accumulation!r}"
        )
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip >= 0):
        raise ConfigError(f"--deepspeed_config {path}: gradient_clipping must be a finite number >= 0, not {clip!r}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(
                f"--deepspeed_config {path}: remove its {key!r}; the launcher builds AdamW and the warmup + cosine "
                "schedule itself (--lr)"
            )
    for key in ("bf16", "fp16"):
        section = cfg.get(key, {})
        if not isinstance(section, dict) or not isinstance(section.get("enabled", False), bool):
            raise ConfigError(
                f'--deepspeed_config {path}: {key} must be an object like {{"enabled": true}}, not {cfg[key]!r}'
            )


def _check_batch(path: Path, cfg: dict, micro_batch_size: int, world: int) -> None:
    """``train_batch_size``, where the preset names one, must be what the flags make it."""
    total = cfg.get("train_batch_size")
    if total is None:
        return
    accumulation = cfg.get("gradient_accumulation_steps", 1)
    if total != micro_batch_size * accumulation * world:
        raise ConfigError(
            f"--deepspeed_config {path}: train_batch_size {total!r} is not --batch-size {micro_batch_size} x "
            f"gradient_accumulation_steps {accumulation} x {world} rank(s) = {micro_batch_size * accumulation * world}; "
            "remove train_batch_size or make them agree"
        )


def _deepspeed_accepts(path: Path, cfg: dict) -> None:
    """DeepSpeed's own config class: its sections' types and ranges (a world of one: no process group yet)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig({k: v for k, v in cfg.items() if k != "train_batch_size"})
    except Exception as err:  # pydantic's ValidationError, DeepSpeed's asserts and TypeErrors
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"--deepspeed_config {path}: DeepSpeed rejects it: {detail}") from None


def load_deepspeed_config(path: str | Path, micro_batch_size: int, ep_size: int = 1, world: int | None = None) -> dict:
    """The preset at ``path``, checked (fields, batch sizes against ``micro_batch_size`` x
    accumulation x ``world`` ranks (default: the launcher's ``WORLD_SIZE``), what DeepSpeed
    itself accepts, ZeRO-3 against expert parallelism) and filled in for ``deepspeed.initialize``."""
    path = Path(path)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    cfg = _read(path)
    _check_fields(path, cfg)
    _check_batch(path, cfg, micro_batch_size, world)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size  # --batch-size is the per-rank micro batch
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x ranks
    _deepspeed_accepts(path, cfg)
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3 and ep_size > 1:
        raise ConfigError(
            "ZeRO-3 cannot shard expert-parallel experts (DeepSpeed MoE rejects it); "
            "use a ZeRO-0/1/2 preset with --ep-size > 1"
        )
    if zero.get("stage", 0) == 3:
        # DeepSpeed treats transformers' Mixtral/Qwen MoE blocks as ZeRO-3 leaf modules and reduces
        # their gradients in the block's full-backward hook. With a frozen model below the block
        # (PEFT) the block's input needs no gradient, that hook fires before the block's own
        # backward, and the adapters' gradients then land on partitioned (empty) parameters.
        # Our adapter modules gather what they read themselves (register_external_parameter).
        zero["leaf_module"] = {"classes": [], "names": [], "name_suffixes": []}
    return cfg
