"""Nested training state (optimizer, scheduler, RNG, step) in one safetensors file, without pickle.

The tensors go into the file's tensor section; everything else becomes a JSON tree in its header,
where a tensor is ``{"__tensor__": key}``. Objects other than containers, numbers, strings,
dtypes and tensors are written only for the few DeepSpeed classes ZeRO's optimizer state holds
(``ALLOWED``), by their fields, and rebuilt without running their constructors: reading a file
never runs code named by the file. A sha256 of the tensors is checked on reading.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .modules import NonFiniteError

FORMAT = "moe_peft_ds.state/1"


class StateFileError(ValueError):
    """A state file that is not one this package wrote, or whose bytes changed since."""


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes, in key order: recorded in the file's
    metadata at save and checked at load, so corrupted bytes behind a valid header are found."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(state: dict[str, torch.Tensor], what: str = "adapter tensors", when: str = "") -> None:
    """Refuse NaN/inf tensors: an adapter or training state holding them is never written."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{len(bad)} {what} hold NaN or inf{when} (e.g. {bad[0]}): not written")


def _allowed() -> dict[str, type]:
    """The classes ZeRO's optimizer ``state_dict`` holds besides containers and tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {c.__qualname__: c for c in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def encode(obj, tensors: dict[str, torch.Tensor]):
    """A JSON-able tree for ``obj``; its tensors are moved to the CPU into ``tensors``."""
    if obj is None or isinstance(obj, (bool, int, float, str)) and not isinstance(obj, enum.Enum):
        return obj
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # no shared storage in safetensors
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors) for v in obj]
        return items if type(obj) is list else {"__tuple__": items}
    if isinstance(obj, dict):  # keys kept with their types (optimizer state is keyed by int)
        return {"__dict__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    name = type(obj).__qualname__
    if _allowed().get(name) is not type(obj):
        raise TypeError(f"training state holds a {type(obj)!r}, which state files do not store")
    if isinstance(obj, enum.Enum):
        return {"__enum__": name, "value": obj.value}
    return {"__object__": name, "fields": encode(vars(obj), tensors)}


def decode(tree, tensors: dict[str, torch.Tensor]):
    """The object ``encode`` made ``tree`` from; unknown class names are refused."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__dtype__" in tree:
        dtype = getattr(torch, tree["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise StateFileError(f"unknown dtype {tree['__dtype__']!r}")
        return dtype
    if "__tuple__" in tree:
        return tuple(decode(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in tree["__dict__"]}
    name = tree.get("__enum__") or tree.get("__object__")
    if name is None:
        raise StateFileError(f"a state file holds an entry of no known kind (keys {sorted(tree)})")
    cls = _allowed().get(name)
    if cls is None:
        raise StateFileError(f"a state file names a class {name!r} that state files do not hold")
    if "__enum__" in tree:
        return cls(tree["value"])
    obj = cls.__new__(cls)  # fields only: no constructor (or any other code) runs
    fields = decode(tree["fields"], tensors)
    if dataclasses.is_dataclass(cls):
        fields = {f.name: fields[f.name] for f in dataclasses.fields(cls)}
    obj.__dict__.update(fields)
    return obj


def _hashable(key):
    if isinstance(key, (list, dict)):
        raise StateFileError(f"a state file has a dict key of type {type(key).__name__}")
    return key


def _checksum(tensors: dict[str, torch.Tensor], state: str, header: str) -> str:
    """sha256 over the tensors and both JSON texts: any changed byte of the file is found."""
    return hashlib.sha256("|".join((tensors_digest(tensors), state, header)).encode()).hexdigest()


def write_state_file(path: str | Path, state, header: dict | None = None) -> None:
    """Write ``state`` to ``path`` atomically (a kill leaves the old file or none, never half of one).
    ``header``, a small JSON-able dict, can be read back without the tensors (``read_state_header``)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree, head = json.dumps(encode(state, tensors)), json.dumps(header or {})
    meta = {"format": FORMAT, "state": tree, "header": head, "sha256": _checksum(tensors, tree, head)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise StateFileError(f"{path} is not a readable state file ({err})") from None
    if meta.get("format") != FORMAT or not {"state", "header", "sha256"} <= meta.keys():
        raise StateFileError(f"{path} is not a moe_peft_ds training state file (format {meta.get('format')!r})")
    return meta


def _json(path: Path, text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StateFileError(f"{path} has an unreadable {what} ({err})") from None


def read_state_header(path: str | Path) -> dict:
    """The ``header`` a state file was written with; no tensor is read (the checksum is checked
    when the whole file is read)."""
    path = Path(path)
    header = _json(path, _metadata(path)["header"], "header")
    if not isinstance(header, dict):
        raise StateFileError(f"{path} has a header that is not a JSON object")
    return header


def read_state_file(path: str | Path, device: torch.device | str = "cpu"):
    """What ``write_state_file`` wrote, tensors on ``device``; a file that is not one, is truncated
    or whose bytes do not match their checksum raises StateFileError naming it."""
    path = Path(path)
    meta = _metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise StateFileError(f"{path} is not a readable state file ({err})") from None
    if meta["sha256"] != _checksum(tensors, meta["state"], meta["header"]):
        raise StateFileError(f"{path} is corrupt: its bytes do not match the checksum written with them")
    tree = _json(path, meta["state"], "state")
    try:
        return decode(tree, {k: t.to(device) for k, t in tensors.items()})
    except StateFileError as err:
        raise StateFileError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise StateFileError(f"{path} has a malformed state ({type(err).__name__}: {err})") from None
