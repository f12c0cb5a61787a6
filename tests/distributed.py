"""One small helper for multi-process tests: spawn N gloo ranks on CPU (or NCCL ranks, one GPU
each) and run a function."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, timeout_s, backend="gloo"):
    # LOCAL_RANK as the deepspeed launcher sets it (one host), so deepspeed.initialize runs here too
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    device = None
    if backend == "nccl":  # rank r on cuda:r, bound at init so that NCCL's barrier knows the device
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), device_id=device
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # on success, no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, args: tuple = (), timeout_s: float = 300, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks of ``backend`` (gloo on CPU; "nccl": rank
    r on ``cuda:r``, set as its current device); any rank's exception fails the call.
    Collectives that wait longer than ``timeout_s`` raise."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args, timeout_s, backend), nprocs=world, join=True)


def _drop_deepspeed_shm(port: str) -> None:
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.unlink(path)


ABORT = "terminate called without an active exception"


def _clear_output_dir(cmd: list[str]) -> None:
    """Before a retry: what the aborted attempt wrote to ``--output-dir`` goes (the abort can come
    at exit, after the adapter was saved, and a second run refuses a directory holding one),
    unless the run resumes from inside it."""
    import shutil
    from pathlib import Path

    if "--output-dir" not in cmd:
        return
    out = Path(cmd[cmd.index("--output-dir") + 1]).resolve()
    resume = Path(cmd[cmd.index("--resume") + 1]).resolve() if "--resume" in cmd else None
    if resume is None or not resume.is_relative_to(out):
        shutil.rmtree(out, ignore_errors=True)


def run_deepspeed(cmd: list[str], **kwargs):
    """``subprocess.run`` of a ``deepspeed --master_port P ...`` command. DeepSpeed's CPU
    shared-memory allreduce buffers (``/dev/shm/deepspeed_allreduce_buffer_*_P_*``, 66 MiB
    each) outlive the run and are named by port: they are removed before (a run must not
    attach to a stale one) and after (they would pile up)."""
    import subprocess

    port = cmd[cmd.index("--master_port") + 1]
    for attempt in range(2):
        if attempt:
            _clear_output_dir(cmd)
        _drop_deepspeed_shm(port)
        try:
            proc = subprocess.run(cmd, **kwargs)
        finally:
            _drop_deepspeed_shm(port)
        # An intermittent native abort of a CPU rank (no Python traceback; seen about once per
        # full suite since session 3, cause not found yet) gets one more try; anything else fails.
        if proc.returncode == 0 or ABORT not in (proc.stderr or "") + (proc.stdout or ""):
            return proc
    return proc
