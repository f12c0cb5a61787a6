"""The training loop: AdamW on the trainable (adapter) parameters, warmup + cosine schedule,
gradient clipping, a progress bar. Components know nothing of the launcher."""
from __future__ import annotations

import itertools

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; inject an adapter first")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_step(model: nn.Module, batch: dict, optimizer, scheduler, clip: float) -> float:
    """One forward + backward + optimizer step; returns the loss (padding/prompt ignored)."""
    loss = model(**batch).loss
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model: nn.Module, loader, steps: int, lr: float, warmup: int = 10, clip: float = 1.0,
          progress: bool = True) -> list[float]:
    """Train for ``steps`` optimizer steps, cycling over ``loader``; returns the loss per step."""
    optimizer = build_optimizer(model, lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps)
    model.train()
    losses = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for _ in bar:
        losses.append(train_step(model, next(batches), optimizer, scheduler, clip))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses
