"""Training-state checkpoints for ``--save-every`` / ``--resume``: adapters, optimizer and
scheduler state, RNG and the step count, one safetensors file per rank (no pickle: see
``state_file``), with a fingerprint of the run that a resume must match.

DeepSpeed's own ``save_checkpoint`` is not used: it writes every frozen expert weight into
its per-expert files (``exclude_frozen_parameters`` does not reach them), its loader needs
all of them, and it crashes on module names that contain ``expert`` outside its own MoE
layer. The adapter that users keep is written separately by ``save_adapter``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError
from .device import accelerator, model_device
from .dispatch import zero3_gathered
from .state_file import check_finite, read_state_file, read_state_header, write_state_file


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _is_zero_optimizer(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2/3 optimizer: its state is a per-rank partition, loaded from a list."""
    return hasattr(optimizer, "elastic_checkpoint")


STATE_FILE = "rank{rank}.safetensors"


class ResumeError(ConfigError):
    """A training state that this run cannot continue from; the message says why."""


def save_training_state(
    directory: str | Path, model: nn.Module, optimizer, scheduler, step: int, fingerprint: dict | None = None
) -> Path:
    """Write ``directory/step_{step}/rank{r}.safetensors`` for this rank (atomically); returns the step
    directory. ``fingerprint`` (what the run depends on: model, data, seed, layout...) is checked on resume."""
    rank, world = rank_world()
    with zero3_gathered(model):
        adapter = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    # the last state saved must be a good one to go back to: not one a NaN/inf gradient went into
    check_finite(adapter, "adapter parameters", f" after step {step}, training stopped (a NaN/inf gradient?)")
    out = Path(directory) / f"step_{step}"
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "world_size": world,
        "fingerprint": fingerprint or {},
        "adapter": adapter,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        # dropout and jitter draw from the accelerator's generator on GPUs
        "device_rng": accelerator().get_rng_state() if accelerator() else None,
    }
    header = {k: state[k] for k in ("step", "world_size", "fingerprint")}  # read on resume before any tensor
    write_state_file(out / STATE_FILE.format(rank=rank), state, header)
    return out


def resolve_resume(path: str | Path) -> Path:
    """A ``step_N`` directory, or the latest complete one under a checkpoints directory."""
    path = Path(path)
    first = STATE_FILE.format(rank=0)
    if (path / first).is_file():
        return path
    steps = sorted((p for p in path.glob("step_*") if (p / first).is_file()), key=lambda p: int(p.name[5:]))
    if not steps:
        old = " (torch pickle files from an older version are not loaded)" if list(path.glob("**/rank0.pt")) else ""
        raise ResumeError(f"--resume {path}: no step_N/{first} training state there{old}")
    return steps[-1]


def check_resume(path: str | Path, fingerprint: dict, max_steps: int | None = None) -> Path:
    """The step directory ``path`` resolves to, once it is known that this run can continue from it
    (same fingerprint, a step before ``max_steps``, this rank's file intact: checksum and contents)."""
    path = resolve_resume(path)
    state = read_state_header(path / STATE_FILE.format(rank=0))
    _check_fingerprint(path, state.get("fingerprint", {}), fingerprint)
    if max_steps is not None and state["step"] >= max_steps:
        raise ResumeError(
            f"--resume {path} is at step {state['step']}, not before --max-steps {max_steps}: nothing left to train"
        )
    read_state_file(path / STATE_FILE.format(rank=rank_world()[0]))  # read again on load: it is adapter-sized
    return path


def _check_fingerprint(path: Path, saved: dict, now: dict) -> None:
    """One line naming every way this run differs from the saved one."""
    if not now:
        return
    diffs = [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in now if saved.get(k) != now.get(k)]
    if diffs:
        raise ResumeError(
            f"--resume {path} was saved by a different run: {'; '.join(diffs)}; "
            "resume with the saved run's flags, data and number of ranks"
        )


def load_training_state(
    path: str | Path, model: nn.Module, optimizer, scheduler, fingerprint: dict | None = None
) -> int:
    """Restore what ``save_training_state`` wrote; returns the step to continue from.

    The run must use the same number of ranks (and expert-parallel size) as the one saved, and
    (when given) have the same ``fingerprint``.
    """
    rank, world = rank_world()
    path = resolve_resume(path)
    device = model_device(model)
    state = read_state_file(path / STATE_FILE.format(rank=rank), device)
    if state["world_size"] != world:
        raise ResumeError(f"{path} was saved by {state['world_size']} ranks; resume with the same number, not {world}")
    _check_fingerprint(path, state.get("fingerprint", {}), fingerprint or {})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state["adapter"].keys():
        raise ResumeError(
            f"{path} holds other adapter parameters than this model (different method, selection or --ep-size?)"
        )
    with torch.no_grad(), zero3_gathered(model, modifier_rank=0):
        for name, p in params.items():
            p.copy_(state["adapter"][name])
    if _is_zero_optimizer(optimizer):  # each rank reads its own partition out of the list, fp32 masters included
        states = [
            read_state_file(path / STATE_FILE.format(rank=r), device)["optimizer"] if r != rank else state["optimizer"]
            for r in range(world)
        ]
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
