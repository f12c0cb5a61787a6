"""What the command-line scripts in ``launch/`` share: the model/data flags and how bad
input is reported (one ``error:`` line on stderr, exit status 2, nothing written)."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
from pathlib import Path

from .checkpoint import AdapterMismatchError
from .config import ConfigError
from .data import FORMATS, DataError, DataFormat
from .device import bind_accelerator
from .models import PRESETS
from .modules import NonFiniteError, UnsupportedModelError
from .state_file import StateFileError
from .tasks import TaskError
from .watchdog import Watchdog

# OSError covers missing files and model ids that cannot be resolved (no hub access).
USER_ERRORS = (
    ConfigError,
    DataError,
    TaskError,
    UnsupportedModelError,
    AdapterMismatchError,
    NonFiniteError,
    StateFileError,
    OSError,
)


DATA_HELP = (
    "demo:<task> (bundled: demo:arithmetic, demo:code); a .jsonl/.json/.parquet/.csv file; a directory of them "
    "(a split's files have its name in theirs); a save_to_disk directory; or a Hugging Face hub dataset name"
)


def add_model_data_args(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """``--model``, ``--data`` (unless ``data=False``: the script names its data otherwise), the
    data-format flags and ``--output-dir``, spelled the same in every script."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"Hugging Face model id or local path, or a bundled preset: {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer other than the model's own (checked against the model)"
    )
    if data:
        parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument(
        "--data-format",
        default="auto",
        choices=FORMATS,
        help="instruction (prompt + response columns), chat (a messages column, rendered with the "
        "tokenizer's chat template), text; auto picks by the columns (default)",
    )
    parser.add_argument(
        "--prompt-column", default="prompt", help="instruction format: the prompt column (default prompt)"
    )
    parser.add_argument(
        "--response-column", default="response", help="instruction format: the response column (default response)"
    )
    parser.add_argument(
        "--messages-column", default="messages", help="chat format: the messages column (default messages)"
    )
    parser.add_argument("--text-column", default="text", help="text format: the text column (default text)")
    parser.add_argument("--train-split", default="train", help="the split to train (or profile) on (default train)")
    parser.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="labels on the prompt tokens too (default: only the response is learned)",
    )
    parser.add_argument("--output-dir", required=True, help="directory the results are written to")


def data_format(args: argparse.Namespace) -> DataFormat:
    """The ``DataFormat`` the data flags describe."""
    return DataFormat(
        kind=args.data_format,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        messages_column=args.messages_column,
        text_column=args.text_column,
        train_on_prompt=args.train_on_prompt,
    )


def check_positive(**flags: float) -> None:
    """Raise ConfigError naming the first flag that is not a finite number > 0 (NaN and inf too)."""
    for name, value in flags.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be > 0 and finite")


def check_output_dir(out: Path) -> None:
    """Refuse an ``--output-dir`` that cannot be written (a file, or no write permission on it or on
    the directory it would be created in) before any work; nothing is created."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"--output-dir {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: {existing} is not writable")


def run_cli(run, args: argparse.Namespace) -> int:
    """Call ``run(args)``; user errors become one line on stderr and exit status 2."""
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        stop_watchdog()


_watchdog: Watchdog | None = None


def stop_watchdog() -> None:
    """This rank is done: its watcher stops expecting heartbeats from it."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), so that two single-process runs started
    at once do not both take DeepSpeed's default 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(deepspeed_config: str | None, timeout_s: int) -> tuple[int, int]:
    """``(rank, world)``; with a DeepSpeed config this creates the process group (under the
    deepspeed launcher, or a world of one for a plain ``python`` run)."""
    if deepspeed_config is None:
        return 0, 1

    if "RANK" not in os.environ:  # a plain `python` run: a world of one, on a free port unless one was chosen
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
        )
    return start_process_group(timeout_s)


def start_process_group(timeout_s: int) -> tuple[int, int]:
    """``(rank, world)`` of the process group started from the launcher's environment, with a
    watchdog on every rank when there are several."""
    import deepspeed
    import torch.distributed as dist

    bind_accelerator()
    # NCCL on GPUs, gloo on the CPU accelerator; the timeout turns a dead peer into an error.
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    global _watchdog
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1 and _watchdog is None:  # a stopped or dead rank ends the job within timeout_s
        _watchdog = Watchdog(timeout_s, rank, world).start()
    return rank, world
