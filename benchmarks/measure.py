"""What the benchmarks share: defaults for a full or ``--quick`` run, the result files, and the
peak memory of one step on CPU (Linux)."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
from pathlib import Path
from typing import Callable

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _proc_status_kb(key: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(key + ":")), None)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def peak_rss_delta(step: Callable[[], object]) -> int | None:
    """Run ``step()`` and return the bytes by which peak RSS rose while it ran, from a settled start
    (Linux with glibc only, approximate; None elsewhere, the step still runs).

    For the step, allocations over 64 KiB use mmap, so freed tensors leave RSS and the kernel's
    high-water mark (reset through ``/proc/self/clear_refs`` after returning freed heap to the
    OS) is this step's own. Afterwards the threshold is set to glibc's largest dynamic value,
    so later steps reuse the heap instead of paying an mmap per tensor.
    """
    libc = _libc()
    if libc is None or _proc_status_kb("VmHWM") is None:
        step()
        return None
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    try:
        gc.collect()
        libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            step()
            return None
        before = _proc_status_kb("VmRSS")
        step()
        peak = _proc_status_kb("VmHWM")
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    return None if before is None or peak is None else max(0, peak - before) * 1024


def fill_defaults(args: argparse.Namespace, full: dict, quick: dict) -> argparse.Namespace:
    """Every setting left unset (None) takes its value from ``quick`` with ``--quick``, else ``full``."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_result(output: str | Path, result: dict, table: str) -> None:
    """``output`` (the JSON result) and beside it the same name with ``.md`` (the table), which is printed too."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
