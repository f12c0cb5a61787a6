"""Where tensors live. The model goes to the run's accelerator right after loading (before
profiling), and every batch and every collective's tensor follows the model: NCCL takes no CPU
tensors, and a CPU tensor in a GPU step is a hidden copy."""

from __future__ import annotations

import os

import torch
from torch import nn


def accelerator():
    """DeepSpeed's accelerator object when this machine has one (a GPU), else None (its CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    found = get_accelerator()
    return None if found.device_name() == "cpu" else found


def run_device() -> torch.device:
    """This process's device: the accelerator at ``LOCAL_RANK`` (``cuda:N`` on GPUs, the CPU where
    there is none), for ``python`` and ``deepspeed`` runs alike."""
    found = accelerator()
    return torch.device(found.device_name(int(os.environ.get("LOCAL_RANK", "0")))) if found else torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the one its inputs and collectives must use)."""
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def bind_accelerator() -> None:
    """Make ``run_device()`` this process's current device before the process group starts, so
    NCCL's communicator and every allocation land on the rank's own GPU (a no-op on CPU)."""
    found = accelerator()
    if found:
        found.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """This process's peak memory so far, in bytes: resident host memory (``ru_maxrss``, which
    includes the pages of memory-mapped checkpoint shards that were read) and, on a GPU, the
    most its allocator held."""
    import resource

    return {
        "host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "device": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def per_rank(value) -> list:
    """``value`` of every rank, in rank order (every rank must call this); ``[value]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
