"""Datasets for training, calibration and evaluation: loaded through Hugging Face ``datasets``,
tokenised with the prompt and the padding masked out of the labels (-100), batched with
right padding.

``--data`` accepts ``demo:<task>`` (bundled with the package), a local file
(``.jsonl``/``.json``/``.parquet``/``.csv``), a directory of such files (the split's files
are those whose name contains the split), a directory written by ``save_to_disk``, or a
dataset name on the Hugging Face hub. Records are read in one of three formats
(``DataFormat``): instruction (a prompt and a response column), chat (a list of
``{"role", "content"}`` messages, rendered with the tokenizer's chat template when it has
one; the last assistant turn is the response) or plain text. Tokenisation goes through
``Dataset.map``, which ``datasets`` caches: a second run on the same files and tokenizer
reads the cache instead of tokenising again.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

IGNORE_INDEX = -100
FORMATS = ("auto", "instruction", "chat", "text")
SPLIT_NAMES = ("train", "validation", "valid", "eval", "test", "dev")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """The data given to ``--data`` cannot be used; the message says why."""


@dataclass(frozen=True)
class DataFormat:
    """How records become training examples."""

    kind: str = "auto"  # one of FORMATS; auto: chat if the messages column exists, else instruction, else text
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    text_column: str = "text"
    train_on_prompt: bool = False  # labels on the prompt tokens too (the full text)

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise DataError(f"data format {self.kind!r} is unknown; choose one of {FORMATS}")

    def resolve(self, columns: list[str], source: str) -> str:
        """The format of a dataset with ``columns``; a clear error if its columns do not fit."""
        needs = {
            "chat": [self.messages_column],
            "instruction": [self.prompt_column, self.response_column],
            "text": [self.text_column],
        }
        kinds = [self.kind] if self.kind != "auto" else list(needs)
        for kind in kinds:
            if all(c in columns for c in needs[kind]):
                return kind
        wanted = " or ".join("+".join(needs[k]) for k in kinds)
        raise DataError(
            f"{source} has columns {sorted(columns)}; expected {wanted} "
            "(map yours with --prompt-column/--response-column/--messages-column/--text-column)"
        )


def resolve_data(spec: str, split: str = "train") -> Path | str:
    """The file or directory behind ``--data`` (``demo:<task>`` or a local path), or the hub
    name as given. A local path that does not exist fails here, before any model is loaded."""
    if spec.startswith("demo:"):
        from .demo import DEMO_DATA_DIR

        path = DEMO_DATA_DIR / f"{spec[5:]}_{'eval' if split == 'validation' else split}.jsonl"
        if not path.is_file():
            tasks = sorted({p.stem.rsplit("_", 1)[0] for p in DEMO_DATA_DIR.glob("*_train.jsonl")})
            raise FileNotFoundError(
                f"no bundled demo task {spec!r} (split {split!r}); available: {['demo:' + t for t in tasks]}"
            )
        return path
    path = Path(spec)
    if path.exists():
        return path
    if path.suffix in BUILDERS or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--data {spec!r} does not exist (a local file or directory was meant)")
    return spec  # a hub dataset name


def _data_files(directory: Path, split: str) -> tuple[str, list[str]]:
    """``(builder, files)`` of a directory of data files for ``split``."""
    files = sorted(p for p in directory.iterdir() if p.suffix in BUILDERS)
    if not files:
        raise FileNotFoundError(f"{directory} holds no {'/'.join(BUILDERS)} files")
    chosen = [p for p in files if split in p.stem]
    named = sorted({s for p in files for s in SPLIT_NAMES if s in re.split(r"[^a-z]+", p.stem.lower())})
    if not chosen and named:  # files named for other splits: never train on those instead
        raise DataError(f"--data {directory} has files for splits {named}, none for {split!r} (their names say which)")
    chosen = chosen or files  # no file names a split: they are all one
    builders = {BUILDERS[p.suffix] for p in chosen}
    if len(builders) > 1:
        raise DataError(f"{directory} mixes file types {sorted(builders)} for split {split!r}; keep one")
    return builders.pop(), [str(p) for p in chosen]


def load_split(spec: str, split: str = "train"):
    """The ``datasets.Dataset`` of one split of ``--data``."""
    import datasets

    source = resolve_data(spec, split)
    try:
        if isinstance(source, str):  # the hub: used as is where the machine can reach it
            return datasets.load_dataset(source, split=split)
        if source.is_dir() and any((source / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(source))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source} has splits {sorted(loaded)}, not {split!r}")
                return loaded[split]
            return loaded
        if source.is_dir():
            builder, files = _data_files(source, split)
        else:
            if source.suffix not in BUILDERS:
                raise DataError(f"{source}: unknown file type {source.suffix!r}; use one of {sorted(BUILDERS)}")
            if source.stat().st_size == 0:  # datasets fails on an empty file with a bare StopIteration
                raise DataError(f"{source} holds no records")
            builder, files = BUILDERS[source.suffix], [str(source)]
        return datasets.load_dataset(builder, data_files=files, split="train")
    except (DataError, FileNotFoundError):
        raise
    except Exception as err:  # malformed files and unreachable hubs surface as many error types
        where = "the Hugging Face hub (no access here? pass a local path)" if isinstance(source, str) else "its files"
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise DataError(f"--data {spec!r} (split {split!r}) is not readable from {where}: {err}{cause}") from err


def _chat_text(messages: list[dict], tokenizer) -> tuple[str, str]:
    """``(prompt, response)`` text of a conversation whose last message is the assistant's:
    the tokenizer's chat template where it has one, else ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not render the conversation as its prompt followed by the reply")
        return prompt, full[len(prompt) :]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    return prompt, messages[-1]["content"]


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def nothing_to_learn(record: dict, kind: str, fmt: DataFormat) -> str:
    """Why a record holds nothing to learn ("" when it does): a missing, null or empty response or
    text, a conversation that does not end with an assistant reply."""
    if kind == "text":
        return f"no {fmt.text_column}" if _blank(record.get(fmt.text_column)) else ""
    if kind == "instruction":
        return f"no {fmt.response_column}" if _blank(record.get(fmt.response_column)) else ""
    messages = record.get(fmt.messages_column)
    if not messages or messages[-1].get("role") != "assistant" or _blank(messages[-1].get("content")):
        return "no assistant reply at the end"
    if any(m.get("role") is None or m.get("content") is None for m in messages):
        return "a message without role or content"
    return ""


