"""``moe-peft-ds <command> [flags]`` and ``python -m moe_peft_ds <command> [flags]``."""

from __future__ import annotations

import importlib
import sys

from .commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return (
        "usage: moe-peft-ds <command> [flags]   (moe-peft-ds <command> --help for its flags)\n\ncommands:\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"moe_peft_ds.commands.{COMMANDS[argv[0]][0]}")
    sys.argv[0] = f"moe-peft-ds {argv[0]}"  # what each command's --help calls itself
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
