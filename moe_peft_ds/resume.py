"""Training-state checkpoints for ``--save-every`` / ``--resume``: adapters, optimizer and
scheduler state, RNG and the step count, one file per rank.

DeepSpeed's own ``save_checkpoint`` is not used: it writes every frozen expert weight into
its per-expert files (``exclude_frozen_parameters`` does not reach them), its loader needs
all of them, and it crashes on module names that contain ``expert`` outside its own MoE
layer. The adapter that users keep is written separately by ``save_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .device import accelerator, model_device
from .dispatch import zero3_gathered


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _is_zero_optimizer(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2/3 optimizer: its state is a per-rank partition, loaded from a list."""
    return hasattr(optimizer, "elastic_checkpoint")


def save_training_state(directory: str | Path, model: nn.Module, optimizer, scheduler, step: int) -> Path:
    """Write ``directory/step_{step}/rank{r}.pt`` for this rank (atomically); returns the step directory."""
    rank, world = rank_world()
    out = Path(directory) / f"step_{step}"
    out.mkdir(parents=True, exist_ok=True)
    with zero3_gathered(model):
        adapter = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "world_size": world,
        "adapter": adapter,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        # dropout and jitter draw from the accelerator's generator on GPUs
        "device_rng": accelerator().get_rng_state() if accelerator() else None,
    }
    tmp = out / f".rank{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / f"rank{rank}.pt")
    return out


def resolve_resume(path: str | Path) -> Path:
    """A ``step_N`` directory, or the latest complete one under a checkpoints directory."""
    path = Path(path)
    if (path / "rank0.pt").is_file():
        return path
    steps = sorted((p for p in path.glob("step_*") if (p / "rank0.pt").is_file()), key=lambda p: int(p.name[5:]))
    if not steps:
        raise FileNotFoundError(f"--resume {path}: no step_N/rank0.pt training state there")
    return steps[-1]


def load_training_state(path: str | Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore what ``save_training_state`` wrote; returns the step to continue from.

    The run must use the same number of ranks (and expert-parallel size) as the one saved.
    """
    rank, world = rank_world()
    path = resolve_resume(path)
    device = model_device(model)
    state = _load_state(path / f"rank{rank}.pt", device)
    if state["world_size"] != world:
        raise ValueError(f"{path} was saved by {state['world_size']} ranks; resume with the same number, not {world}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state["adapter"].keys():
        raise ValueError(
            f"{path} holds other adapter parameters than this model (different method, selection or --ep-size?)"
        )
    with torch.no_grad(), zero3_gathered(model, modifier_rank=0):
        for name, p in params.items():
            p.copy_(state["adapter"][name])
    if _is_zero_optimizer(optimizer):  # each rank reads its own partition out of the list, fp32 masters included
        states = [_load_state(path / f"rank{r}.pt", device)["optimizer"] for r in range(world)]
        optimizer.load_state_dict(states, load_from_fp32_weights=True)
        if hasattr(
            optimizer, "checkpoint_event_epilogue"
        ):  # ZeRO-3: re-gather the persistent parameters it partitioned
            optimizer.checkpoint_event_epilogue()
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if state.get("device_rng") is not None and accelerator():
        accelerator().set_rng_state(state["device_rng"].cpu())
    return state["step"]


def _load_state(path: Path, device: torch.device) -> dict:
    """One rank's state file, its tensors on ``device`` (not on the GPU of the rank that wrote it);
    tensors and plain containers only, never code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # ZeRO's optimizer state holds these: plain attributes and an enum, allowed by name (no code runs)
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=device, weights_only=True)