def encode(
    record: dict, tokenizer, max_length: int, fmt: DataFormat = DataFormat(), kind: str | None = None
) -> dict[str, list[int]]:
    """Token ids and labels of one record; prompt tokens get label -100 unless ``fmt.train_on_prompt``.
    A record with nothing to learn (``nothing_to_learn``) raises DataError."""
    kind = kind or fmt.resolve(list(record), "the record")
    reason = nothing_to_learn(record, kind, fmt)
    if reason:
        raise DataError(f"the record has nothing to learn: {reason}")
    if kind == "text":
        ids = tokenizer(str(record[fmt.text_column]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids[:max_length], "labels": list(ids[:max_length])}
    if kind == "chat":
        prompt_text, response_text = _chat_text(record[fmt.messages_column], tokenizer)
    else:
        prompt = record[fmt.prompt_column]
        prompt_text, response_text = (
            "" if prompt is None else str(prompt),
            str(record[fmt.response_column]),
        )  # CSV: numbers
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + response
    labels = list(ids) if fmt.train_on_prompt else [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples (each already ending with EOS) into rows of ``max_length`` tokens.

    Attention DOES cross sample boundaries inside a packed row (causal, so a sample sees the
    end of the ones before it, separated by EOS), as in the common constant-length packing;
    labels stay per token, so no loss is computed across a boundary's prompt tokens."""
    rows, ids, labels = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += e["labels"]
        while len(ids) >= max_length:
            rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
            ids, labels = ids[max_length:], labels[max_length:]
    if ids:
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples; padding gets attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(examples: list[dict], tokenizer, batch_size: int) -> DataLoader:
    """Batches of ``examples`` in order, the last one possibly short (calibration, evaluation). Its
    own generator: iterating a DataLoader draws a seed, which must not move the training run's
    random stream (a rank that profiles for its expert placement would then draw other adapters)."""
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
        generator=torch.Generator(),
    )


def calibration_batches(examples: list[dict], tokenizer, batch_size: int, rank: int, world: int) -> list[dict]:
    """This rank's share (every world-th sample) of the calibration set in batches, topped up with
    uncounted repeats to rank 0's number of batches (the most): an expert-parallel forward takes
    every rank of the group."""
    batches = list(make_loader(examples[rank::world], tokenizer, batch_size))
    rounds = math.ceil(len(examples[0::world]) / batch_size)
    if len(batches) < rounds:
        filler = next(iter(make_loader(examples[:batch_size], tokenizer, batch_size)))
        batches += [{**filler, "counted": False}] * (rounds - len(batches))
    return batches


class GlobalBatches(Sampler[list[int]]):
    """This rank's share of each global batch of ``batch_size * world`` samples.

    The global batches are the same for any number of ranks: a seeded shuffle per epoch
    (``seed + epoch``) cut into consecutive global batches, of which rank ``r`` takes rows
    ``r * batch_size ..``. ``world`` ranks with ``batch_size`` therefore see exactly the
    batches one process with ``batch_size * world`` sees. The incomplete last global batch
    of an epoch is dropped, so that every rank always gets ``batch_size`` samples.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if num_samples < batch_size * world:
            raise DataError(
                f"{num_samples} training samples are fewer than one global batch "
                f"({batch_size} per rank x {world} ranks)"
            )
        self.num_samples, self.batch_size, self.rank, self.world, self.seed = (
            num_samples,
            batch_size,
            rank,
            world,
            seed,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        first = self.rank * self.batch_size
        for start in range(0, len(self) * self.batch_size * self.world, self.batch_size * self.world):
            yield order[start + first : start + first + self.batch_size].tolist()


def make_train_loader(
    examples: list[dict], tokenizer, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1
) -> DataLoader:
    """Shuffled training batches of ``batch_size`` per rank (see ``GlobalBatches``)."""
    return DataLoader(
        examples,
        batch_sampler=GlobalBatches(len(examples), batch_size, rank, world, seed),
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
    )


def target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens whose next-token label counts in the loss (labels are shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _column_kind(feature) -> str:
    """What a ``datasets`` feature holds, in words: text, number, null, a list of messages, ..."""
    import datasets

    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return "text"
        return "null" if feature.dtype == "null" else ("number" if feature.dtype != "bool" else "bool")
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        inner = feature.feature
        return "messages" if isinstance(inner, dict) and {"role", "content"} <= inner.keys() else "a list"
    return "a dict" if isinstance(feature, dict) else type(feature).__name__


def check_columns(ds, kind: str, fmt: DataFormat, spec: str) -> None:
    """Refuse columns whose type the format cannot use (dict or list prompts, messages that are
    not ``{"role", "content"}`` lists) instead of training on their string form."""
    wanted = {"chat": {fmt.messages_column: ("messages", "null")}}.get(kind) or {
        c: ("text", "number", "null")
        for c in ([fmt.text_column] if kind == "text" else [fmt.prompt_column, fmt.response_column])
    }
    for column, allowed in wanted.items():
        found = _column_kind(ds.features[column])
        if found not in allowed:
            need = 'a list of {"role", "content"} messages' if kind == "chat" else "text (or numbers)"
            raise DataError(f"--data {spec!r}: column {column!r} holds {found}; {kind} data needs {need} there")


def _skip_report(reasons: list[str], total: int) -> str:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    parts = [f"{n} with {r}" if r.startswith(("no ", "a ")) else f"{n} {r}" for r, n in sorted(counts.items())]
    what = (
        f"none of its {total} rows has anything"
        if len(reasons) == total
        else f"{len(reasons)} of {total} rows have nothing"
    )
    return f"{what} to learn ({', '.join(parts)})"


TRUNCATED = "whose response starts after --max-length"


def load_examples(
    spec: str,
    tokenizer,
    max_length: int,
    split: str = "train",
    limit: int | None = None,
    fmt: DataFormat = DataFormat(),
    packing: bool = False,
    warn=None,
) -> list[dict]:
    """Encoded examples of one split of ``--data``; ``limit`` keeps the first ``limit`` records.
    Tokenisation runs through ``Dataset.map`` and is cached by ``datasets``. Columns of the wrong
    type are refused; rows with nothing to learn (``nothing_to_learn``, or whose labels all fall
    past ``max_length``) are skipped and counted in one line to ``warn`` (default: stderr), and
    refused when no row is left."""
    ds = load_split(spec, split)
    if len(ds) == 0:
        raise DataError(f"--data {spec!r} (split {split!r}) holds no records")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    kind = fmt.resolve(ds.column_names, f"--data {spec!r}")
    check_columns(ds, kind, fmt, spec)

    def encode_or_skip(record):
        reason = nothing_to_learn(record, kind, fmt)
        if reason:
            return {"input_ids": [], "labels": [], "skip": reason}
        row = encode(record, tokenizer, max_length, fmt, kind)
        return {**row, "skip": "" if any(t != IGNORE_INDEX for t in row["labels"][1:]) else TRUNCATED}

    encoded = ds.map(encode_or_skip, remove_columns=ds.column_names, desc="tokenising")
    reasons = [r for r in encoded["skip"] if r]
    if len(reasons) == len(ds):
        hint = f" (raise --max-length {max_length})" if TRUNCATED in reasons else ""
        raise DataError(f"--data {spec!r} (split {split!r}): {_skip_report(reasons, len(ds))}{hint}")
    if reasons:
        (warn or _warn)(f"--data {spec!r} (split {split!r}): {_skip_report(reasons, len(ds))}; skipped")
    examples = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in encoded if not e["skip"]]
    return pack(examples, max_length) if packing else examples


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr, from the first rank only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)
