"""Training-time logging and evaluation (``--eval-every``): the training loss of every step
and, every N steps, the validation loss per token and optionally multiple-choice accuracy,
written to ``train_log.jsonl`` (one JSON object per line), TensorBoard (when installed) and
the console; with ``keep_best`` the adapter with the lowest validation loss is saved to
``<output-dir>/best``.

Every rank calls ``after_step``: evaluation forwards are collective under expert
parallelism, so every rank runs the same number of them (validation samples are split
evenly over the ranks, the remainder left out; task items are scored whole on every rank
of an expert-parallel model). Only rank 0 writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .data import make_loader, target_tokens
from .device import model_device, to_device
from .resume import rank_world


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[dict], tokenizer, batch_size: int) -> float:
    """Loss per target token over ``examples`` (split evenly over the ranks, gathered)."""
    rank, world = rank_world()
    per_rank = len(examples) // world
    if per_rank == 0:
        raise ValueError(f"{len(examples)} validation samples cannot be split over {world} ranks")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros(
        2, dtype=torch.float64, device=device
    )  # [summed loss, target tokens], on the device: no sync per batch
    for batch in make_loader(examples[rank * per_rank : (rank + 1) * per_rank], tokenizer, batch_size):
        batch = to_device(batch, device)
        summed = model(**batch, num_items_in_batch=torch.tensor(1.0, device=device)).loss  # the sum, not the mean
        total += torch.stack([summed.double(), target_tokens(batch).double()])
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1))


@dataclass
class TrainingMonitor:
    """What ``launch/train.py`` logs and evaluates while training."""

    output_dir: Path
    tokenizer: object = None
    eval_every: int = 0
    eval_examples: list[dict] = field(default_factory=list)
    eval_tasks: dict = field(default_factory=dict)  # task -> list[MCItem]
    batch_size: int = 8
    keep_best: bool = False
    best: float = float("inf")
    history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None  # a resumed run appends to the log, after a marker line
    drift: object = None  # a drift.RoutingDrift (--reprofile-every), or None
    grow_request: tuple | None = None  # (step, {layer: experts}): training stopped there for more adapters

    def __post_init__(self):
        self.rank = rank_world()[0]
        self.writer = None
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.output_dir / "train_log.jsonl"
            if self.resumed_from is None:
                self.log_path.write_text("")
            else:  # the steps logged before the interruption stay; the marker says where it went on
                with self.log_path.open("a") as f:
                    f.write(json.dumps({"event": "resumed", "from": self.resumed_from}) + "\n")
            try:  # TensorBoard when it is installed; the JSONL log always
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                self.writer = None  # tensorboard is not installed: the JSONL log and the console only
        if self.drift is not None and self.resumed_from is None:
            self._write(self.drift.history[0])  # the coverage the selection starts from

    def _write(self, record: dict) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard's events (the JSONL log is written line by line); plot the routing drift."""
        if self.writer is not None:
            self.writer.close()
        if self.drift is not None and self.rank == 0 and len(self.drift.history) > 1:
            from .drift import plot_drift

            plot_drift(self.drift.history, self.output_dir / "routing_drift.png")

    def evaluations(self) -> list[dict]:
        """The records of ``evaluate`` (validation loss, task accuracy)."""
        return [r for r in self.history if "train_loss" not in r and "event" not in r]

    def after_step(self, step: int, loss: float, model: nn.Module) -> dict[int, list[int]]:
        """Called after optimizer step ``step`` (1-based) with its loss; returns the experts the drift
        monitor asks to grow adapters on (``{}``: none)."""
        self._write({"step": step, "train_loss": loss})
        if self.eval_every and step % self.eval_every == 0:
            self.evaluate(step, model)
        grow = {}
        if self.drift is not None and self.drift.due(step):
            record, grow = self.drift.measure(step, model)
            self._write(record)
        return grow

    def evaluate(self, step: int, model: nn.Module) -> dict:
        from .checkpoint import save_adapter
        from .dispatch import expert_parallel_group
        from .evaluate import accuracy, score_distributed

        record = {"step": step}
        if self.eval_examples:
            record["eval_loss"] = validation_loss(model, self.eval_examples, self.tokenizer, self.batch_size)
        rank, world = rank_world()
        if expert_parallel_group(model) is not None:
            rank, world = 0, 1  # every rank scores every item: the same forwards everywhere
        for name, items in self.eval_tasks.items():
            was_training = model.training
            scores = score_distributed(
                model, self.tokenizer, items, rank, world, batch_size=self.batch_size, progress=False
            )
            model.train(was_training)
            for metric, value in accuracy(scores).items():
                record[f"{name}/{metric}"] = value["accuracy"]
        self._write(record)
        if self.rank == 0:
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if self.keep_best and "eval_loss" in record and record["eval_loss"] < self.best:
            self.best = record["eval_loss"]
            save_adapter(model, self.output_dir / "best")  # every rank: expert-parallel adapters are gathered
        return record
