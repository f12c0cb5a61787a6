"""What the command-line scripts in ``launch/`` share: the model/data flags and how bad
input is reported (one ``error:`` line on stderr, exit status 2, nothing written)."""
from __future__ import annotations

import argparse
import sys

from .backends.hf import UnsupportedModelError
from .checkpoint import AdapterMismatchError
from .config import ConfigError
from .data import DataError
from .models import PRESETS

# OSError covers missing files and model ids that cannot be resolved (no hub access).
USER_ERRORS = (ConfigError, DataError, UnsupportedModelError, AdapterMismatchError, OSError)


def add_model_data_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data`` and ``--output-dir``, spelled the same in every script."""
    parser.add_argument("--model", required=True,
                        help=f"Hugging Face model id or local path, or a bundled preset: {', '.join(PRESETS)}")
    parser.add_argument("--data", required=True,
                        help="demo:<task> (bundled: demo:arithmetic, demo:code), or a JSON/JSONL file or directory "
                             "with prompt/response or text records")
    parser.add_argument("--output-dir", required=True, help="directory the results are written to")


def check_positive(**flags: int) -> None:
    """Raise ConfigError naming the first flag that is not > 0."""
    for name, value in flags.items():
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be > 0")


def run_cli(run, args: argparse.Namespace) -> int:
    """Call ``run(args)``; user errors become one line on stderr and exit status 2."""
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
