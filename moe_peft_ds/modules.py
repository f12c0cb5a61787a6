"""Module helpers every layer of the package uses: the errors for models no backend adapts and for
non-finite numbers, the decoder-layer index of a module path, swapping modules, and wrapping
nn.Linear children in LoRA."""

from __future__ import annotations

import re

from torch import nn

from .config import LoRAConfig
from .lora import LoRALinear


class UnsupportedModelError(ValueError):
    """The model holds nothing this package can adapt (or not in the way asked)."""


class NonFiniteError(ValueError):
    """A loss, gradient or adapter tensor is NaN or infinite: training stops, nothing is written."""


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module path (``model.layers.3.mlp`` -> 3), or None."""
    match = _LAYER_INDEX.search(name + ".")
    return None if match is None else int(match.group(1))


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.<path>`` is."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap_linears(parent: nn.Module, names: tuple[str, ...] | None, cfg: LoRAConfig) -> int:
    """Replace ``parent.<name>`` nn.Linear children (every one with ``names=None``) by LoRALinear;
    returns how many."""
    n = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear) and (names is None or name in names):
            setattr(parent, name, LoRALinear(child, cfg))
            n += 1
    return n


def read_in_forward(module: nn.Module, params) -> None:
    """Tell ZeRO-3 that ``module``'s forward reads ``params`` (of another module) directly, so it
    gathers them for this module."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for p in params:
        register_external_parameter(module, p)
