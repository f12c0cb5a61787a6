"""Datasets for training and calibration: prompt/response records, tokenised with the prompt
and the padding masked out of the labels (-100), batched with right padding.

``--data`` accepts ``demo:<task>`` (bundled with the package), a local ``.jsonl``/``.json``
file or a directory of them. Records have ``prompt`` and ``response`` fields (an
instruction-tuning pair) or a single ``text`` field (plain language modelling).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

IGNORE_INDEX = -100


class DataError(ValueError):
    """The data given to ``--data`` cannot be used; the message says why."""


def resolve_data(spec: str, split: str = "train") -> Path:
    """The file behind ``--data``: ``demo:<task>`` or a path to a JSON/JSONL file or directory."""
    if spec.startswith("demo:"):
        from .demo import DEMO_DATA_DIR

        path = DEMO_DATA_DIR / f"{spec[5:]}_{split}.jsonl"
        if not path.is_file():
            tasks = sorted({p.stem.rsplit("_", 1)[0] for p in DEMO_DATA_DIR.glob("*_train.jsonl")})
            raise FileNotFoundError(f"no bundled demo task {spec!r}; available: {['demo:' + t for t in tasks]}")
        return path
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob(f"*{split}*.json*")) or sorted(path.glob("*.json*"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .json/.jsonl files")
        return files[0]
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec!r} is neither demo:<task> nor an existing file or directory")
    return path


def load_records(path: Path) -> list[dict]:
    """Records of a JSON/JSONL file, read through Hugging Face ``datasets``."""
    import datasets

    if path.stat().st_size == 0:  # datasets fails on an empty file with a bare StopIteration
        raise DataError(f"{path} holds no records")
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:  # malformed JSON surfaces as several arrow/datasets error types
        raise DataError(f"{path} is not readable as JSON/JSONL records: {err}") from err
    if len(ds) == 0:
        raise DataError(f"{path} holds no records")
    cols = set(ds.column_names)
    if not ({"prompt", "response"} <= cols or "text" in cols):
        raise DataError(f"{path} has columns {sorted(cols)}; expected prompt+response or text")
    return list(ds)


def encode(record: dict, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one record; prompt tokens get label -100."""
    if "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
    else:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


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
    """Batches of ``examples`` in order, the last one possibly short (calibration, evaluation)."""
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))


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
            raise DataError(f"{num_samples} training samples are fewer than one global batch "
                            f"({batch_size} per rank x {world} ranks)")
        self.num_samples, self.batch_size, self.rank, self.world, self.seed = num_samples, batch_size, rank, world, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        first = self.rank * self.batch_size
        for start in range(0, len(self) * self.batch_size * self.world, self.batch_size * self.world):
            yield order[start + first: start + first + self.batch_size].tolist()


def make_train_loader(examples: list[dict], tokenizer, batch_size: int, seed: int = 0, rank: int = 0,
                      world: int = 1) -> DataLoader:
    """Shuffled training batches of ``batch_size`` per rank (see ``GlobalBatches``)."""
    return DataLoader(examples, batch_sampler=GlobalBatches(len(examples), batch_size, rank, world, seed),
                      collate_fn=lambda b: collate(b, tokenizer.pad_token_id))


def target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens whose next-token label counts in the loss (labels are shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def load_examples(spec: str, tokenizer, max_length: int, split: str = "train", limit: int | None = None) -> list[dict]:
    """Encoded examples of ``--data``; ``limit`` keeps the first ``limit`` records."""
    records = load_records(resolve_data(spec, split))
    if limit is not None:
        records = records[:limit]
    return [encode(r, tokenizer, max_length) for r in records]
